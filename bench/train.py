"""Training speed and memory of the quickstart recipe: LoRA (the recipe's default) vs full fine-tuning.

    python bench/train.py [--steps 20] [--tokens 480]

Each setting runs in its own process (so peak RSS is its own) on the embedded SmolLM2-135M-Instruct,
with s1K-format examples of about ``--tokens`` tokens each. Prints tokens/s (trained sequences,
prompt included, from TRL's ``num_tokens`` over the training time), seconds per step, peak RSS,
and the LoRA / full ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "lora": [],
    "full": ["--use_peft", "false", "--merge_lora", "false", "--learning_rate", "2e-5"],  # same recipe otherwise
}


def sample_rows(count: int, tokens: int) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = 12 + 7 * i, 30 + 3 * i
        step = f"Let me check {a} + {b} again: {a} plus {b} is {a + b}. Wait, recount the tens and the units. "
        rows.append(
            {
                "question": f"What is {a} + {b}?",
                "thinking_trajectories": [step * max(1, tokens // 30)],
                "attempt": f"The sum is {a + b}.",
                "solution": str(a + b),
                "cot_type": "math",
                "source_type": "synthetic",
                "metadata": "{}",
                "cot": None,
            }
        )
    return rows


def worker(setting: str, data: str, out: str, steps: int, max_length: int) -> None:
    from t0s1.training.sft import main

    length = ["--max_length", str(max_length)] if max_length else []
    trainer = main(
        ["quickstart", "--dataset_name", data, "--output_dir", out, "--max_steps", str(steps), *length,
         "--save_strategy", "no", "--logging_steps", "1", *SETTINGS[setting]]
    )
    history = trainer.state.log_history
    tokens = max(float(entry["num_tokens"]) for entry in history if "num_tokens" in entry)
    runtime = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print("BENCH " + json.dumps({
        "setting": setting, "steps": steps, "tokens": tokens, "seconds": runtime,
        "tokens_per_second": tokens / runtime, "seconds_per_step": runtime / steps,
        "peak_rss_mb": peak_rss_mb, "trainable_parameters": trainable,
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=480, help="approximate tokens per example")
    parser.add_argument("--max-length", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--settings", default="lora,full")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.out, args.steps, args.max_length)
        return

    from t0s1.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "s1k.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in sample_rows(16, args.tokens)))
        report = prepare(str(source), "smollm2-135m-instruct", Path(tmp) / "data")
        print(f"data: {report.rows_out} examples, tokens per example {report.token_lengths}")
        results = {}
        for setting in args.settings.split(","):
            command = [sys.executable, __file__, "--worker", setting, "--data", str(Path(tmp) / "data"),
                       "--out", str(Path(tmp) / setting), "--steps", str(args.steps)]
            if args.max_length:
                command += ["--max-length", str(args.max_length)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
            if done.returncode != 0 or not lines:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{setting} failed")
            results[setting] = json.loads(lines[-1][len("BENCH "):])

    threads = os.environ.get("OMP_NUM_THREADS", "torch default")
    print(f"\nquickstart recipe, {args.steps} steps, batch from the recipe, max_length {args.max_length or 'from the recipe'}, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}")
    print(f"{'setting':8} {'tokens/s':>10} {'s/step':>8} {'peak RSS MB':>12} {'trainable params':>17}")
    for name, r in results.items():
        print(f"{name:8} {r['tokens_per_second']:10.1f} {r['seconds_per_step']:8.2f} {r['peak_rss_mb']:12.0f} "
              f"{r['trainable_parameters']:17,}")
    if {"lora", "full"} <= set(results):
        lora, full = results["lora"], results["full"]
        print(f"LoRA / full: tokens/s x{lora['tokens_per_second'] / full['tokens_per_second']:.2f}, "
              f"peak RSS x{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
