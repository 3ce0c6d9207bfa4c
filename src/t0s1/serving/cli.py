"""``t0s1 serve`` (an OpenAI-compatible server with budget forcing) and ``t0s1 chat``."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer
from rich.console import Console

from t0s1.cli_support import (
    BUDGET_DEFAULTS,
    AnswerPrefixOption,
    ChatTemplateKwargsOption,
    EndPhraseOption,
    ThinkingOption,
    DeviceOption,
    DtypeOption,
    IgnoreStrOption,
    MaxAnswerOption,
    MaxThinkingOption,
    ModelOption,
    NumIgnoreOption,
    ReasoningFormatOption,
    SeedOption,
    TemperatureOption,
    TopPOption,
    budget_from_flags,
    exit_on_user_error,
    parse_chat_template_kwargs,
)
from t0s1.errors import UserError
from t0s1.models import EMBEDDED_MODEL

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
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most requests generated together.")] = 8,
    max_thinking_tokens: MaxThinkingOption = str(BUDGET_DEFAULTS.max_thinking_tokens),
    num_ignore: NumIgnoreOption = BUDGET_DEFAULTS.num_ignore,
    ignore_str: IgnoreStrOption = BUDGET_DEFAULTS.ignore_str,
    max_answer_tokens: MaxAnswerOption = BUDGET_DEFAULTS.max_answer_tokens,
    temperature: TemperatureOption = BUDGET_DEFAULTS.temperature,
    top_p: TopPOption = BUDGET_DEFAULTS.top_p,
    seed: SeedOption = BUDGET_DEFAULTS.seed,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    reasoning_format: ReasoningFormatOption = None,
    end_phrase: EndPhraseOption = None,
    answer_prefix: AnswerPrefixOption = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the web page (chat, budget compare) at /.")] = True,
) -> None:
    """Serve a model over an OpenAI-compatible API with budget forcing per request.

    Requests may set max_thinking_tokens (or thinking_budget), num_ignore and ignore_str.

    The flags below are the defaults. See docs/serving.md.
    """
    import uvicorn

    from t0s1.models import load_model
    from t0s1.serving.server import create_app

    defaults = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature,
                                 top_p, seed, end_phrase=end_phrase, answer_prefix=answer_prefix)
    if max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {max_batch}.")
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}.")
    if not api_key and not _is_loopback(host):
        stderr.print(f"[yellow]Warning:[/] serving on {host} without --api-key: anyone who can reach it can use it.")
    with stderr.status(f"Loading {model}..."):
        lm = load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format)
    app = create_app(lm, defaults, api_key=api_key, max_batch=max_batch, ui=ui)
    stderr.print(f"Serving [bold]{lm.name}[/] at http://{host}:{port}/v1 (max batch {max_batch}); "
                 f"defaults: thinking budget {defaults.max_thinking_tokens}, num_ignore {defaults.num_ignore}.",
                 highlight=False)
    if ui:
        stderr.print(f"Web page at http://{host}:{port}/", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="info")


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
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    reasoning_format: ReasoningFormatOption = None,
    end_phrase: EndPhraseOption = None,
    answer_prefix: AnswerPrefixOption = None,
    thinking: ThinkingOption = None,
    chat_template_kwargs: ChatTemplateKwargsOption = None,
) -> None:
    """Chat in the terminal: the thinking streams dimmed, then the answer.

    Commands: /budget N|auto, /wait K, /reset, /exit.
    """
    from t0s1.models import load_model
    from t0s1.serving.chat import run_chat

    budget = budget_from_flags(max_thinking_tokens, num_ignore, ignore_str, max_answer_tokens, temperature,
                               top_p, seed, end_phrase=end_phrase, answer_prefix=answer_prefix)
    template_kwargs = parse_chat_template_kwargs(chat_template_kwargs, thinking)
    with stderr.status(f"Loading {model}..."):
        lm = load_model(model, device=device, dtype=dtype, reasoning_format=reasoning_format)
    run_chat(lm, budget, chat_template_kwargs=template_kwargs)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
