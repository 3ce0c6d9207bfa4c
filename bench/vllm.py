"""Budget forcing inside ``vllm serve`` (t0s1's plugin): its cost, and what it gains over re-submission.

    python bench/vllm.py [--model smollm2-135m-instruct] [--requests 32] [--dtype float32]

Runs in an environment with vLLM and t0s1 installed (``.venv-vllm`` here: vLLM's CPU build).

(a) Plugin vs plain. One ``vllm serve MODEL --reasoning-parser t0s1`` on a free loopback port; the
    ``--requests`` chat requests with budgets and Waits (greedy, all at once) through the plugin,
    then the same number of plain requests (no budget field) that generate exactly as many tokens
    each (``max_tokens`` = the forced reply's ``completion_tokens``, ``ignore_eos``). Prints both
    tokens/s and their ratio (goal >= 0.9: forcing inside the engine costs almost nothing).
(b) Plugin vs ``--backend vllm`` (s1's re-submission: every Wait and every forced end is a new
    request on ``vllm.LLM``) on the same requests: both tokens/s, counted alike (the plugin's
    ``completion_tokens``), and whether the replies agree.

Bounded: at most 256 requests; each phase times out after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

QUESTIONS = [
    "How many r are in the word raspberry?",
    "What is 12 + 35 * 2?",
    "Is 91 a prime number?",
    "What is the capital of France?",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "What is the sum of the first ten positive integers?",
    "Name a mammal that can fly.",
    "What is 15% of 80?",
]
THINKING_BUDGETS = [32, 64, 96, 128]
NUM_IGNORES = [1, 2]
ANSWER_TOKENS = 32


def requests(count: int) -> list[tuple[str, dict]]:
    """(question, vllm_xargs): every request has Waits to inject, budgets differ."""
    return [
        (QUESTIONS[i % len(QUESTIONS)], {"max_thinking_tokens": THINKING_BUDGETS[i % len(THINKING_BUDGETS)],
                                         "num_ignore": NUM_IGNORES[i % len(NUM_IGNORES)], "max_answer_tokens": ANSWER_TOKENS})
        for i in range(count)
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, dtype: str, count: int, timeout: float, log: Path) -> tuple[subprocess.Popen, openai.OpenAI]:
    port = free_port()
    # The server module itself (what `vllm serve` runs): vLLM's CPU build ships a `vllm` command that
    # cannot find its own distribution. Eager mode on both sides: no start-up compilation.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype, "--max-num-seqs", str(count), "--max-model-len", "2048",
               "--reasoning-parser", "t0s1", "--enforce-eager"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"vllm serve exited:\n{log.read_text()[-3000:]}")
        try:
            client.models.list()
            return process, client
        except openai.APIConnectionError:
            time.sleep(1)
    process.kill()
    sys.exit(f"vllm serve did not start in {timeout} s")


def run_all(client: openai.OpenAI, model: str, bodies: list[tuple[str, dict, int]]) -> tuple[float, list]:
    """Send every (question, extra_body, max_tokens) at once; the wall time and the replies."""

    def one(item):
        question, body, max_tokens = item
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              temperature=0.0, max_tokens=max_tokens, extra_body=body)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(one, bodies))
    return time.perf_counter() - started, replies


def main() -> None:
    # This file is called vllm.py: keep its folder off the import path, so that `import vllm` is vLLM.
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on vLLM's CPU build (its default takes most memory)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model directory, or the embedded default")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if not 1 <= args.requests <= 256:
        sys.exit("--requests must be between 1 and 256")
    from t0s1.backends.vllm import _model_source

    model = _model_source(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    asked = requests(args.requests)

    print(f"(a) plugin vs plain vllm serve, {args.requests} concurrent greedy requests, {model}")
    process, client = start_server(model, args.dtype, args.requests, args.timeout, work / "serve.log")
    try:
        run_all(client, model, [(q, {"vllm_xargs": x}, 8) for q, x in asked[:4]])  # warm-up
        forced_seconds, forced = run_all(client, model, [(q, {"vllm_xargs": x}, 1000) for q, x in asked])
        counts = [reply.usage.completion_tokens for reply in forced]
        plain_seconds, plain = run_all(client, model, [(q, {"ignore_eos": True}, n) for (q, _), n in zip(asked, counts, strict=True)])
    finally:
        process.terminate()
        process.wait(60)
    assert [reply.usage.completion_tokens for reply in plain] == counts, "the plain requests did not generate as many tokens"
    tokens = sum(counts)
    forced_rate, plain_rate = tokens / forced_seconds, tokens / plain_seconds
    print(f"    plugin: {tokens} tokens in {forced_seconds:.1f} s = {forced_rate:.1f} tokens/s")
    print(f"    plain:  {tokens} tokens in {plain_seconds:.1f} s = {plain_rate:.1f} tokens/s")
    print(f"    ratio plugin / plain = {forced_rate / plain_rate:.2f} (goal >= 0.9)")

    print(f"(b) plugin vs --backend vllm (re-submission), the same {args.requests} requests with Waits")
    from t0s1 import BudgetForcing
    import vllm

    from t0s1.backends.vllm import VLLMBackend

    llm = vllm.LLM(model=model, dtype=args.dtype, enable_prefix_caching=True, enforce_eager=True, max_model_len=2048,
                   max_num_seqs=args.requests)
    try:
        backend = VLLMBackend(llm, model_name=model)
        settings = [BudgetForcing(max_thinking_tokens=x["max_thinking_tokens"], num_ignore=x["num_ignore"],
                                  max_answer_tokens=ANSWER_TOKENS) for _, x in asked]
        backend.generate([q for q, _ in asked[:4]], settings[:4])  # warm-up
        started = time.perf_counter()
        results = backend.generate([q for q, _ in asked], settings)
        resubmit_seconds = time.perf_counter() - started
    finally:
        llm.llm_engine.engine_core.shutdown()
    agree = sum((r.thinking or None, r.answer or None) == (getattr(f.choices[0].message, "reasoning", None), f.choices[0].message.content)
                for r, f in zip(results, forced, strict=True))
    print(f"    plugin:           {tokens} tokens in {forced_seconds:.1f} s = {forced_rate:.1f} tokens/s")
    print(f"    --backend vllm:   {tokens} tokens in {resubmit_seconds:.1f} s = {tokens / resubmit_seconds:.1f} tokens/s")
    print(f"    plugin / re-submission = {resubmit_seconds / forced_seconds:.2f}x; replies equal: {agree}/{len(results)}")


if __name__ == "__main__":
    main()
