"""What the commands share: the budget flags (defaults from ``BudgetForcing``), model flags, and
user errors turned into one red line and exit code 2."""

from __future__ import annotations

import functools
import json
from typing import Annotated

import typer
from rich.console import Console

from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing

stderr = Console(stderr=True)

BUDGET_DEFAULTS = BudgetForcing()
"""Every command's budget flags default to BudgetForcing's own defaults."""

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="The embedded default, a model directory, a .gguf file or a hub id.")
]
DeviceOption = Annotated[str, typer.Option(help="auto (GPU if any), cpu, cuda, cuda:1, ...")]
BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto (llama.cpp for a .gguf file without a GPU, else transformers) | transformers | llamacpp | vllm | openai.",
    ),
]
ContextLengthOption = Annotated[
    int | None,
    typer.Option(
        "--context-length",
        help="For --backend openai: the served model's context in tokens, when the server's /v1/models does not "
        "report it (needed by 'auto' budgets and the budget checks).",
    ),
]
EngineBackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="auto (llama.cpp for a .gguf file or the embedded default when there is no GPU, else "
        "transformers), transformers (PyTorch), or llamacpp (a .gguf file on llama.cpp).",
    ),
]
DtypeOption = Annotated[str, typer.Option(help="auto (float32 on CPU, bf16 on GPU), float32, bfloat16, float16.")]
ReasoningFormatOption = Annotated[
    str | None,
    typer.Option(
        "--reasoning-format",
        help="Override the detected model profile: s1, think, think-hybrid, think-prefilled, or a custom pair "
        "'START,END' (default: detected from the chat template; see t0s1 generate --explain-format).",
    ),
]
EndPhraseOption = Annotated[
    str | None,
    typer.Option(
        "--end-phrase",
        help="Written before the end of thinking when the budget forces it ('qwen': Qwen's recommended "
        "'Considering the limited time by the user, ...'; default: the profile's, none).",
    ),
]
AnswerPrefixOption = Annotated[
    str | None,
    typer.Option("--answer-prefix", help="Written after a forced end of thinking (default: the profile's; s1: 'Final Answer:')."),
]
ChatTemplateKwargsOption = Annotated[
    str | None,
    typer.Option(
        "--chat-template-kwargs",
        help='JSON object passed to the chat template, e.g. \'{"enable_thinking": false}\' for Qwen3.',
    ),
]
ThinkingOption = Annotated[
    bool | None,
    typer.Option(
        "--thinking/--no-thinking",
        help="Switch thinking on or off (enable_thinking for the chat template). Off: no thinking delimiters, "
        "the model answers at once.",
    ),
]
TrustRemoteCodeOption = Annotated[bool, typer.Option(help="Run code from the model repository (only if you trust it).")]
MaxThinkingOption = Annotated[
    str, typer.Option("--max-thinking-tokens", help="Thinking budget in tokens (injected ones count), or 'auto' (fill the context).")
]
NumIgnoreOption = Annotated[
    int, typer.Option("--num-ignore", help="Ignore the end of thinking this many times, appending --ignore-str (s1: Wait).")
]
IgnoreStrOption = Annotated[str, typer.Option("--ignore-str", help="What to append when the end of thinking is ignored.")]
MaxAnswerOption = Annotated[int, typer.Option("--max-answer-tokens", help="At most this many answer tokens.")]
TemperatureOption = Annotated[float, typer.Option(help="0 = greedy (the default).")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (with --temperature > 0).")]
SeedOption = Annotated[int, typer.Option(help="Seed for sampling.")]
PolicyOption = Annotated[
    str | None,
    typer.Option(
        "--policy",
        help="A test-time policy over budget forcing: budget (one trace), vote (majority of --n traces), deepconf "
        "(confidence-filtered vote; --policy-arg mode=online stops weak traces early), early-exit (DEER: a trial "
        "answer at each end / Wait), probe (Dynasor: a probe answer every 64 thinking tokens), short-m-of-k (stop "
        "when the first m of --n traces finish). Parameters: docs/policies.md.",
    ),
]
NOption = Annotated[int | None, typer.Option("--n", help="Traces per prompt for vote, deepconf, short-m-of-k (default 8).")]
PolicyArgOption = Annotated[
    list[str] | None,
    typer.Option("--policy-arg", help="A policy parameter KEY=VALUE with the paper's name, e.g. window=64 (repeatable)."),
]


def exit_on_user_error(command):
    """Decorate a typer command so that a ``UserError`` prints its message and exits with code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            stderr.print(f"[bold red]Error:[/] {error}", highlight=False)
            raise typer.Exit(code=2) from None

    return wrapper


def budget_from_flags(
    max_thinking_tokens: str,
    num_ignore: int,
    ignore_str: str,
    max_answer_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    *,
    end_phrase: str | None = None,
    answer_prefix: str | None = None,
) -> BudgetForcing:
    """The ``BudgetForcing`` of a command's budget flags (BudgetForcing checks the values)."""
    return BudgetForcing(
        max_thinking_tokens=parse_thinking_budget(max_thinking_tokens),
        num_ignore=num_ignore,
        ignore_str=ignore_str,
        max_answer_tokens=max_answer_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        end_phrase=end_phrase,
        answer_prefix=answer_prefix,
    )


def parse_chat_template_kwargs(text: str | None, thinking: bool | None = None) -> dict | None:
    """``--chat-template-kwargs`` (a JSON object) with ``--thinking/--no-thinking`` as its
    ``enable_thinking``; None when neither is given."""
    kwargs = {}
    if text:
        try:
            kwargs = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"--chat-template-kwargs is not valid JSON ({error}): write e.g. '{{\"enable_thinking\": false}}'.") from None
        if not isinstance(kwargs, dict):
            raise UserError(f"--chat-template-kwargs must be a JSON object, got {text!r}.")
    if thinking is not None:
        if kwargs.get("enable_thinking", thinking) != thinking:
            raise UserError("--thinking/--no-thinking and enable_thinking in --chat-template-kwargs disagree.")
        kwargs["enable_thinking"] = thinking
    return kwargs or None


