"""Test-time policies side by side on the quickstart's trained model: accuracy and total tokens.

    python bench/policies.py --run runs/quickstart             # after `t0s1 quickstart`
    python bench/policies.py --run runs/quickstart --problems 60 --traces 8   # a quicker look
    python bench/policies.py --run runs/quickstart --parts exit               # early exit and probing only
    python bench/policies.py --run runs/quickstart --parts parallel --problems 600  # as docs/policies.md measured it

Held-out problems: the quickstart's 100 test problems and the next ones its generator makes after
its 1,000 training problems (never trained on), 300 by default. Every policy runs on the same
engine (llama.cpp on the exported GGUF when the run has one, else transformers) and is graded as
`t0s1 eval` grades the quickstart task. Ratios are printed against the goals:

- DeepConf offline at n = 8 (the paper's defaults) >= majority vote at n = 8 on the same traces,
  and both > greedy;
- DeepConf online at n = 16: >= 40% fewer total tokens than majority vote at n = 16, accuracy
  within 1 point (the default threshold, keep_percent 90; the part "low" adds DeepConf-low, 10);
- early exit or probing with num_ignore 2 at the largest budget: accuracy within 1 point of
  budget forcing with num_ignore 2 at <= 60% of its thinking tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from t0s1.evaluation.grading import answers_match, extract_answer
from t0s1.forcing_rules import BudgetForcing
from t0s1.models import load_model
from t0s1.policies import make_policy, rules
from t0s1.policies.run import generate_with_policy
from t0s1.quickstart.problems import generate_problems

QUICKSTART_TRAIN, QUICKSTART_TEST = 1000, 100


def held_out(count: int) -> list[dict]:
    """The quickstart's test problems, then problems generated after its training split."""
    _, rows = generate_problems(0, QUICKSTART_TEST + QUICKSTART_TRAIN + max(0, count - QUICKSTART_TEST), seed=0)
    return (rows[:QUICKSTART_TEST] + rows[QUICKSTART_TEST + QUICKSTART_TRAIN :])[:count]


def trained_model(run: Path) -> str:
    for candidate in sorted(run.glob("*.gguf")) + sorted((run / "model").glob("*.gguf")):
        return str(candidate)
    if (run / "model").is_dir():
        return str(run / "model")
    raise SystemExit(f"No trained model in {run}: run `t0s1 quickstart --out {run}` first.")


def extract(text: str) -> str | None:
    return extract_answer(text, "number")


def accuracy(outcomes, problems) -> float:
    right = sum(o.voted is not None and answers_match(o.voted, p["solution"], "number") for o, p in zip(outcomes, problems, strict=True))
    return 100.0 * right / len(problems)


