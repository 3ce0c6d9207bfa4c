"""What one more row of a batch costs on each engine: the decode step of the llama.cpp runner
(one or more GGUF files) and of the transformers engine (float32 and bfloat16), at several batch
sizes and two cache lengths.

A budget sweep, parallel samples and probes all add rows to the steps of a batch; whether they are
nearly free (a step bound by reading the weights) or cost as much as the first row (a step bound by
arithmetic) decides what forks cost (docs/budget-forcing.md, Sweeps) and which engine wins for
batched work on a CPU (docs/llamacpp.md, Speed). Prints, per engine and cache length, the
milliseconds of one step and the row-tokens per second at each batch size (best of ``--repeats``,
greedy, ``--tokens`` steps after a prefill of ``--context`` tokens per row).

    python bench/rows.py [--gguf FILE ...] [--model DIR] [--rows 1,8,20,64] [--context 40,300] [--threads 2]

Without ``--gguf`` the embedded Q4_1 GGUF is timed; without ``--model`` the embedded model's
safetensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from llamacpp import time_runner  # bench/llamacpp.py

from t0s1 import load_model
from t0s1.models import EMBEDDED_MODEL, embedded_gguf_path


def rates(lm, rows_list: list[int], context: int, tokens: int, repeats: int) -> list[tuple[int, float]]:
    """(rows, seconds per step) for each batch size, prompts of ``context`` ids."""
    prompt = [100 + i % 1000 for i in range(context)]
    out = []
    for rows in rows_list:
        runner = lm.new_runner(rows=rows, length=context + tokens + 1)
        seconds = min(time_runner(runner, [list(prompt)] * rows, tokens) for _ in range(repeats))
        runner.close()
        out.append((rows, seconds / tokens))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", nargs="*", default=None, help="GGUF files for llama.cpp (default: the embedded one)")
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model for the transformers engine")
    parser.add_argument("--rows", default="1,8,20,64")
    parser.add_argument("--context", default="40,300", help="prompt tokens per row (the cache each step attends to)")
    parser.add_argument("--tokens", type=int, default=16, help="steps timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    rows_list = [int(r) for r in args.rows.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    engines = [(f"llama.cpp {Path(path).name}", lambda path=path: load_model(path, backend="llamacpp"))
               for path in (args.gguf or [str(embedded_gguf_path())])]
    engines += [(f"transformers {dtype}", lambda dtype=dtype: load_model(args.model, dtype=dtype, backend="transformers"))
                for dtype in ("float32", "bfloat16")]
    print(f"{args.threads} threads, {args.tokens} steps, best of {args.repeats}: ms per step (row-tokens/s)")
    print("| engine | cache | " + " | ".join(f"{rows} rows" for rows in rows_list) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in rows_list) + " |")
    for name, load in engines:
        lm = load()
        for context in contexts:
            with torch.inference_mode():
                timed = rates(lm, rows_list, context, args.tokens, args.repeats)
            cells = " | ".join(f"{1000 * s:.1f} ({rows / s:.0f})" for rows, s in timed)
            print(f"| {name} | {context} | {cells} |", flush=True)
        if hasattr(lm.model, "close"):
            lm.model.close()


if __name__ == "__main__":
    main()
