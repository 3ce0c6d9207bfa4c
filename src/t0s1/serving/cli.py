"""``t0s1 serve`` (an OpenAI-compatible server with budget forcing) and ``t0s1 chat``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from t0s1.cli_support import (
    BUDGET_DEFAULTS,
    AnswerPrefixOption,
    ChatTemplateKwargsOption,
    DeviceOption,
    DtypeOption,
    EndPhraseOption,
    EngineBackendOption,
    IgnoreStrOption,
    MaxAnswerOption,
    MaxThinkingOption,
    ModelOption,
    NumIgnoreOption,
    ReasoningFormatOption,
    SeedOption,
    TemperatureOption,
    ThinkingOption,
    TopPOption,
    budget_from_flags,
    exit_on_user_error,
    parse_chat_template_kwargs,
    parse_thinking_budget,
)
from t0s1.errors import UserError
from t0s1.models import EMBEDDED_MODEL
from t0s1.rag.cli import QdrantKeyOption, QdrantUrlOption, RetrieverChoice
from t0s1.serving.protocol import DEFAULT_EFFORT_BUDGETS, DEFAULT_MAX_QUEUED, REASONING_EFFORTS

RagIndexOption = Annotated[
    Path | None,
    typer.Option("--index", help="A retrieval index (t0s1 index build): answer over the sources retrieved for each question."),
]
RagKOption = Annotated[int, typer.Option("--k", help="Sources retrieved per question with --index (0: none).")]

stderr = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(chat)


@exit_on_user_error
def serve(
    model: ModelOption = EMBEDDED_MODEL,
    host: Annotated[str, typer.Option(help="Address to bind; only this machine by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="T0S1_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most sequences generated together (continuous batching).")] = 8,
    max_queued: Annotated[int, typer.Option("--max-queued", help="Most requests waiting for the batch (a request with n "
                                            "choices takes n places); more get a 503 with Retry-After.")] = DEFAULT_MAX_QUEUED,
    max_thinking_tokens: MaxThinkingOption = str(BUDGET_DEFAULTS.max_thinking_tokens),
    num_ignore: NumIgnoreOption = BUDGET_DEFAULTS.num_ignore,
    ignore_str: IgnoreStrOption = BUDGET_DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswerOption = BUDGET_DEFAULTS.max_answer_tokens,
    temperature: TemperatureOption = BUDGET_DEFAULTS.temperature,
    top_p: TopPOption = BUDGET_DEFAULTS.top_p,
    reasoning_effort_budgets: Annotated[
        str, typer.Option("--reasoning-effort-budgets", help="Thinking budget of each reasoning_effort a request may name.")
    ] = ",".join(f"{name}={budget}" for name, budget in DEFAULT_EFFORT_BUDGETS.items()),
    backend: EngineBackendOption = "auto",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    reasoning_format: ReasoningFormatOption = None,
    end_phrase: EndPhraseOption = None,
    answer_prefix: AnswerPrefixOption = None,
    index: RagIndexOption = None,
    k: RagKOption = 5,
    retriever: RetrieverChoice = None,
    qdrant_url: QdrantUrlOption = None,
    qdrant_api_key: QdrantKeyOption = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the web page (chat, budget compare) at /.")] = True,
) -> None:
    """Serve a model over an OpenAI-compatible API with budget forcing per request.

    Each request may set its own thinking budget and Waits (docs/serving.md); the flags are the defaults.

    With --index, chat requests are answered over the sources retrieved for them.
    """
    import uvicorn

    from t0s1.models import load_model
    from t0s1.serving.server import create_app

    # Sampling has no server-wide seed: a request without one draws its own (and the reply says which).
    defaults = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature,
                                 top_p, None, end_phrase=end_phrase, answer_prefix=answer_prefix)
    efforts = parse_effort_budgets(reasoning_effort_budgets)
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}.")
    if max_queued < 1:
        raise UserError(f"--max-queued must be at least 1, got {max_queued}.")
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}.")
    opened, rag_defaults = _open_index(index, k, retriever, qdrant_url, qdrant_api_key)
    if not api_key and not is_loopback_host(host):
        stderr.print(f"[yellow]Warning:[/] serving on {host} without --api-key: anyone who can reach it can use it.")
    with stderr.status(f"Loading {model}..."):
        lm = load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format, backend=backend)
    app = create_app(lm, defaults, api_key=api_key, max_batch=max_batch, ui=ui, effort_budgets=efforts,
                     index=opened, rag_defaults=rag_defaults, max_queued=max_queued)
    if not api_key and is_loopback_host(host):
        # Open to this machine only, without a key: a web page the user visits could still reach it
        # through a name it points at 127.0.0.1 (DNS rebinding); such requests carry that name.
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES)
    batcher = app.state.batcher
    try:
        batcher.start()  # builds the engine now: what the runtime refuses stops the server before it listens
    except UserError as error:
        raise UserError(f"The engine cannot run with these settings (--max-batch {max_batch}): {error}") from None
    except Exception as error:  # out of memory for the cache, a broken runtime: the reason, and a failed exit
        stderr.print(f"[red]Error:[/] the engine could not start: {type(error).__name__}: {error}", highlight=False)
        raise typer.Exit(1) from None
    stderr.print(f"Serving [bold]{lm.name}[/] at http://{host}:{port}/v1 (max batch {max_batch}); "
                 f"defaults: thinking budget {defaults.max_thinking_tokens}, num_ignore {defaults.num_ignore}.",
                 highlight=False)
    if opened is not None:
        stderr.print(f"Retrieval from {index}: {rag_defaults.k} sources per question ({opened.retriever(rag_defaults.retriever).name}).",
                     highlight=False)
    if ui:
        stderr.print(f"Web page at http://{host}:{port}/", highlight=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    # A worker that dies (no fresh engine after a failure) ends the server with status 1, for a
    # supervisor to restart it; /health answers 503 meanwhile.
    batcher.on_failure = lambda error: setattr(server, "should_exit", True)
    server.run()
    if batcher.failure is not None:
        stderr.print(f"[red]Error:[/] the engine failed ({type(batcher.failure).__name__}: {batcher.failure}); "
                     "the server stopped with status 1.", highlight=False)
        raise typer.Exit(1)
    if not server.started:
        batcher.stop()
        raise typer.Exit(3)  # uvicorn's status for a server that could not start


def parse_effort_budgets(text: str) -> dict[str, int | str]:
    """``--reasoning-effort-budgets``: ``low=256,medium=1024,high=auto`` -> a budget per effort."""
    budgets = dict(DEFAULT_EFFORT_BUDGETS)
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in REASONING_EFFORTS:
            raise UserError(f"--reasoning-effort-budgets: {part!r} is not EFFORT=BUDGET with EFFORT one of "
                            f"{', '.join(REASONING_EFFORTS)} (write e.g. low=256,medium=1024,high=4096).")
        budgets[name] = parse_thinking_budget(value, f"--reasoning-effort-budgets {name}")
    return budgets


def _open_index(index: Path | None, k: int, retriever: str | None, qdrant_url: str | None, qdrant_api_key: str | None):
    """The index of --index, checked (and its retriever loaded) before the model loads; and the
    retrieval settings for requests that give none."""
    if index is None:
        for flag, value in (("--retriever", retriever), ("--qdrant-url", qdrant_url)):
            if value:
                raise UserError(f"{flag} is for retrieval: give the index with --index DIR.")
        return None, None
    from t0s1.rag import RagRequest, open_index
    from t0s1.rag.answer import MAX_REQUEST_SOURCES

    if not 0 <= k <= MAX_REQUEST_SOURCES:
        raise UserError(f"--k must be 0 to {MAX_REQUEST_SOURCES} (the number of sources), got {k}.")
    opened = open_index(index, qdrant_url=qdrant_url, qdrant_api_key=qdrant_api_key)
    opened.retriever(retriever)  # an unknown retriever fails now; a dense one loads its embedder once
    return opened, RagRequest(k=k, retriever=retriever)


@exit_on_user_error
def chat(
    model: ModelOption = EMBEDDED_MODEL,
    max_thinking_tokens: MaxThinkingOption = str(BUDGET_DEFAULTS.max_thinking_tokens),
    num_ignore: NumIgnoreOption = BUDGET_DEFAULTS.num_ignore,
    ignore_str: IgnoreStrOption = BUDGET_DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswerOption = BUDGET_DEFAULTS.max_answer_tokens,
    temperature: TemperatureOption = BUDGET_DEFAULTS.temperature,
    top_p: TopPOption = BUDGET_DEFAULTS.top_p,
    seed: SeedOption = BUDGET_DEFAULTS.seed,
    backend: EngineBackendOption = "auto",
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    reasoning_format: ReasoningFormatOption = None,
    end_phrase: EndPhraseOption = None,
    answer_prefix: AnswerPrefixOption = None,
    thinking: ThinkingOption = None,
    chat_template_kwargs: ChatTemplateKwargsOption = None,
    index: RagIndexOption = None,
    k: RagKOption = 5,
    retriever: RetrieverChoice = None,
    qdrant_url: QdrantUrlOption = None,
    qdrant_api_key: QdrantKeyOption = None,
) -> None:
    """Chat in the terminal: the thinking streams dimmed, then the answer.

    With --index, each question is answered over the sources retrieved for it.

    Commands: /budget N|auto, /wait K, /reset, /exit.
    """
    from t0s1.models import load_model
    from t0s1.serving.chat import run_chat

    budget = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature,
                               top_p, seed, end_phrase=end_phrase, answer_prefix=answer_prefix)
    template_kwargs = parse_chat_template_kwargs(chat_template_kwargs, thinking)
    opened, rag = _open_index(index, k, retriever, qdrant_url, qdrant_api_key)
    with stderr.status(f"Loading {model}..."):
        lm = load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format, backend=backend)
    run_chat(lm, budget, chat_template_kwargs=template_kwargs, index=opened, rag=rag)


LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]
"""The Host headers a loopback server without --api-key answers (others: a 400)."""


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
