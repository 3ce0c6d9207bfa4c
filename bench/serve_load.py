"""Load test of ``t0s1 serve``: concurrent chat requests, each with its own budget, on loopback.

    python bench/serve_load.py [--requests 32] [--max-batch 8] [--model smollm2-135m-instruct]

First the engine alone generates the same requests in batches of ``--max-batch`` (its batched
tokens/s). Then the server runs in this process on a free 127.0.0.1 port and all requests are
sent at once with the official ``openai`` client (every other one streamed). Prints requests/s,
p50/p95 latency, served tokens/s and the ratio served / engine tokens/s (goal >= 0.8). Bounded:
at most ``--requests`` requests (<= 256) and ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time

import torch
from openai import AsyncOpenAI

from t0s1 import EMBEDDED_MODEL, BudgetForcing, generate, load_model
from t0s1.serving.server import create_app, serve_in_background

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
THINKING_BUDGETS = [16, 32, 48, 64]
NUM_IGNORES = [0, 1, 2]
ANSWER_TOKENS = 24


def requests(count: int) -> list[tuple[list[dict], BudgetForcing]]:
    """(messages, budget) per request: questions and budgets vary from one request to the next."""
    out = []
    for i in range(count):
        budget = BudgetForcing(
            max_thinking_tokens=THINKING_BUDGETS[i % len(THINKING_BUDGETS)],
            num_ignore=NUM_IGNORES[i % len(NUM_IGNORES)],
            max_answer_tokens=ANSWER_TOKENS,
        )
        out.append(([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], budget))
    return out


def engine_baseline(lm, work, max_batch: int):
    """The engine's own batched throughput on the same requests: (tokens/s, results, seconds).

    It runs in a worker thread, as in the server: on a busy CPU, PyTorch's thread pool driven from
    the main thread can be many times slower than from another thread, which would flatter the server.
    """
    results = []

    def run() -> None:
        for start in range(0, len(work), max_batch):
            chunk = work[start : start + max_batch]
            results.extend(generate(lm, [m for m, _ in chunk], [b for _, b in chunk]))

    started = time.perf_counter()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    seconds = time.perf_counter() - started
    tokens = sum(r.thinking_tokens + r.answer_tokens for r in results)
    return tokens / seconds, results, seconds


async def one_request(client: AsyncOpenAI, messages, budget: BudgetForcing, stream: bool):
    extra = {"max_thinking_tokens": budget.max_thinking_tokens, "num_ignore": budget.num_ignore}
    started = time.perf_counter()
    if not stream:
        reply = await client.chat.completions.create(
            model="bench", messages=messages, max_tokens=budget.max_answer_tokens, extra_body=extra
        )
        forcing = reply.model_extra["budget_forcing"]
        text = (reply.choices[0].message.reasoning_content, reply.choices[0].message.content)
    else:
        thinking, answer, forcing = [], [], None
        chunks = await client.chat.completions.create(
            model="bench", messages=messages, max_tokens=budget.max_answer_tokens, extra_body=extra, stream=True
        )
        async for chunk in chunks:
            for choice in chunk.choices:
                thinking.append(getattr(choice.delta, "reasoning_content", None) or "")
                answer.append(choice.delta.content or "")
            forcing = (chunk.model_extra or {}).get("budget_forcing") or forcing
        text = ("".join(thinking), "".join(answer))
    return time.perf_counter() - started, forcing, text


async def load(url: str, work, timeout: float):
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout) as client:
        started = time.perf_counter()
        tasks = [one_request(client, m, b, stream=i % 2 == 1) for i, (m, b) in enumerate(work)]
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        return outcomes, time.perf_counter() - started


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole load phase")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    args = parser.parse_args()
    if not 1 <= args.requests <= 256:
        parser.error("--requests must be between 1 and 256")

    lm = load_model(args.model, device=args.device)
    work = requests(args.requests)
    if args.threads:
        torch.set_num_threads(args.threads)
    generate(lm, ["Warm up."], BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2))

    engine_rate, expected, engine_seconds = engine_baseline(lm, work, args.max_batch)
    print(f"engine alone : {len(work)} requests in batches of {args.max_batch} ({lm.device}, "
          f"{torch.get_num_threads()} threads): {engine_seconds:.2f} s, "
          f"{engine_rate:.1f} tokens/s")

    app = create_app(lm, BudgetForcing(), max_batch=args.max_batch)
    with serve_in_background(app, "127.0.0.1", 0) as url:
        outcomes, seconds = asyncio.run(load(url, work, args.timeout))
        stats = app.state.batcher.stats.to_dict()

    failures = []
    same = 0
    for i, ((_, forcing, text), (_, budget), result) in enumerate(zip(outcomes, work, expected, strict=True)):
        if forcing is None or forcing["thinking_tokens"] > budget.max_thinking_tokens:
            failures.append(f"request {i}: thinking over its budget {budget.max_thinking_tokens}: {forcing}")
        elif forcing["num_ignored"] > budget.num_ignore or forcing["answer_tokens"] > budget.max_answer_tokens:
            failures.append(f"request {i}: settings not respected: {forcing}")
        same += text == (result.thinking, result.answer)
    latencies = [latency for latency, _, _ in outcomes]
    tokens = sum(f["thinking_tokens"] + f["answer_tokens"] for _, f, _ in outcomes if f)
    served_rate = tokens / seconds
    print(f"served       : {len(outcomes)} concurrent requests ({len(work) // 2} streamed) in {seconds:.2f} s, "
          f"{len(outcomes) - len(failures)} within their own budgets")
    print(f"requests/s   : {len(outcomes) / seconds:.2f}")
    print(f"latency      : p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s")
    print(f"tokens/s     : served {served_rate:.1f} / engine batched {engine_rate:.1f} = "
          f"{served_rate / engine_rate:.2f} (goal >= 0.8)")
    print(f"server       : {stats['batches']} batches (largest {stats['largest_batch']}), engine busy "
          f"{stats['busy_seconds']:.2f} s of {seconds:.2f} s")
    print(f"replies      : {same}/{len(work)} identical to the engine alone")
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