def run(lm, problems, budget, policy, batch):
    started, outcomes = time.perf_counter(), []
    for start in range(0, len(problems), batch):
        part = problems[start : start + batch]
        outcomes += generate_with_policy(lm, [p["question"] for p in part], budget, policy, extract=extract)
    return outcomes, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--model", help="A model to use instead of the run's")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--traces", type=int, default=16, help="n of the online comparison (offline uses n / 2)")
    parser.add_argument("--budget", type=int, default=256, help="the largest thinking budget")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--window", type=int, default=16,
                        help="DeepConf online's window (2,048 in the paper: it could never stop a trace here, ~50 to 250 tokens). "
                        "Offline runs with the policy's defaults, the paper's: window 2,048, so each trace here is one group")
    parser.add_argument("--warmup", type=int, default=3,
                        help="DeepConf online's warm-up traces at n=16 (the paper: 16 of 512; docs/policies.md gives 2 to 8)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per engine call")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--json", type=Path, help="write the table here as JSON")
    parser.add_argument("--parts", default="parallel,online,low,exit",
                        help="comma-separated: parallel (DeepConf offline vs vote at n/2), online (DeepConf online vs "
                        "vote at n), low (DeepConf-low online, keep_percent 10, vs vote at n), exit (early exit and "
                        "probing vs budget forcing with 2 Waits); greedy always runs")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # llama.cpp takes as many

    problems = held_out(args.problems)
    lm = load_model(args.model or trained_model(args.run), backend=args.backend)
    n_online, n_offline = args.traces, max(2, args.traces // 2)
    greedy = BudgetForcing(max_thinking_tokens=args.budget, max_answer_tokens=10)
    sampled = BudgetForcing(max_thinking_tokens=args.budget, max_answer_tokens=10, temperature=args.temperature, top_p=args.top_p)
    waits = BudgetForcing(max_thinking_tokens=args.budget, num_ignore=2, max_answer_tokens=10)
    table = {}

    def record(name, outcomes, seconds, *, voted=None):
        correct = accuracy(outcomes, problems) if voted is None else voted
        tokens = sum(o.total_tokens for o in outcomes)
        thinking = sum(o.result.thinking_tokens for o in outcomes) / len(outcomes)
        table[name] = {"accuracy": round(correct, 2), "total_tokens": tokens, "avg_thinking_tokens": round(thinking, 1),
                       "tokens_per_correct": round(tokens / max(1e-9, correct * len(problems) / 100), 1), "seconds": round(seconds, 1)}
        print(f"{name:32} accuracy {correct:6.2f}%  total tokens {tokens:9d}  thinking/answer {thinking:7.1f}  {seconds:7.1f} s", flush=True)

    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = parts - {"parallel", "online", "low", "exit"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))} (parallel, online, low, exit)")

    def run_policy(budget, name, policy_args=None, n=None):
        return run(lm, problems, budget, make_policy(name, policy_args, n=n), args.batch)

    online = {"window": str(args.window), "mode": "online", "warmup": str(args.warmup)}
    record("greedy (budget)", *run_policy(greedy, "budget"))
    print("\nGoals")
    if "parallel" in parts:
        offline, seconds = run_policy(sampled, "deepconf", None, n_offline)
        record(f"deepconf offline n={n_offline}", offline, seconds)
        majority = [rules.majority_vote([t.answer for t in o.traces]) for o in offline]  # the same traces
        vote = 100.0 * sum(v is not None and answers_match(v, p["solution"], "number") for v, p in zip(majority, problems, strict=True)) / len(problems)
        record(f"vote n={n_offline} (same traces)", offline, seconds, voted=vote)
        print(f"  deepconf offline n={n_offline} - vote n={n_offline}: {table[f'deepconf offline n={n_offline}']['accuracy'] - vote:+.2f} "
              f"points (goal >= 0); vote - greedy {vote - table['greedy (budget)']['accuracy']:+.2f} (goal > 0)", flush=True)
    # DeepConf online at the default threshold (keep_percent 90) and DeepConf-low (keep_percent 10:
    # the threshold at the warm-up's 90th percentile, the paper's largest savings and its online
    # example script's setting), each against the vote at the same n
    online_runs = {"online": (f"deepconf online n={n_online}", online),
                   "low": (f"deepconf-low online n={n_online}", {**online, "keep_percent": "10"})}
    chosen = [online_runs[part] for part in online_runs if part in parts]
    if chosen:
        vote_name = f"vote n={n_online}"
        record(vote_name, *run_policy(sampled, "vote", None, n_online))
        for name, policy_args in chosen:
            record(name, *run_policy(sampled, "deepconf", policy_args, n_online))
            saved = 1 - table[name]["total_tokens"] / table[vote_name]["total_tokens"]
            print(f"  {name} tokens saved vs vote: {100 * saved:.1f}% (goal >= 40%), accuracy "
                  f"{table[name]['accuracy'] - table[vote_name]['accuracy']:+.2f} points (goal within 1)", flush=True)
    if "exit" in parts:
        record("budget num_ignore=2", *run_policy(waits, "budget"))
        record("early-exit num_ignore=2", *run_policy(waits, "early-exit"))
        record("probe(interval=16) num_ignore=2", *run_policy(waits, "probe", {"interval": "16"}))
        for name in ("early-exit num_ignore=2", "probe(interval=16) num_ignore=2"):
            ratio = table[name]["avg_thinking_tokens"] / max(1e-9, table["budget num_ignore=2"]["avg_thinking_tokens"])
            print(f"  {name}: thinking tokens {ratio:.2f} of budget forcing's (goal <= 0.60), accuracy "
                  f"{table[name]['accuracy'] - table['budget num_ignore=2']['accuracy']:+.2f} points (goal within 1)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"problems": len(problems), "table": table}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
