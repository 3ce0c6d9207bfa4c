"""Cost of a prefix-sharing budget sweep against its largest budget alone.

    python bench/sweep.py [--model smollm2-135m-instruct] [--budgets 32,64,128,256] [--questions 8]

Times (1) ``generate_sweep`` over the budgets, (2) ``generate`` at the largest budget alone, and
(3) one ``generate`` per budget (what running each setting separately costs). Prints the ratios;
the goal is sweep / largest <= 1.25, where separate runs cost about the sum of the budgets.
Questions come from GSM8K in ``--data-dir`` / ``$T0S1_DATA_DIR``, else fixed built-in questions.
"""

from __future__ import annotations

import argparse
import time

from t0s1 import BudgetForcing, generate, generate_sweep, load_model
from t0s1.models import EMBEDDED_MODEL

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


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--budgets", default="32,64,128,256")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-answer-tokens", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--skip-separate", action="store_true", help="do not time one run per budget")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    lm = load_model(args.model, device=args.device)
    prompts = questions(args.questions, args.data_dir)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    settings = [BudgetForcing(max_thinking_tokens=b, max_answer_tokens=args.max_answer_tokens) for b in budgets]
    generate(lm, prompts[:1], BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2))  # warm up

    sweep_seconds, sweep = timed(lambda: generate_sweep(lm, prompts, settings))
    largest_seconds, largest = timed(lambda: generate(lm, prompts, settings[-1]))
    same = all(sweep[i][-1].thinking_token_ids == largest[i].thinking_token_ids and sweep[i][-1].answer == largest[i].answer for i in range(len(prompts)))
    print(f"model {lm.name} on {lm.device}, {len(prompts)} questions, budgets {budgets}, max_answer_tokens {args.max_answer_tokens}")
    print(f"sweep of {len(budgets)} budgets: {sweep_seconds:.2f} s")
    print(f"largest budget alone:    {largest_seconds:.2f} s")
    print(f"sweep / largest alone = {sweep_seconds / largest_seconds:.2f} (goal <= 1.25); largest setting identical: {same}")
    if not args.skip_separate:
        separate_seconds = 0.0
        for setting in settings:
            seconds, _ = timed(lambda setting=setting: generate(lm, prompts, setting))
            separate_seconds += seconds
        print(f"one run per budget:      {separate_seconds:.2f} s  (separate / sweep = {separate_seconds / sweep_seconds:.2f})")


if __name__ == "__main__":
    main()
