"""Faults around the server: an engine that cannot start or dies, a forward pass that raises,
clients that leave at every stage, SIGTERM during streams, and a flood of distinct request strings.
Loopback only; each test is bounded in time and stops by itself."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from t0s1 import BudgetForcing
from t0s1.forcing import TorchRunner
from t0s1.serving.batcher import Batcher
from t0s1.serving.server import create_app, serve_in_background

QUESTION = [{"role": "user", "content": "How many r are in raspberry?"}]
LONG = {"messages": QUESTION, "max_thinking_tokens": 1500, "num_ignore": 60, "max_tokens": 400}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_process(model, *flags, prelude: str = "", timeout: float = 120):
    """``t0s1 serve`` in its own process on a free loopback port (``prelude``: Python run first, to
    inject a fault); yields (process, base URL). The process is ended at the end if still running."""
    port = free_port()
    code = f"{prelude}\nfrom t0s1.cli import main\nmain()"
    command = [sys.executable, "-c", code, "serve", "--model", str(model), "--port", str(port), "--no-ui", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tempfile.TemporaryFile()  # not a pipe: a full pipe nobody reads would block the server's log
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                break  # it stopped by itself: the caller looks at why
            try:
                httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "t0s1 serve did not come up"
                time.sleep(0.3)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        log.close()


def output(process) -> str:
    process.log.seek(0)
    return process.log.read().decode(errors="replace")


def wait_until(condition, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


# ---- the engine cannot start, or dies ----------------------------------------------------------------


def test_a_max_batch_the_runtime_refuses_stops_serve_with_the_reason():
    pytest.importorskip("llama_cpp")
    from t0s1.models import EMBEDDED_MODEL

    with serve_process(EMBEDDED_MODEL, "--backend", "llamacpp", "--max-batch", "300") as (process, url):
        assert process.wait(120) == 2
        said = output(process)
    assert "--max-batch 300" in said and "256" in said, said


def test_a_dead_worker_fails_health_and_every_request_says_why(tiny_model, monkeypatch):
    app = create_app(tiny_model, BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4))
    with serve_in_background(app) as url:
        body = {"messages": QUESTION, "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200

        def broken_step(self, slots, tokens):
            raise RuntimeError("device lost")

        def no_engine(self):
            raise MemoryError("no memory for the cache")

        monkeypatch.setattr(TorchRunner, "step", broken_step)
        monkeypatch.setattr(Batcher, "_new_engine", no_engine)
        running = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert running.status_code == 500 and "device lost" in running.json()["error"]["message"]
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, 10, "/health still says ok")
        report = httpx.get(f"{url}/health").json()
        assert report["status"] == "failed" and "no memory for the cache" in report["error"]
        for _ in range(2):  # every later request: a 503 that says why, not "shutting down"
            later = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert later.status_code == 503 and later.json()["error"]["code"] == "engine_failed"
            assert "no memory for the cache" in later.json()["error"]["message"]


def test_serve_exits_non_zero_when_its_engine_dies(tiny_model_dir, tmp_path, monkeypatch):
    """A forward pass fails and no fresh engine can be built: the process ends with status 1 (for
    a supervisor to restart it) instead of answering 503 forever."""
    prelude = (
        "import os, t0s1.forcing as f, t0s1.serving.batcher as b\n"
        "step, new = f.TorchRunner.step, b.Batcher._new_engine\n"
        "def failing_step(self, slots, tokens):\n"
        "    if os.path.exists(os.environ['T0S1_TEST_FAULT']): raise RuntimeError('device lost')\n"
        "    return step(self, slots, tokens)\n"
        "def failing_new(self):\n"
        "    if os.path.exists(os.environ['T0S1_TEST_FAULT']): raise MemoryError('no memory for the cache')\n"
        "    return new(self)\n"
        "f.TorchRunner.step, b.Batcher._new_engine = failing_step, failing_new\n"
    )
    fault = tmp_path / "fault"  # the fault strikes once this file exists
    monkeypatch.setenv("T0S1_TEST_FAULT", str(fault))
    with serve_process(tiny_model_dir, "--max-thinking-tokens", "4", "--max-answer-tokens", "2", prelude=prelude) as (process, url):
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION}, timeout=60).status_code == 200
        fault.touch()
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION}, timeout=60)
        assert reply.status_code == 500 and "device lost" in reply.text
        assert process.wait(60) == 1
        said = output(process)
    assert "no memory for the cache" in said and "status 1" in said, said


def fail_the_next_step(monkeypatch) -> threading.Event:
    """Slow the transformers runner's steps (each request lasts seconds on any machine, so the
    requests are seen running) and make the first step after the returned event is set raise."""
    step, fail = TorchRunner.step, threading.Event()

    def step_that_fails_once(self, slots, tokens):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("forward pass failed")
        time.sleep(0.02)
        return step(self, slots, tokens)

    monkeypatch.setattr(TorchRunner, "step", step_that_fails_once)
    return fail


def test_a_failed_forward_pass_fails_the_running_requests_and_the_server_goes_on(tiny_model, monkeypatch):
    app = create_app(tiny_model, BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4), max_batch=4)
    fail = fail_the_next_step(monkeypatch)
    with serve_in_background(app) as url:
        body = {**LONG, "max_thinking_tokens": 200, "num_ignore": 3, "max_tokens": 20}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = [pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=120) for _ in range(3)]
            wait_until(lambda: health(url)["running"] == 3, 30, "the requests did not start")
            fail.set()
            replies = [reply.result() for reply in replies]
        for reply in replies:  # each is answered: its reply, or an error that names the failure
            assert reply.status_code == 200 or (reply.status_code == 500 and "forward pass failed" in reply.text)
        assert any(reply.status_code == 500 for reply in replies)
        report = health(url)
        assert report["status"] == "ok" and report["running"] == 0 and report["failed"] >= 1
        again = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
        assert again.status_code == 200


def test_a_policy_request_failed_with_the_batch_it_waited_for_does_not_run_after(tiny_model, monkeypatch):
    """A policy request waits for the running batch to drain; the batch's forward pass fails, which
    fails the waiting request too (a 500). It must not then run anyway for nobody: the counters
    show it failed once and never finished."""
    app = create_app(tiny_model, BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4), max_batch=4)
    fail = fail_the_next_step(monkeypatch)
    with serve_in_background(app) as url:
        before = health(url)
        vote = {"messages": QUESTION, "policy": "vote", "n": 2, "temperature": 0.8, "seed": 1, "max_thinking_tokens": 8,
                "max_tokens": 4}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=LONG, timeout=120)
            wait_until(lambda: health(url)["running"] == 1, 30, "the long request did not start")
            waiting = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=vote, timeout=120)
            wait_until(lambda: health(url)["running"] == 2, 30, "the policy request was not taken from the queue")
            fail.set()
            replies = [running.result(), waiting.result()]
        assert [reply.status_code for reply in replies] == [500, 500], [reply.text for reply in replies]
        time.sleep(2)  # long enough for a wrongly kept policy job to have run
        report = health(url)
        assert report["running"] == 0 and report["requests"] == before["requests"]
        assert report["failed"] == before["failed"] + 2


def test_a_full_queue_answers_503_with_retry_after_and_serves_what_it_queued(tiny_model, monkeypatch):
    """The queue is bounded (--max-queued; a request with n choices takes n places): beyond it a
    request gets a 503 that OpenAI's clients retry after Retry-After, and nothing of it is queued.
    It used to grow without bound, n copies of the prompt a request."""
    step, hold = TorchRunner.step, threading.Event()

    def held_step(self, slots, tokens):  # the running request holds the batch until the test lets go
        hold.wait(60)
        return step(self, slots, tokens)

    monkeypatch.setattr(TorchRunner, "step", held_step)
    app = create_app(tiny_model, BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4), max_batch=1, max_queued=2)
    short = {"messages": QUESTION, "max_thinking_tokens": 4, "max_tokens": 3}
    with serve_in_background(app) as url, concurrent.futures.ThreadPoolExecutor(3) as pool:
        post = lambda body: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)  # noqa: E731
        try:
            running = pool.submit(post, short)
            wait_until(lambda: health(url)["running"] == 1, 30, "the first request did not start")
            three = post({**short, "n": 3, "temperature": 0.8, "seed": 1})
            assert three.status_code == 503 and three.headers["Retry-After"] == "1", three.text
            assert three.json()["error"]["code"] == "server_busy" and "3 places" in three.json()["error"]["message"]
            assert health(url)["queued"] == 0  # none of its choices was queued
            queued = [pool.submit(post, short), pool.submit(post, short)]
            wait_until(lambda: health(url)["queued"] == 2, 30, "the two requests were not queued")
            over = post(short)
            assert over.status_code == 503 and "queues at most 2" in over.json()["error"]["message"]
            assert health(url)["max_queued"] == 2
        finally:
            hold.set()
        assert [reply.result().status_code for reply in (running, *queued)] == [200, 200, 200]
        again = post({**short, "n": 2, "temperature": 0.8, "seed": 1})
        assert again.status_code == 200 and len(again.json()["choices"]) == 2


# ---- clients that leave -------------------------------------------------------------------------------


def test_clients_leaving_at_every_stage_leave_nothing_behind(tiny_model, monkeypatch):
    """Queued, at the first thinking chunk, in the answer, waiting for a whole reply: each leaves,
    its generation stops, and the server is left as it was."""
    step = TorchRunner.step

    def slow_step(self, slots, tokens):  # >= 15 s for LONG on any machine, so each client leaves mid-way
        time.sleep(0.01)
        return step(self, slots, tokens)

    monkeypatch.setattr(TorchRunner, "step", slow_step)
    app = create_app(tiny_model, BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4), max_batch=1)
    with serve_in_background(app) as url:
        httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
        threads = threading.active_count()

        def leave_when(body: dict, stage: str, then: threading.Event | None = None) -> None:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
                for line in response.iter_lines():
                    if stage in line:
                        if then is not None:
                            then.wait(60)
                        return

        # Queued behind a long request (max_batch 1): the client leaves before its first byte.
        queued_left = threading.Event()
        blocker = threading.Thread(target=leave_when, args=(LONG, "reasoning_content", queued_left))
        blocker.start()
        wait_until(lambda: health(url)["running"] == 1, 20, "the long request did not start")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=1.5)
        assert health(url)["queued"] == 1
        queued_left.set()
        blocker.join(60)
        leave_when(LONG, "reasoning_content")  # at the first thinking chunk
        leave_when({**LONG, "max_thinking_tokens": 3, "max_tokens": 400}, '"content"')  # in the answer
        with pytest.raises(httpx.TimeoutException):  # waiting for a whole reply
            httpx.post(f"{url}/v1/chat/completions", json=LONG, timeout=1.5)
        wait_until(lambda: health(url)["running"] == 0 and health(url)["queued"] == 0, 30,
                   "a generation went on after its client left")
        report = health(url)
        assert report["cancelled"] >= 4 and report["failed"] == 0
        assert app.state.batcher._running == {}
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200
        wait_until(lambda: threading.active_count() <= threads, 10, "threads were left behind")


# ---- SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_during_streams_ends_the_process_cleanly_and_answers_everyone(tiny_model_dir):
    with serve_process(tiny_model_dir, "--max-batch", "2") as (process, url):
        started = threading.Barrier(3)

        def stream() -> list[str]:
            lines = []
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 2:  # the first thinking chunk
                            started.wait(30)
            return lines

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(stream) for _ in range(2)]
            started.wait(60)
            queued = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=LONG, timeout=60)
            wait_until(lambda: health(url)["queued"] == 1, 20, "the third request was not queued")
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then ends by the signal it caught (as a supervisor expects).
            assert process.wait(30) in (0, -signal.SIGTERM)
            assert time.monotonic() - signalled < 15
            assert "Application shutdown complete" in output(process)
            for lines in (s.result(60) for s in streams):
                assert json.loads(lines[-2][6:])["error"]["code"] == "server_shutting_down" and lines[-1] == "data: [DONE]"
            assert queued.result(60).status_code == 503


# ---- memory -------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_thousands_of_distinct_request_strings_leave_the_memory_flat(tiny_model_dir):
    """2,000 requests, each with its own few-KB end_phrase and answer_prefix (refused: their budget
    does not fit the context, after the strings were encoded), and some beyond the length limit:
    the server keeps none of them."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the process memory from /proc")
    def text() -> str:  # random.choices of the module: thread-safe enough, and every text distinct
        return "".join(random.choices(string.ascii_letters + " ", k=3000))

    def request(client: httpx.Client) -> None:
        body = {"messages": QUESTION, "max_thinking_tokens": 5000, "end_phrase": text(), "answer_prefix": text()}
        response = client.post(f"{url}/v1/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"

    def requests(count: int) -> None:
        with httpx.Client(timeout=120) as client:
            for i in range(count):
                request(client)
                if i % 100 == 0:  # beyond the limit: refused before anything is encoded
                    over = client.post(f"{url}/v1/chat/completions", json={"messages": QUESTION, "end_phrase": "x" * 100_000})
                    assert over.status_code == 400 and over.json()["error"]["param"] == "end_phrase"

    with serve_process(tiny_model_dir) as (process, url), concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(requests, [50] * 4))  # warm-up
        before = rss_kib(process.pid)
        list(pool.map(requests, [500] * 4))
        after = rss_kib(process.pid)
        assert health(url)["status"] == "ok"
    assert after - before <= max(0.1 * before, 20_000), f"RSS grew from {before} KiB to {after} KiB"
