"""``t0s1 serve`` (an OpenAI-compatible server with budget forcing) and ``t0s1 chat``."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer
from rich.console import Console

from t0s1.cli_support import exit_on_user_error
from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing
from t0s1.models import EMBEDDED_MODEL

DEFAULTS = BudgetForcing()
"""The budget flags' defaults are BudgetForcing's own."""

stderr = Console(stderr=True)

Model = Annotated[str, typer.Option("--model", "-m", help="Embedded name, model directory, .gguf file or hub id.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
ReasoningFormatName = Annotated[
    str | None, typer.Option("--reasoning-format", help="chatml, think-tags or 'START,END' (default: by the template).")
]
MaxThinking = Annotated[
    str, typer.Option("--max-thinking-tokens", help="Thinking budget in tokens (injected ones count), or 'auto'.")
]
NumIgnore = Annotated[int, typer.Option("--num-ignore", help="Ignore the end of thinking this many times (s1: Wait).")]
IgnoreStr = Annotated[str, typer.Option("--ignore-str", help="Appended when the end of thinking is ignored.")]
MaxAnswer = Annotated[int, typer.Option("--max-answer-tokens", help="At most this many answer tokens.")]
Temperature = Annotated[float, typer.Option(help="0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p")]
Seed = Annotated[int, typer.Option(help="Seed for sampling.")]


def budget_from_flags(max_thinking_tokens: str, num_ignore: int, ignore_str: str, max_answer_tokens: int,
                      temperature: float, top_p: float, seed: int) -> BudgetForcing:
    from t0s1.serving.chat import parse_budget_value

    return BudgetForcing(
        max_thinking_tokens=parse_budget_value(max_thinking_tokens),
        num_ignore=num_ignore,
        ignore_str=ignore_str,
        max_answer_tokens=max_answer_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(chat)


@exit_on_user_error
def serve(
    model: Model = EMBEDDED_MODEL,
    host: Annotated[str, typer.Option(help="Address to bind; only this machine by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="T0S1_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most requests generated together.")] = 8,
    max_thinking_tokens: MaxThinking = str(DEFAULTS.max_thinking_tokens),
    num_ignore: NumIgnore = DEFAULTS.num_ignore,
    ignore_str: IgnoreStr = DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswer = DEFAULTS.max_answer_tokens,
    temperature: Temperature = DEFAULTS.temperature,
    top_p: TopP = DEFAULTS.top_p,
    seed: Seed = DEFAULTS.seed,
    device: Device = "auto",
    dtype: Dtype = "auto",
    reasoning_format: ReasoningFormatName = None,
) -> None:
    """Serve a model over an OpenAI-compatible API with budget forcing per request.

    Requests may set max_thinking_tokens (or thinking_budget), num_ignore and ignore_str.

    The flags below are the defaults. See docs/serving.md.
    """
    import uvicorn

    from t0s1.models import load_model
    from t0s1.serving.server import create_app

    defaults = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature,
                                 top_p, seed)
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}.")
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}.")
    if not api_key and not _is_loopback(host):
        stderr.print(f"[yellow]Warning:[/] serving on {host} without --api-key: anyone who can reach it can use it.")
    with stderr.status(f"Loading {model}..."):
        lm = load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format)
    app = create_app(lm, defaults, api_key=api_key, max_batch=max_batch)
    stderr.print(f"Serving [bold]{lm.name}[/] at http://{host}:{port}/v1 (max batch {max_batch}); "
                 f"defaults: thinking budget {defaults.max_thinking_tokens}, num_ignore {defaults.num_ignore}.",
                 highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info")


@exit_on_user_error
def chat(
    model: Model = EMBEDDED_MODEL,
    max_thinking_tokens: MaxThinking = str(DEFAULTS.max_thinking_tokens),
    num_ignore: NumIgnore = DEFAULTS.num_ignore,
    ignore_str: IgnoreStr = DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswer = DEFAULTS.max_answer_tokens,
    temperature: Temperature = DEFAULTS.temperature,
    top_p: TopP = DEFAULTS.top_p,
    seed: Seed = DEFAULTS.seed,
    device: Device = "auto",
    dtype: Dtype = "auto",
    reasoning_format: ReasoningFormatName = None,
) -> None:
    """Chat in the terminal: the thinking streams dimmed, then the answer.

    Commands: /budget N|auto, /wait K, /reset, /exit.
    """
    from t0s1.models import load_model
    from t0s1.serving.chat import run_chat

    budget = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature,
                               top_p, seed)
    with stderr.status(f"Loading {model}..."):
        lm = load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format)
    run_chat(lm, budget)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
