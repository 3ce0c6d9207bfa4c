"""Load test of ``t0s1 serve`` on loopback: throughput under concurrent requests, and the time to
first token of a short request that arrives while long ones run.

    python bench/serve_load.py [--requests 32] [--max-batch 8] [--tries 20] [--model smollm2-135m-instruct]

1. Throughput. The engine alone generates ``--requests`` chat requests (each with its own budget)
   in batches of ``--max-batch``: its batched tokens/s. Then the server runs in this process on a
   free 127.0.0.1 port and all requests are sent at once with the official ``openai`` client
   (every other one streamed). Prints requests/s, p50/p95 latency, and served / engine tokens/s
   (goal >= 0.9); every reply is checked against the engine's.
2. Time to first token (TTFT). A short streamed request on the idle server, ``--tries`` times;
   then the same request while ``--max-batch - 1`` long requests keep the batch full (each one
   replaced as soon as it ends). Prints the p50 of both and their ratio (goal <= 3: continuous
   batching lets the short request join at the next decode step instead of waiting for the batch).

Bounded: at most ``--requests`` requests (<= 256), ``--tries`` <= 100, ``--timeout`` seconds per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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

SHORT = ([{"role": "user", "content": "What is 2 + 2?"}], BudgetForcing(max_thinking_tokens=16, max_answer_tokens=8))
LONG = ([{"role": "user", "content": "Write a long, detailed essay about the history of mathematics."}],
        BudgetForcing(max_thinking_tokens=400, num_ignore=8, max_answer_tokens=32))


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


def extra_body(budget: BudgetForcing) -> dict:
    return {"max_thinking_tokens": budget.max_thinking_tokens, "num_ignore": budget.num_ignore}


async def one_request(client: AsyncOpenAI, messages, budget: BudgetForcing, stream: bool):
    """(latency, time to first token, budget_forcing, (thinking, answer)) of one chat request."""
    started = time.perf_counter()
    first = None
    if not stream:
        reply = await client.chat.completions.create(
            model="bench", messages=messages, max_tokens=budget.max_answer_tokens, extra_body=extra_body(budget)
        )
        forcing = reply.model_extra["budget_forcing"]
        text = (reply.choices[0].message.reasoning_content, reply.choices[0].message.content)
    else:
        thinking, answer, forcing = [], [], None
        chunks = await client.chat.completions.create(
            model="bench", messages=messages, max_tokens=budget.max_answer_tokens, extra_body=extra_body(budget), stream=True
        )
        async for chunk in chunks:
            for choice in chunk.choices:
                delta = (getattr(choice.delta, "reasoning_content", None) or "", choice.delta.content or "")
                if first is None and any(delta):
                    first = time.perf_counter() - started
                thinking.append(delta[0])
                answer.append(delta[1])
            forcing = (chunk.model_extra or {}).get("budget_forcing") or forcing
        text = ("".join(thinking), "".join(answer))
    return time.perf_counter() - started, first, forcing, text


async def load(url: str, work, timeout: float):
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout) as client:
        started = time.perf_counter()
        tasks = [one_request(client, m, b, stream=i % 2 == 1) for i, (m, b) in enumerate(work)]
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        return outcomes, time.perf_counter() - started


async def first_tokens(url: str, tries: int, background: int, timeout: float) -> tuple[list[float], int]:
    """TTFT of the short request, ``tries`` times, one after another, while ``background`` long
    requests run (each replaced as soon as it ends). Also: how many tries had the batch full."""
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout) as client:
        stop = asyncio.Event()
        running = [0]

        async def keep_running() -> None:
            while not stop.is_set():
                running[0] += 1
                try:
                    await one_request(client, *LONG, stream=False)
                finally:
                    running[0] -= 1

        keepers = [asyncio.create_task(keep_running()) for _ in range(background)]
        try:
            while background and running[0] < background:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0 if background else 0)  # the long ones are past their prefill
            times, full = [], 0
            for _ in range(tries):
                full += running[0] == background
                _, first, _, _ = await asyncio.wait_for(one_request(client, *SHORT, stream=True), timeout)
                times.append(first)
            return times, full
        finally:
            stop.set()
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--tries", type=int, default=20, help="short requests timed for the TTFT (p50)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for each phase")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", help="auto, transformers or llamacpp (as t0s1 serve --backend)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--skip-throughput", action="store_true", help="only the time to first token")
    args = parser.parse_args()
    if not 1 <= args.requests <= 256:
        parser.error("--requests must be between 1 and 256")
    if not 1 <= args.tries <= 100:
        parser.error("--tries must be between 1 and 100")
    if args.max_batch < 2:
        parser.error("--max-batch must be at least 2 (a long batch and the short request)")

    lm = load_model(args.model, device=args.device, backend=args.backend)
    if args.threads:
        torch.set_num_threads(args.threads)
    generate(lm, ["Warm up."], BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2))
    print(f"{lm.name} on {lm.backend} ({lm.device}), {torch.get_num_threads()} torch threads, max batch {args.max_batch}")
    failures = []

    if not args.skip_throughput:
        work = requests(args.requests)
        engine_rate, expected, engine_seconds = engine_baseline(lm, work, args.max_batch)
        print(f"engine alone : {len(work)} requests in batches of {args.max_batch}: {engine_seconds:.2f} s, "
              f"{engine_rate:.1f} tokens/s")
        app = create_app(lm, BudgetForcing(), max_batch=args.max_batch)
        with serve_in_background(app, "127.0.0.1", 0) as url:
            outcomes, seconds = asyncio.run(load(url, work, args.timeout))
            stats = app.state.batcher.stats.to_dict()
        same = 0
        for i, ((_, _, forcing, text), (_, budget), result) in enumerate(zip(outcomes, work, expected, strict=True)):
            if forcing is None or forcing["thinking_tokens"] > budget.max_thinking_tokens:
                failures.append(f"request {i}: thinking over its budget {budget.max_thinking_tokens}: {forcing}")
            elif forcing["num_ignored"] > budget.num_ignore or forcing["answer_tokens"] > budget.max_answer_tokens:
                failures.append(f"request {i}: settings not respected: {forcing}")
            same += text == (result.thinking, result.answer)
        latencies = [latency for latency, _, _, _ in outcomes]
        tokens = sum(f["thinking_tokens"] + f["answer_tokens"] for _, _, f, _ in outcomes if f)
        served_rate = tokens / seconds
        print(f"served       : {len(outcomes)} concurrent requests ({len(work) // 2} streamed) in {seconds:.2f} s, "
              f"{len(outcomes) - len(failures)} within their own budgets")
        print(f"requests/s   : {len(outcomes) / seconds:.2f}")
        print(f"latency      : p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s")
        print(f"tokens/s     : served {served_rate:.1f} / engine batched {engine_rate:.1f} = "
              f"{served_rate / engine_rate:.2f} (goal >= 0.9)")
        print(f"server       : {stats['prefills']} prefills, {stats['steps']} steps, largest batch "
              f"{stats['largest_batch']}, engine busy {stats['busy_seconds']:.2f} s of {seconds:.2f} s")
        print(f"replies      : {same}/{len(work)} identical to the engine alone")

    app = create_app(lm, BudgetForcing(), max_batch=args.max_batch)
    with serve_in_background(app, "127.0.0.1", 0) as url:
        idle, _ = asyncio.run(first_tokens(url, args.tries, 0, args.timeout))
        busy, full = asyncio.run(first_tokens(url, args.tries, args.max_batch - 1, args.timeout))
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    print(f"TTFT idle    : p50 {idle_p50 * 1000:.0f} ms over {len(idle)} tries (short request alone)")
    print(f"TTFT busy    : p50 {busy_p50 * 1000:.0f} ms over {len(busy)} tries, {full} of them with "
          f"{args.max_batch - 1} long requests running")
    print(f"TTFT ratio   : busy / idle = {busy_p50 / idle_p50:.2f} (goal <= 3)")
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
