"""Decode speed of llama.cpp on the embedded GGUF: llama.cpp's own greedy loop, the llama.cpp runner,
and budget forcing through the llama.cpp backend against the transformers engine.

Prints tokens/s (best of ``--repeats``) of
  (a) llama-cpp-python's ``Llama.generate`` greedy loop at batch 1 (sampling inside llama.cpp);
  (b) ``LlamaCppRunner.step`` with argmax in torch at batch 1, and its ratio to (a) (the runner's
      overhead: logits copied to torch, the Python loop);
  (c) the same at batch 8 (8 sequences per ``llama_decode``), and its ratio to (b);
  (d) budget forcing through the llama.cpp backend at batch 1 (``--tokens`` thinking budget, 4
      Waits, as bench/forcing.py), the whole call (prompt included), and its ratio to llama.cpp's
      own loop making as many tokens from the same prompt, prompt included (goal >= 0.9);
  (e) the same through the transformers engine (float32 PyTorch), and (d)/(e) (goal >= 4).

    python bench/llamacpp.py [--tokens 256] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from llama_cpp import Llama
from transformers import AutoTokenizer

from forcing import PROMPTS as QUESTIONS  # bench/forcing.py: prompts that fill long budgets
from forcing import time_engine

from t0s1 import BudgetForcing, load_model
from t0s1.backends.llamacpp import LlamaCppModel, LlamaCppRunner, load_llamacpp
from t0s1.models import EMBEDDED_MODEL, embedded_gguf_path


def prompt_ids(gguf, llama: Llama) -> list[list[int]]:
    """The questions in the model's chat template, as llama.cpp ids."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return [llama.tokenize(text.encode(), add_bos=False, special=True) for text in texts]


def time_llama_generate(llama: Llama, prompt: list[int], tokens: int, *, with_prompt: bool = False) -> float:
    """Seconds for ``tokens`` greedy tokens of llama.cpp's own loop (prompt evaluation excluded
    unless ``with_prompt``)."""
    llama.reset()
    start = time.perf_counter()
    generator = llama.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0)
    next(generator)  # evaluates the prompt and samples the first token
    if not with_prompt:
        start = time.perf_counter()
    for _ in range(tokens - with_prompt):
        next(generator)
    seconds = time.perf_counter() - start
    generator.close()
    return seconds


def time_runner(runner: LlamaCppRunner, prompts: list[list[int]], tokens: int) -> float:
    """Seconds for ``tokens`` greedy steps of every prompt at once (prefill excluded)."""
    slots, logits = runner.add(prompts)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = runner.step(slots, logits.argmax(dim=-1).tolist())
    seconds = time.perf_counter() - start
    for slot in slots:
        runner.release(slot)
    return seconds


def best_rate(measure, tokens: int, repeats: int) -> float:
    return max(tokens / measure() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="tokens generated per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # argmax only; llama.cpp has the cores

    gguf = embedded_gguf_path()
    context = 512 + args.tokens
    llama = Llama(str(gguf), n_ctx=context, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    prompts = prompt_ids(gguf, llama)
    model = LlamaCppModel(gguf)
    runner = LlamaCppRunner(model, context_length=context, max_slots=len(prompts), n_threads=args.threads)
    try:
        time_llama_generate(llama, prompts[0], 8)  # warm-up
        time_runner(runner, prompts[:1], 8)
        raw = best_rate(lambda: time_llama_generate(llama, prompts[0], args.tokens), args.tokens, args.repeats)
        single = best_rate(lambda: time_runner(runner, prompts[:1], args.tokens), args.tokens, args.repeats)
        batch = len(prompts)
        batched = best_rate(lambda: time_runner(runner, prompts, args.tokens), args.tokens * batch, args.repeats)
        settings = BudgetForcing(max_thinking_tokens=args.tokens, num_ignore=4, max_answer_tokens=16)
        gguf_lm = load_llamacpp(EMBEDDED_MODEL, n_threads=args.threads)
        forced, made = best_engine_rate(gguf_lm, settings, args.repeats)
        raw_whole = best_rate(lambda: time_llama_generate(llama, prompts[0], made, with_prompt=True), made, args.repeats)
    finally:
        runner.close()
        model.close()
        llama.close()
    print(f"embedded GGUF ({gguf.name}), {args.threads} threads, {args.tokens} tokens per sequence, best of {args.repeats}")
    print(f"(a) llama.cpp greedy loop, batch 1:  {raw:7.1f} tokens/s")
    print(f"(b) runner step loop, batch 1:       {single:7.1f} tokens/s  (b)/(a) = {single / raw:.2f}")
    print(f"(c) runner step loop, batch {batch}:       {batched:7.1f} tokens/s  (c)/(b) = {batched / single:.2f}")

    torch.set_num_threads(args.threads)
    torch_lm = load_model(EMBEDDED_MODEL, device="cpu", backend="transformers")
    engine, _ = best_engine_rate(torch_lm, settings, args.repeats)
    print(f"(d) budget forcing, llama.cpp, batch 1: {forced:5.1f} tokens/s ({made} tokens, prompt included); "
          f"llama.cpp's own loop on them: {raw_whole:5.1f} tokens/s; ratio {forced / raw_whole:.2f} (goal >= 0.9)")
    print(f"(e) budget forcing, transformers:       {engine:5.1f} tokens/s  (d)/(e) = {forced / engine:.2f}  (goal >= 4)")


def best_engine_rate(lm, settings: BudgetForcing, repeats: int) -> tuple[float, int]:
    """(generated tokens/s, tokens generated) of budget forcing on the first question (batch 1),
    the whole call, best of ``repeats``."""
    time_engine(lm, [QUESTIONS[0]], BudgetForcing(max_thinking_tokens=8, max_answer_tokens=2))  # warm-up
    best, made = 0.0, 0
    for _ in range(repeats):
        seconds, tokens, _ = time_engine(lm, [QUESTIONS[0]], settings)
        best, made = max(best, tokens / seconds), tokens
    return best, made


if __name__ == "__main__":
    main()
