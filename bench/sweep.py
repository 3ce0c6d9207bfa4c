"""Cost of a prefix-sharing budget sweep against its largest budget alone, on each engine backend.

    python bench/sweep.py [--backend both|llamacpp|transformers] [--model smollm2-135m-instruct]
                          [--budgets 32,64,128,256] [--questions 8] [--threads N] [--dtype bfloat16]

For each backend (llama.cpp, the default for the embedded GGUF, and transformers), times (1)
``generate_sweep`` over the budgets, (2) ``generate`` at the largest budget alone, and (3) one
``generate`` per budget (what running each setting separately costs), and checks that the sweep's
largest setting equals the run alone. The goal: sweep / largest <= 1.05 on transformers and <= 1.10
on llama.cpp. Also printed: the tokens the model was fed in each (the sweep's forks generate their
own answers: work a sweep cannot share) and the peak rows of the runner. Questions come from GSM8K
in ``--data-dir`` / ``$T0S1_DATA_DIR``, else fixed built-in questions.
"""

from __future__ import annotations

import argparse
import time

from t0s1 import BudgetForcing, generate, generate_sweep, load_model
from t0s1.models import EMBEDDED_MODEL

GOALS = {"transformers": 1.05, "llamacpp": 1.10}

FALLBACK_QUESTIONS = [
    "What is 12 + 35 * 2?",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "How many positive divisors does 36 have?",
    "If 3x + 5 = 20, what is x?",
    "What is the sum of the first 20 odd numbers?",
    "A rectangle has perimeter 30 and length 9. What is its area?",
    "What is 15% of 240?",
    "How many ways can 4 books be arranged on a shelf?",
]


def questions(count: int, data_dir: str | None) -> list[str]:
    try:
        from t0s1.evaluation.tasks import get_task, resolve_data_dir

        if resolve_data_dir(data_dir) is not None:
            return [e.prompt for e in get_task("gsm8k").load(data_dir, limit=count)]
    except Exception as error:  # the benchmark is optional here
        print(f"(GSM8K not available: {error}; using built-in questions)")
    return (FALLBACK_QUESTIONS * (count // len(FALLBACK_QUESTIONS) + 1))[:count]


class Counting:
    """Counts the tokens fed to the model's runners (prompts and steps) and their peak rows."""

    def __init__(self, lm):
        self.lm, self.new_runner = lm, lm.new_runner
        self.tokens = self.peak = 0
        lm.new_runner = self.wrap

    def wrap(self, **sizes):
        runner = self.new_runner(**sizes)
        add, step, release = runner.add, runner.step, runner.release
        rows = set()

        def counted_add(prompts):
            slots, logits = add(prompts)
            self.tokens += sum(len(p) for p in prompts)
            rows.update(slots)
            self.peak = max(self.peak, len(rows))
            return slots, logits

        def counted_step(slots, tokens):
            self.tokens += len(tokens)
            rows.update(slots)
            self.peak = max(self.peak, len(rows))
            return step(slots, tokens)

        def counted_release(slot):
            rows.discard(slot)
            return release(slot)

        runner.add, runner.step, runner.release = counted_add, counted_step, counted_release
        return runner

    def take(self) -> tuple[int, int]:
        counts = (self.tokens, self.peak)
        self.tokens = self.peak = 0
        return counts


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def timed_both(function) -> tuple[float, float, object]:
    """Wall seconds, and the CPU seconds of this process (steadier on a machine others load)."""
    cpu = time.process_time()
    seconds, value = timed(function)
    return seconds, time.process_time() - cpu, value


def bench(backend: str, args, prompts: list[str], budgets: list[int]) -> float:
    options = {"dtype": args.dtype} if backend == "transformers" and args.dtype else {}
    lm = load_model(args.model, device=args.device, backend=backend, **options)
    counting = Counting(lm)
    settings = [BudgetForcing(max_thinking_tokens=b, max_answer_tokens=args.max_answer_tokens) for b in budgets]
    generate(lm, prompts[:1], BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2))  # warm up
    counting.take()

    sweep_seconds, sweep_cpu, sweep = timed_both(lambda: generate_sweep(lm, prompts, settings))
    sweep_tokens, sweep_peak = counting.take()
    largest_seconds, largest_cpu, largest = timed_both(lambda: generate(lm, prompts, settings[-1]))
    largest_tokens, largest_peak = counting.take()
    same = all(sweep[i][-1].thinking_token_ids == largest[i].thinking_token_ids and sweep[i][-1].answer == largest[i].answer
               for i in range(len(prompts)))
    ratio = sweep_seconds / largest_seconds
    print(f"[{lm.backend}] model {lm.name} on {lm.device}{' as ' + args.dtype if options else ''}, {len(prompts)} questions, budgets {budgets}, "
          f"max_answer_tokens {args.max_answer_tokens}")
    print(f"[{lm.backend}] sweep of {len(budgets)} budgets: {sweep_seconds:.2f} s ({sweep_cpu:.2f} s CPU), "
          f"{sweep_tokens} tokens fed, peak {sweep_peak} rows")
    print(f"[{lm.backend}] largest budget alone:    {largest_seconds:.2f} s ({largest_cpu:.2f} s CPU), "
          f"{largest_tokens} tokens fed, peak {largest_peak} rows")
    print(f"[{lm.backend}] sweep / largest alone = {ratio:.2f} (goal <= {GOALS[lm.backend]:.2f}; CPU time "
          f"{sweep_cpu / largest_cpu:.2f}); tokens fed {sweep_tokens / largest_tokens:.2f}; largest setting identical: {same}")
    if not args.skip_separate:
        separate_seconds = 0.0
        for setting in settings:
            seconds, _ = timed(lambda setting=setting: generate(lm, prompts, setting))
            separate_seconds += seconds
        print(f"[{lm.backend}] one run per budget:      {separate_seconds:.2f} s  (separate / sweep = "
              f"{separate_seconds / sweep_seconds:.2f})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="both", choices=["both", "llamacpp", "transformers"])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--budgets", default="32,64,128,256")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-answer-tokens", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="weights of the transformers engine (default: the model's own; "
                        "bfloat16 runs on AMX units where the CPU has them)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of both backends (1 is fastest on a busy machine)")
    parser.add_argument("--skip-separate", action="store_true", help="do not time one run per budget")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # llama.cpp takes as many (t0s1.backends.llamacpp.default_threads)

    prompts = questions(args.questions, args.data_dir)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    backends = ["llamacpp", "transformers"] if args.backend == "both" else [args.backend]
    ratios = {backend: bench(backend, args, prompts, budgets) for backend in backends}
    print("sweep / largest alone: " + ", ".join(f"{b} {r:.2f} (goal <= {GOALS[b]:.2f})" for b, r in ratios.items()))


if __name__ == "__main__":
    main()
