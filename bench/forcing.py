"""Speed of the budget forcing engine against plain ``model.generate`` on the embedded model.

Prints
  (a) budget-forced time per generated token / plain ``model.generate`` time per token, for the
      same number of generated tokens (512-token thinking budget, 4 Wait injections), at batch 1
      and batch 8 (goal <= 1.05: interventions cost nothing beyond their tokens);
  (b) batch-8 tokens/s / batch-1 tokens/s of the engine (goal >= 4).

    python bench/forcing.py [--budget 512] [--num-ignore 4] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from t0s1 import BudgetForcing, generate, load_model
from t0s1.forcing import render_prompt

# Prompts on which SmolLM2 thinks through the whole 512-token budget, several of them after one or
# more injected "Wait"s (the first alone is the batch-1 case): the timings then cover many tokens
# and real interventions rather than a few tokens and the prompt's encoding.
PROMPTS = [
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "What is 15% of 240?",
    "Prove that the square root of 2 is irrational.",
    "What is the derivative of x^3 sin(x)? Show all steps.",
    "Explain step by step how to solve 3x + 7 = 25, checking every step.",
    "Write a long, detailed essay about the history of mathematics.",
    "Describe in detail how a computer works, from transistors to operating systems.",
    "Tell me a long story about a dragon and a knight.",
]


def time_engine(lm, prompts, settings):
    start = time.perf_counter()
    results = generate(lm, prompts, settings)
    seconds = time.perf_counter() - start
    tokens = sum(r.thinking_tokens + len(r.answer_token_ids) for r in results)
    return seconds, tokens, results


@torch.inference_mode()
def time_plain_generate(lm, prompts, new_tokens_per_prompt):
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(render_prompt(lm, p).ids) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    start = time.perf_counter()
    out = lm.model.generate(
        **batch,
        max_new_tokens=new_tokens_per_prompt,
        min_new_tokens=new_tokens_per_prompt,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    seconds = time.perf_counter() - start
    return seconds, (out.shape[1] - batch.input_ids.shape[1]) * len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--num-ignore", type=int, default=4)
    # A short answer cap: rows that end their answers at different times leave the batch one by one,
    # and that tail (run at a smaller batch) is not what (a) measures.
    parser.add_argument("--max-answer-tokens", type=int, default=16)
    args = parser.parse_args()

    lm = load_model(args.model, backend="transformers")  # compared with transformers generate()
    settings = BudgetForcing(
        max_thinking_tokens=args.budget, num_ignore=args.num_ignore, max_answer_tokens=args.max_answer_tokens
    )
    generate(lm, PROMPTS[:2], BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4))  # warm-up
    time_plain_generate(lm, PROMPTS[:2], 8)

    rates = {}
    print(f"model {args.model}, device {lm.device}, torch threads {torch.get_num_threads()}")
    print(f"budget {args.budget} thinking tokens, num_ignore {args.num_ignore}, max_answer_tokens {args.max_answer_tokens}")
    for batch in (1, 8):
        prompts = PROMPTS[:batch]
        engine_seconds, engine_tokens, results = time_engine(lm, prompts, settings)
        plain_seconds, plain_tokens = time_plain_generate(lm, prompts, math.ceil(engine_tokens / batch))
        per_token_ratio = (engine_seconds / engine_tokens) / (plain_seconds / plain_tokens)
        rates[batch] = engine_tokens / engine_seconds
        waits = sum(r.num_ignored for r in results)
        print(
            f"batch {batch}: engine {engine_tokens} tokens in {engine_seconds:.1f} s ({rates[batch]:.1f} tok/s, "
            f"{waits} Waits injected, {sum(r.hit_budget for r in results)}/{batch} hit the budget); "
            f"model.generate {plain_tokens} tokens in {plain_seconds:.1f} s ({plain_tokens / plain_seconds:.1f} tok/s)"
        )
        print(f"(a) batch {batch}: budget-forced / plain generate time per token = {per_token_ratio:.3f} (goal <= 1.05)")
    print(f"(b) batch-8 tokens/s / batch-1 tokens/s = {rates[8] / rates[1]:.2f} (goal >= 4)")


if __name__ == "__main__":
    main()
