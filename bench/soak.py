"""Soak test of ``t0s1 serve`` on loopback: many mixed requests, then the server's memory, its
errors, and whether load changed any greedy reply.

    python bench/soak.py [--requests 2000] [--concurrency 16] [--warmup 200] [--time-limit 1800]
    python bench/soak.py --url http://127.0.0.1:8000 [--pid PID]    # a server already running

Without ``--url`` it starts ``t0s1 serve`` on the embedded model (``--model``) on a free
127.0.0.1 port, and stops it at the end. ``--requests`` requests are sent by ``--concurrency``
clients at once, in a fixed shuffled order (``--seed``), drawn from these kinds:

- ``chat``, ``chat-stream``, ``completion``, ``completion-stream``: greedy requests from a small
  pool (each pool entry recurs many times), non-streamed and streamed;
- ``continuation``: a plain continuation (``/v1/completions`` with ``stop``), greedy;
- ``sampled``: a chat request at temperature 0.8 with its own seed;
- ``cancel-stream``: a stream closed by the client after its first text; ``cancel-wait``: a
  non-streamed request abandoned after a fraction of a second;
- ``malformed``: bodies the server must refuse with a 4xx (bad JSON, wrong types, unknown budget
  fields, out-of-range values, ids outside the vocabulary, ...);
- ``huge``: a distinct string of ``--huge-bytes`` (1 MB) in a field (``end_phrase``,
  ``answer_prefix``, ``ignore_str``, ``stop``, the message, the prompt): a 4xx, and nothing kept.

Goals (exit status 1 if one is missed):

- the server's RSS grows by at most 10% between the end of the warm-up (the first ``--warmup``
  requests) and the end; it is also printed at the start;
- no 5xx reply (and no error event inside a stream, no dropped connection);
- every greedy reply under load equals the same request run alone on the idle server afterwards
  (the last 10% of ``--time-limit`` is kept for those; each is also run in the other mode, and a
  streamed reply must equal the whole one);
- every request gets the status its kind expects (2xx, or a 4xx for malformed and huge ones), and
  the server is healthy and idle (nothing left running) at the end.

It also prints how long ``/health`` takes while the requests run (once a second; a server whose
event loop is blocked, e.g. tokenizing a huge prompt, answers it late) and latencies. On a small
shared CPU, ``--server-threads 1`` keeps the server's PyTorch from oversubscribing the cores.

Bounded: at most 5,000 requests, 64 concurrent clients, ``--time-limit`` seconds in all (requests
not sent or cut off by then are counted as such); loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from t0s1.embedded import EMBEDDED_MODEL
from t0s1.serving.cli import is_loopback_host

QUESTIONS = [
    "What is 7 * 8?",
    "How many r are in the word raspberry?",
    "Is 91 a prime number?",
    "What is the capital of France?",
    "What is the sum of the first ten positive integers?",
    "Name a mammal that can fly.",
]
KIND_WEIGHTS = {
    "chat": 18, "chat-stream": 14, "completion": 7, "completion-stream": 6, "continuation": 5,
    "sampled": 5, "cancel-stream": 10, "cancel-wait": 4, "malformed": 19, "huge": 12,
}
GREEDY = ("chat", "chat-stream", "completion", "completion-stream", "continuation")
EXPECT_OK = (*GREEDY, "sampled")
EXPECT_REFUSED = ("malformed", "huge")
HUGE_FIELDS = ("end_phrase", "answer_prefix", "ignore_str", "stop", "content", "prompt")
GROWTH_GOAL = 0.10
MAX_REQUESTS, MAX_CONCURRENCY = 5000, 64
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CUT = "cut by --time-limit"
ALONE_SHARE_START = 0.9
"""Requests are sent during the first 90% of --time-limit; the last 10% runs greedy ones alone."""


# ---- the requests -----------------------------------------------------------------------------------


@dataclass
class Call:
    """One HTTP request: where, and either a JSON body or raw bytes."""

    kind: str
    path: str
    body: dict | None = None
    raw: bytes | None = None
    stream: bool = False
    key: str | None = None
    """Greedy requests: the pool entry (equal keys must get equal replies)."""
    variant: str = ""


def greedy_pool() -> dict[str, list[tuple[str, dict]]]:
    """Per greedy kind, (key, body) entries: few enough that each recurs under load."""
    settings = [
        {"max_thinking_tokens": 8, "max_tokens": 8},
        {"max_thinking_tokens": 16, "num_ignore": 1, "max_tokens": 8},
        {"max_thinking_tokens": 24, "max_tokens": 12},
    ]
    pool: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for q, question in enumerate(QUESTIONS):
        for s, setting in enumerate(settings):
            if (q + s) % 2:
                continue  # 9 entries of the 18 combinations
            chat = {"model": "soak", "messages": [{"role": "user", "content": question}], "temperature": 0, **setting}
            prompt = {"model": "soak", "prompt": f"Question: {question}\nThink step by step.", "temperature": 0, **setting}
            pool["chat"].append((f"chat/{q}/{s}", chat))
            pool["chat-stream"].append((f"chat/{q}/{s}", {**chat, "stream": True}))
            pool["completion"].append((f"completion/{q}/{s}", prompt))
            pool["completion-stream"].append((f"completion/{q}/{s}", {**prompt, "stream": True}))
        pool["continuation"].append((f"continuation/{q}", {
            "model": "soak", "prompt": f"Q: {question}\nA:", "temperature": 0, "max_tokens": 12, "stop": ["\n\n"]}))
    return pool


def malformed_calls() -> list[Call]:
    """Bodies the server must refuse with a 4xx; ``variant`` names each."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "max_thinking_tokens": 4}
    prompt = {"prompt": "Hi", "max_tokens": 4, "max_thinking_tokens": 4}
    bodies = {
        "bad-json": ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"'),
        "not-an-object": ("/v1/chat/completions", b'["messages"]'),
        "empty-body": ("/v1/completions", b""),
        "no-messages": ("/v1/chat/completions", {"max_tokens": 4}),
        "empty-messages": ("/v1/chat/completions", {**chat, "messages": []}),
        "messages-not-a-list": ("/v1/chat/completions", {**chat, "messages": "Hi"}),
        "message-without-role": ("/v1/chat/completions", {**chat, "messages": [{"content": "Hi"}]}),
        "content-a-number": ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": 7}]}),
        "max-tokens-zero": ("/v1/chat/completions", {**chat, "max_tokens": 0}),
        "max-tokens-negative": ("/v1/completions", {**prompt, "max_tokens": -3}),
        "max-tokens-a-string": ("/v1/chat/completions", {**chat, "max_tokens": "8"}),
        "max-tokens-over-context": ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**9, "stop": ["\n"]}),
        "thinking-budget-a-word": ("/v1/chat/completions", {**chat, "max_thinking_tokens": "lots"}),
        "temperature-negative": ("/v1/chat/completions", {**chat, "temperature": -1}),
        "top-p-zero": ("/v1/chat/completions", {**chat, "top_p": 0}),
        "n-two": ("/v1/chat/completions", {**chat, "n": 2}),
        "unknown-budget-field": ("/v1/chat/completions", {**chat, "thinking_tokens_max": 5}),
        "aliases-disagree": ("/v1/chat/completions", {**chat, "thinking_budget": 9}),
        "effort-unknown": ("/v1/chat/completions", {**chat, "reasoning_effort": "extreme"}),
        "chat-with-stop": ("/v1/chat/completions", {**chat, "stop": ["\n"]}),
        "empty-prompt": ("/v1/completions", {**prompt, "prompt": "   "}),
        "two-prompts": ("/v1/completions", {**prompt, "prompt": ["a", "b"]}),
        "stop-token-outside-vocabulary": ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stop_token_ids": [10**9]}),
        "stream-with-stop": ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stop": ["\n"], "stream": True}),
        "stop-with-budget": ("/v1/completions", {**prompt, "stop": ["\n"]}),
        "seed-too-large": ("/v1/chat/completions", {**chat, "temperature": 0.5, "seed": 2**70}),
        "echo": ("/v1/completions", {**prompt, "echo": True}),
    }
    calls = []
    for variant, (path, body) in bodies.items():
        if isinstance(body, bytes):
            calls.append(Call("malformed", path, raw=body, variant=variant))
        else:
            calls.append(Call("malformed", path, body=body, variant=variant))
    return calls


