"""Size and decode speed of each GGUF quant type of one model (``t0s1 export``), on llama.cpp.

For each ``--quants`` type: the export's seconds and file size, then tokens/s (best of
``--repeats``) of
  (a) greedy decoding at batch 1 on the llama.cpp runner (``LlamaCppRunner.step``, argmax in
      torch; ``--tokens`` tokens after the prompt): the decode speed of the weights;
  (b) budget forcing through the llama.cpp backend at batch 1 (``--tokens`` thinking budget, 4
      Waits, as bench/forcing.py), the whole call, prompt included.

    python bench/export.py runs/quickstart/model [--quants f16,q8_0,q4_k_m] [--tokens 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from forcing import PROMPTS as QUESTIONS  # bench/forcing.py: prompts that fill long budgets
from llamacpp import time_runner  # bench/llamacpp.py

from t0s1 import BudgetForcing, generate, load_model
from t0s1.export import export_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--quants", default="f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    question = QUESTIONS[0]
    budget = BudgetForcing(max_thinking_tokens=args.tokens, num_ignore=4, max_answer_tokens=1)
    print(f"{args.model_dir}: {args.tokens} tokens, {args.threads} threads, best of {args.repeats}")
    print("| type | size (MB) | export (s) | greedy decoding, batch 1 (tokens/s) | budget forcing, batch 1 (tokens/s) |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        for quant in args.quants.split(","):
            path = Path(work) / f"model.{quant}.gguf"
            exported = export_gguf(args.model_dir, path, quant, threads=args.threads, log=lambda _: None)
            lm = load_model(str(path), backend="llamacpp")
            ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
            runner = lm.new_runner(rows=1, length=len(ids) + args.tokens + 1)
            loop = min(time_runner(runner, [list(ids)], args.tokens) for _ in range(args.repeats))
            runner.close()
            forcing = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                (result,) = generate(lm, [question], budget)
                forcing.append((result.thinking_tokens + result.answer_tokens) / (time.perf_counter() - start))
            print(f"| {quant} | {exported.size_bytes / 1e6:.0f} | {exported.seconds:.0f} | {args.tokens / loop:.1f} | {max(forcing):.1f} |",
                  flush=True)
            lm.model.close()
            path.unlink()


if __name__ == "__main__":
    main()
