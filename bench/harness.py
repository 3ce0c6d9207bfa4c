"""Cost of running budget forcing inside lm-evaluation-harness against ``t0s1 eval``.

    python bench/harness.py [--model smollm2-135m-instruct] [--questions 32] [--max-thinking-tokens 64]
                            [--num-ignore 1] [--max-answer-tokens 64] [--batch-size 8] [--rounds 2] --data-dir DIR

Times, on one loaded model and the same GSM8K questions and settings, (1) ``t0s1 eval``'s
``run_eval`` (writing its samples and results) and (2) the harness's ``simple_evaluate`` with the
``t0s1`` model on the ``t0s1_gsm8k`` task (indexing the t0s1 tasks, building the requests,
generating, grading). Each is run ``--rounds`` times, alternating, and the fastest run of each
counts. Prints the ratio harness / t0s1 eval (goal <= 1.1) and whether the texts and verdicts
are the same. The harness's command line also indexes the harness's own ~15,000 task configs
once per invocation; that one-off cost is printed separately. Needs ``pip install 't0s1[lm-eval]'``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-thinking-tokens", type=int, default=64)
    parser.add_argument("--num-ignore", type=int, default=1)
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="folder with gsm8k_test.jsonl (default: $T0S1_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import lm_eval
    from lm_eval.tasks import TaskManager

    from t0s1 import BudgetForcing, generate
    from t0s1.backends.engine import EngineBackend
    from t0s1.evaluation.runner import EvalConfig, run_eval
    from t0s1.evaluation.tasks import get_task
    from t0s1.lm_eval import T0S1LM, task_manager
    from t0s1.models import load_model

    backend = EngineBackend(load_model(args.model, device=args.device))
    generate(backend.lm, ["What is 2 + 2?"], BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2))  # warm up
    config = EvalConfig(
        model=args.model,
        max_thinking_tokens=[args.max_thinking_tokens],
        num_ignore=[args.num_ignore],
        max_answer_tokens=args.max_answer_tokens,
        batch_size=args.batch_size,
    )
    harness_model = T0S1LM(
        backend=backend,
        max_thinking_tokens=args.max_thinking_tokens,
        num_ignore=args.num_ignore,
        max_answer_tokens=args.max_answer_tokens,
        batch_size=args.batch_size,
        progress=False,
    )

    def t0s1_eval() -> list[dict]:
        with tempfile.TemporaryDirectory() as out:
            run_eval(backend, [get_task("gsm8k")], config, out, data_dir=args.data_dir, limit=args.questions, progress=False)
            lines = (Path(out) / "samples" / "gsm8k.jsonl").read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines]

    def harness() -> list[dict]:
        manager = task_manager(args.data_dir, include_defaults=False)
        results = lm_eval.simple_evaluate(model=harness_model, tasks=["t0s1_gsm8k"], task_manager=manager, limit=args.questions, log_samples=True)
        return results["samples"]["t0s1_gsm8k"]

    eval_seconds, harness_seconds = [], []
    for _ in range(args.rounds):
        seconds, rows = timed(t0s1_eval)
        eval_seconds.append(seconds)
        seconds, samples = timed(harness)
        harness_seconds.append(seconds)
    index_seconds, _ = timed(TaskManager)

    profile = backend.lm.profile
    same_texts = len(rows) == len(samples) and all(
        profile.split(sample["resps"][0][0]) == (row["thinking"], row["output"]) for sample, row in zip(samples, rows, strict=False)
    )
    same_verdicts = [bool(s["exact_match"]) for s in samples] == [row["correct"] for row in rows]
    best_eval, best_harness = min(eval_seconds), min(harness_seconds)
    print(
        f"model {backend.lm.name} on {backend.lm.device}, {len(rows)} GSM8K questions, max_thinking_tokens {args.max_thinking_tokens}, "
        f"num_ignore {args.num_ignore}, max_answer_tokens {args.max_answer_tokens}, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(f"t0s1 eval:            {', '.join(f'{s:.2f}' for s in eval_seconds)} s")
    print(f"harness (t0s1 model): {', '.join(f'{s:.2f}' for s in harness_seconds)} s")
    print(f"harness / t0s1 eval = {best_harness / best_eval:.3f} (goal <= 1.1); same texts: {same_texts}; same verdicts: {same_verdicts}")
    print(f"accuracy: t0s1 eval {sum(r['correct'] for r in rows)}/{len(rows)}, harness {sum(s['exact_match'] for s in samples)}/{len(samples)}")
    print(f"(the harness command line also indexes its own task configs once per run: {index_seconds:.2f} s here)")


if __name__ == "__main__":
    main()