def huge_call(index: int, size: int) -> Call:
    """A request with one distinct ``size``-byte string (built when sent, dropped after)."""
    target = HUGE_FIELDS[index % len(HUGE_FIELDS)]
    text = f"{index:09d}-" + "abcdefgh " * (size // 9)
    chat = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4, "max_thinking_tokens": 4}
    if target == "content":
        return Call("huge", "/v1/chat/completions", body={**chat, "messages": [{"role": "user", "content": text}]}, variant=target)
    if target == "prompt":
        return Call("huge", "/v1/completions", body={"prompt": text, "max_tokens": 4, "max_thinking_tokens": 4}, variant=target)
    if target == "stop":
        return Call("huge", "/v1/completions", body={"prompt": "Hi", "max_tokens": 4, "stop": [text]}, variant=target)
    return Call("huge", "/v1/chat/completions", body={**chat, target: text, "num_ignore": 1}, variant=target)


def plan(count: int, seed: int, huge_bytes: int) -> list:
    """``count`` request makers in a fixed shuffled order (huge bodies are built when sent)."""
    rng = random.Random(seed)
    total = sum(KIND_WEIGHTS.values())
    kinds = [kind for kind, weight in KIND_WEIGHTS.items() for _ in range(round(count * weight / total))]
    kinds = (kinds + rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=count))[:count]
    rng.shuffle(kinds)
    pool, malformed = greedy_pool(), malformed_calls()
    makers = []
    for i, kind in enumerate(kinds):
        if kind in GREEDY:
            key, body = rng.choice(pool[kind])
            path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
            makers.append(lambda kind=kind, path=path, body=body, key=key: Call(kind, path, body=body, stream=bool(body.get("stream")), key=key))
        elif kind == "sampled":
            body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "temperature": 0.8,
                    "seed": rng.randrange(2**31), "max_thinking_tokens": 16, "max_tokens": 8, "stream": rng.random() < 0.5}
            makers.append(lambda body=body: Call("sampled", "/v1/chat/completions", body=body, stream=body["stream"]))
        elif kind == "cancel-stream":
            body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_thinking_tokens": 64,
                    "num_ignore": 1, "max_tokens": 32, "stream": True}
            makers.append(lambda body=body: Call("cancel-stream", "/v1/chat/completions", body=body, stream=True))
        elif kind == "cancel-wait":
            body = {"messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "max_thinking_tokens": 64, "max_tokens": 32}
            makers.append(lambda body=body, after=rng.uniform(0.02, 0.5): Call("cancel-wait", "/v1/chat/completions", body=body,
                                                                           variant=f"{after:.3f}"))
        elif kind == "malformed":
            makers.append(lambda call=rng.choice(malformed): call)
        else:
            makers.append(lambda i=i: huge_call(i, huge_bytes))
    return makers


# ---- sending them ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    variant: str
    status: int | None  # None: no HTTP status (a dropped connection, a timeout); 0: abandoned by the client
    seconds: float
    key: str | None = None
    reply: tuple | None = None
    """Greedy 200s: (thinking, answer, finish_reason, thinking_tokens, answer_tokens)."""
    problem: str | None = None
    """What went wrong beyond the status: an error event in a stream, a stream without [DONE], ..."""
    message: str = ""


def _report_of(data: dict) -> dict:
    return data.get("budget_forcing") or (data.get("choices") or [{}])[0].get("budget_forcing") or {}


def _whole_reply(data: dict) -> tuple:
    choice = data["choices"][0]
    if "message" in choice:
        thinking, answer = choice["message"].get("reasoning_content") or "", choice["message"].get("content") or ""
    else:
        thinking, answer = choice.get("reasoning_content") or "", choice.get("text") or ""
    report = _report_of(data)
    return thinking, answer, choice.get("finish_reason"), report.get("thinking_tokens"), report.get("answer_tokens")


async def _read_stream(response: httpx.Response, stop_after_text: bool) -> tuple[tuple | None, str | None]:
    """(reply, problem) of a server-sent event stream; closed early after the first text if asked."""
    thinking, answer, finish, report, done, seen_text = [], [], None, {}, False, False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            return None, f"error event in the stream: {error.get('type')}: {str(error.get('message'))[:160]}"
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            thinking.append(delta.get("reasoning_content") or choice.get("reasoning_content") or "")
            answer.append(delta.get("content") or choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
            seen_text = seen_text or bool(thinking[-1] or answer[-1])
        report = _report_of(event) or report
        if stop_after_text and seen_text:
            return None, None  # the client leaves: closing the response drops the connection
    if not done:
        return None, "the stream ended without [DONE]"
    return ("".join(thinking), "".join(answer), finish, report.get("thinking_tokens"), report.get("answer_tokens")), None


async def send(client: httpx.AsyncClient, call: Call) -> Outcome:
    started = time.perf_counter()
    outcome = Outcome(call.kind, call.variant, None, 0.0, call.key)
    kwargs = {"content": call.raw, "headers": {"content-type": "application/json"}} if call.raw is not None else {"json": call.body}
    try:
        if call.kind == "cancel-wait":
            try:
                response = await asyncio.wait_for(client.post(call.path, **kwargs), float(call.variant))
                outcome.status = response.status_code  # it finished before the client gave up
            except TimeoutError:
                outcome.status, outcome.message = 0, "abandoned by the client"
        elif call.stream:
            async with client.stream("POST", call.path, **kwargs) as response:
                outcome.status = response.status_code
                if response.status_code == 200:
                    outcome.reply, outcome.problem = await _read_stream(response, call.kind == "cancel-stream")
                else:
                    outcome.message = (await response.aread()).decode(errors="replace")[:300]
        else:
            response = await client.post(call.path, **kwargs)
            outcome.status = response.status_code
            if response.status_code == 200 and call.key is not None:
                outcome.reply = _whole_reply(response.json())
            elif response.status_code != 200:
                outcome.message = response.text[:300]
    except (httpx.TransportError, json.JSONDecodeError, KeyError, IndexError) as error:
        outcome.problem = f"{type(error).__name__}: {error}"[:200]
    outcome.seconds = time.perf_counter() - started
    if call.key is None:
        outcome.reply = None
    return outcome


async def run_all(client: httpx.AsyncClient, makers: list, concurrency: int, deadline: float,
                  on_done=None) -> tuple[list[Outcome], int]:
    """Send every request, ``concurrency`` at a time, in order; (outcomes in order, not sent)."""
    outcomes: list[Outcome | None] = [None] * len(makers)
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < len(makers) and time.monotonic() < deadline:
            index = position
            position += 1
            call = makers[index]()
            try:
                outcomes[index] = await asyncio.wait_for(send(client, call), max(1.0, deadline - time.monotonic()))
            except TimeoutError:
                outcomes[index] = Outcome(call.kind, call.variant, None, 0.0, call.key, problem=CUT)
            if on_done:
                on_done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = [outcome for outcome in outcomes if outcome is not None]
    return done, len(makers) - len(done)


# ---- the server ----------------------------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process (Linux /proc), in MB."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_loopback(url: str) -> bool:
    return is_loopback_host(urlparse(url).hostname or "")


async def wait_healthy(client: httpx.AsyncClient, seconds: float, process: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"t0s1 serve exited with status {process.returncode} before it was ready")
        try:
            response = await client.get("/health", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the server was not healthy within {seconds:.0f} s")


async def probe_health(client: httpx.AsyncClient, seconds: list[float]) -> None:
    """Time a /health request once a second until cancelled (it answers at once unless the
    server's event loop is blocked)."""
    while True:
        started = time.perf_counter()
        try:
            await client.get("/health", timeout=120)
        except httpx.TransportError:
            pass
        seconds.append(time.perf_counter() - started)
        await asyncio.sleep(1.0)


async def wait_idle(client: httpx.AsyncClient, seconds: float) -> tuple[bool, dict | str]:
    """Wait until the server runs and queues nothing: (idle, last /health body or error)."""
    deadline, last = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        try:
            response = await client.get("/health", timeout=5)
            last = response.json() if response.headers.get("content-type", "").startswith("application/json") else response.text
            if response.status_code == 200 and not last.get("running") and not last.get("queued"):
                return True, last
            if response.status_code != 200:
                return False, f"/health answered {response.status_code}: {str(last)[:200]}"
        except httpx.TransportError as error:
            return False, f"/health unreachable: {error}"
        await asyncio.sleep(0.25)
    return False, last


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "t0s1", "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(args.max_batch), "--backend", args.backend, "--device", args.device, "--no-ui"]
    print("starting:", " ".join(command[1:]), flush=True)
    env = dict(os.environ)
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    log = log_path.open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_stop_with_parent)


def _stop_with_parent() -> None:
    """In the server's process, before it starts: Linux sends it SIGTERM if this script dies, so a
    killed soak never leaves a server behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def stop_server(process: subprocess.Popen) -> int | None:
    process.terminate()
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        return None


# ---- the soak ------------------------------------------------------------------------------------------


@dataclass
class Figures:
    rss: dict[str, float | None] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    not_sent: int = 0
    alone: dict[tuple[str, bool], tuple | None] = field(default_factory=dict)
    idle: tuple[bool, object] = (True, {})
    seconds: float = 0.0
    health_seconds: list[float] = field(default_factory=list)
    """How long /health took, once a second while requests ran (a blocked event loop shows here)."""
    exit_status: int | None = None
    """The server's exit status if it died during the soak (a process this script started)."""


async def soak(args, url: str, pid: int | None, process: subprocess.Popen | None) -> Figures:
    figures = Figures()
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        health = await wait_healthy(client, args.start_timeout, process)
        print(f"server {url}: model {health.get('model')}, max batch {health.get('max_batch')}, pid {pid}", flush=True)
        figures.rss["start"] = rss_mb(pid)
        started = time.monotonic()
        deadline = started + ALONE_SHARE_START * args.time_limit  # the rest is for the requests run alone
        end = started + args.time_limit
        makers = plan(args.requests, args.seed, args.huge_bytes)
        warmup = makers[: args.warmup]
        rest = makers[args.warmup :]
        done = [0]

        def progress() -> None:
            done[0] += 1
            if done[0] % 250 == 0:
                print(f"  {done[0]} requests done, {time.monotonic() - started:.0f} s, RSS {rss_mb(pid) or 0:.0f} MB", flush=True)

        probe = asyncio.create_task(probe_health(client, figures.health_seconds))
        outcomes, missing = await run_all(client, warmup, args.concurrency, deadline, progress)
        await wait_idle(client, 60)
        figures.rss["after warm-up"] = rss_mb(pid)
        more, missing_more = await run_all(client, rest, args.concurrency, deadline, progress)
        probe.cancel()
        figures.outcomes, figures.not_sent = outcomes + more, missing + missing_more
        figures.seconds = time.monotonic() - started
        figures.idle = await wait_idle(client, 60)
        await asyncio.sleep(1.0)
        figures.rss["end"] = rss_mb(pid)
        if process is not None and process.poll() is not None:
            figures.exit_status = process.returncode
            return figures

        # The same greedy requests alone, one at a time, on the idle server; both modes of each.
        keys = sorted({(o.key, o.kind.endswith("-stream")) for o in figures.outcomes if o.key is not None and o.reply is not None})
        pool = {(key, bool(body.get("stream"))): (kind, body) for kind, entries in greedy_pool().items() for key, body in entries}
        for key, stream in keys:
            for mode in (stream, not stream):
                if (key, mode) in figures.alone or (key, mode) not in pool or time.monotonic() > end:
                    continue
                kind, body = pool[(key, mode)]
                path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
                alone = await send(client, Call(kind, path, body=body, stream=mode, key=key))
                figures.alone[(key, mode)] = alone.reply if alone.status == 200 else None
    return figures


def summarize(args, figures: Figures) -> int:
    cut = sum(o.problem == CUT for o in figures.outcomes)
    outcomes = [o for o in figures.outcomes if o.problem != CUT]
    print()
    print(f"sent         : {len(outcomes)} requests answered in {figures.seconds:.0f} s ({figures.not_sent} not sent and "
          f"{cut} cut by --time-limit), {args.concurrency} concurrent clients, max batch {args.max_batch}")
    table: dict[str, Counter] = defaultdict(Counter)
    for outcome in outcomes:
        table[outcome.kind][outcome.status if outcome.status is not None else "dropped"] += 1
    for kind in KIND_WEIGHTS:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(table[kind].items(), key=str))
        print(f"  {kind:18s} {sum(table[kind].values()):5d}  {statuses}")

    latencies = [o.seconds for o in outcomes if o.kind in EXPECT_OK and o.status == 200]
    if latencies:
        ordered = sorted(latencies)
        print(f"latency      : generation requests p50 {statistics.median(ordered):.2f} s, "
              f"p95 {ordered[int(0.95 * (len(ordered) - 1))]:.2f} s")

    failures: list[str] = []
    if figures.not_sent or cut:
        failures.append(f"only {len(outcomes)} of {args.requests} requests answered within --time-limit")
    rss = figures.rss
    shown = ", ".join(f"{name} {value:.0f} MB" if value is not None else f"{name} unknown" for name, value in rss.items())
    if rss.get("after warm-up") and rss.get("end"):
        growth = rss["end"] / rss["after warm-up"] - 1
        verdict = "ok" if growth <= GROWTH_GOAL else "MISSED"
        print(f"RSS          : {shown}; growth after warm-up {growth:+.1%} (goal <= {GROWTH_GOAL:.0%}): {verdict}")
        if growth > GROWTH_GOAL:
            failures.append(f"RSS grew {growth:+.1%} after warm-up")
    else:
        print(f"RSS          : {shown} (give --pid with --url to measure it)")

    if figures.health_seconds:
        ordered = sorted(figures.health_seconds)
        print(f"/health      : p50 {statistics.median(ordered):.2f} s, max {ordered[-1]:.2f} s over {len(ordered)} probes "
              "while requests ran (the event loop's responsiveness; no goal)")
    server_errors = [o for o in outcomes if o.status is not None and o.status >= 500]
    stream_errors = [o for o in outcomes if o.problem and o.problem.startswith("error event")]
    dropped = [o for o in outcomes if o.status is None or (o.problem and not o.problem.startswith("error event"))]
    total_5xx = len(server_errors) + len(stream_errors)
    print(f"5xx          : {len(server_errors)} replies, {len(stream_errors)} error events in streams (goal 0): "
          f"{'ok' if total_5xx == 0 else 'MISSED'}")
    print(f"dropped      : {len(dropped)} requests without a complete reply (connection errors, streams without [DONE])")
    if total_5xx:
        failures.append(f"{total_5xx} server errors")
    if dropped:
        failures.append(f"{len(dropped)} dropped requests")

    unexpected = [o for o in outcomes if o.status is not None and (
        (o.kind in EXPECT_OK and o.status != 200)
        or (o.kind in EXPECT_REFUSED and not 400 <= o.status < 500)
        or (o.kind.startswith("cancel") and o.status not in (0, 200)))]
    print(f"statuses     : {len(unexpected)} replies with a status their kind does not expect (goal 0): "
          f"{'ok' if not unexpected else 'MISSED'}")
    if unexpected:
        failures.append(f"{len(unexpected)} unexpected statuses")

    greedy = [o for o in outcomes if o.key is not None and o.reply is not None]
    compared = [o for o in greedy if (o.key, o.kind.endswith("-stream")) in figures.alone]
    same = [o for o in compared if figures.alone[(o.key, o.kind.endswith("-stream"))] == o.reply]
    verdict = "ok" if compared and len(same) == len(compared) else "MISSED"
    skipped = f", {len(greedy) - len(compared)} not compared: no time left to run them alone" if len(compared) < len(greedy) else ""
    print(f"greedy       : {len(same)}/{len(compared)} replies under load equal to the same request alone "
          f"({len({o.key for o in compared})} distinct requests{skipped}; goal all): {verdict}")
    if len(compared) < len(greedy):
        failures.append(f"{len(greedy) - len(compared)} greedy replies not compared (raise --time-limit)")
    if len(same) != len(compared) or not compared:
        failures.append(f"{len(compared) - len(same)} greedy replies differ from the request alone")
    modes = [(key, figures.alone.get((key, True)), figures.alone.get((key, False)))
             for key in sorted({key for key, _ in figures.alone})
             if (key, True) in figures.alone and (key, False) in figures.alone]
    streamed_same = sum(1 for _, streamed, whole in modes if streamed is not None and streamed == whole)
    print(f"stream       : {streamed_same}/{len(modes)} greedy requests alone stream the same reply as they return whole")
    if streamed_same != len(modes):
        failures.append(f"{len(modes) - streamed_same} streamed replies differ from the whole reply")

    if figures.exit_status is not None:
        died = (f"killed by signal {-figures.exit_status}" if figures.exit_status < 0
                else f"exit status {figures.exit_status}")
        print(f"server       : DIED during the soak ({died}); see its log")
        failures.append(f"the server died ({died})")
    idle, health = figures.idle
    print(f"at the end   : {'healthy and idle' if idle else 'NOT idle or not healthy: ' + str(health)[:300]}")
    if not idle:
        failures.append("server not healthy and idle at the end")

    if args.verbose:
        print("\nrefusals (one reply per variant):")
        seen = {}
        for o in outcomes:
            if o.kind in EXPECT_REFUSED and (o.kind, o.variant) not in seen:
                seen[(o.kind, o.variant)] = f"{o.status} in {o.seconds:.2f} s: {(o.problem or o.message).replace(chr(10), ' ')[:150]}"
        for (kind, variant), text in sorted(seen.items()):
            print(f"  {kind} {variant} -> {text}")
    details = _details(outcomes, figures)
    if details:
        print("\ndetails:")
        for line in details:
            print("  " + line)
    print("\nverdict      : " + ("all goals met" if not failures else "MISSED: " + "; ".join(failures)))
    return 1 if failures else 0


def _details(outcomes: list[Outcome], figures: Figures) -> list[str]:
    """What each failure was: kind, variant, status and the server's message, grouped."""
    groups: Counter = Counter()
    for o in outcomes:
        bad_status = o.status is not None and (
            o.status >= 500 or (o.kind in EXPECT_OK and o.status != 200)
            or (o.kind in EXPECT_REFUSED and not 400 <= o.status < 500)
            or (o.kind.startswith("cancel") and o.status not in (0, 200)))
        if bad_status or o.problem or o.status is None:
            message = o.problem or o.message.replace("\n", " ")[:160]
            groups[(o.kind, o.variant, o.status, message)] += 1
    lines = [f"{count:4d} x {kind} {variant} -> {status}: {message}" for (kind, variant, status, message), count
             in sorted(groups.items(), key=lambda item: -item[1])]
    for o in outcomes:
        if o.key is not None and o.reply is not None and (o.key, o.kind.endswith("-stream")) in figures.alone:
            alone = figures.alone[(o.key, o.kind.endswith("-stream"))]
            if alone != o.reply:
                lines.append(f"differs: {o.kind} {o.key}: under load {o.reply!r} / alone {alone!r}"[:400])
                break  # one example; the count is above
    return lines[:40]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a server already running on this machine (loopback), e.g. http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to read its memory")
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--backend", default="auto", help="t0s1 serve --backend (auto, transformers, llamacpp)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--server-threads", type=int, help="OMP_NUM_THREADS of the server it starts (default: PyTorch's)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200, help="requests before the 'after warm-up' memory reading")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once")
    parser.add_argument("--huge-bytes", type=int, default=1_000_000, help="size of each huge string")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds for all requests")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds for the server to load its model")
    parser.add_argument("--verbose", action="store_true", help="also print the server's reply to each refused variant")
    args = parser.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be between 1 and {MAX_REQUESTS}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if not 0 <= args.warmup < args.requests:
        parser.error("--warmup must be at least 0 and below --requests")
    if args.time_limit <= 0 or args.huge_bytes < 1:
        parser.error("--time-limit and --huge-bytes must be positive")
    if args.url and not is_loopback(args.url):
        parser.error(f"--url must be a loopback address (127.0.0.1, ::1, localhost), got {args.url}")

    process = None
    if args.url:
        url, pid = args.url.rstrip("/"), args.pid
    else:
        port = free_port()
        log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "serve.log"
        process = start_server(args, port, log_path)
        url, pid = f"http://127.0.0.1:{port}", process.pid
    try:
        figures = asyncio.run(soak(args, url, pid, process))
    except RuntimeError as error:
        print(f"soak stopped: {error}", file=sys.stderr)
        if process is not None:
            print(log_path.read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1
    finally:
        if process is not None:
            status = stop_server(process)
            print(f"server stopped (exit status {status}); its log: {log_path}", flush=True)
    return summarize(args, figures)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