def parse_int_list(text: str, option: str, *, allow_auto: bool = False) -> list:
    """``"256,512,1024"`` -> [256, 512, 1024] without repeats; a UserError naming the option."""
    values = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if allow_auto and part == "auto":
            values.append("auto")
            continue
        try:
            value = int(part)
        except ValueError:
            raise UserError(
                f"{option}: {part!r} is not a non-negative integer{' or auto' if allow_auto else ''} (write e.g. 256,512,1024)."
            ) from None
        if value < 0:
            raise UserError(f"{option}: {value} is negative; give non-negative integers{' or auto' if allow_auto else ''}.")
        values.append(value)
    if not values:
        raise UserError(f"{option}: no value given (write e.g. 256,512,1024).")
    return list(dict.fromkeys(values))


def parse_thinking_budget(text: str, option: str = "--max-thinking-tokens") -> int | str:
    """One thinking budget typed by a user: a non-negative integer or "auto"."""
    values = parse_int_list(text, option, allow_auto=True)
    if len(values) != 1 or "," in str(text):
        raise UserError(f"{option}: give one budget (a non-negative integer or auto), got {text!r}.")
    return values[0]



class StreamPrinter:
    """An ``on_delta(index, channel, text)`` callback that prints one streamed generation: a bold
    "Thinking" / "Answer" header when each channel starts, the thinking dimmed; ``shown`` says
    which channels have printed."""

    def __init__(self, console: Console):
        self.console = console
        self.shown = {"thinking": False, "answer": False}

    def __call__(self, _index: int, channel: str, text: str) -> None:
        from rich.text import Text

        if not self.shown[channel]:
            self.console.print(Text("Thinking" if channel == "thinking" else "\n\nAnswer", style="bold"))
            self.shown[channel] = True
        self.console.print(Text(text, style="dim" if channel == "thinking" else ""), end="")
