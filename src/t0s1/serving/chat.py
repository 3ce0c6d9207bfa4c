"""``t0s1 chat``: a terminal chat that streams the thinking (dimmed), then the answer.

Commands: ``/budget N`` (or ``/budget auto``) sets the thinking budget, ``/wait K`` how many times
the end of thinking is ignored ("Wait" appended), ``/reset`` forgets the conversation, ``/exit``
quits (so does end of input). The conversation keeps each answer with its thinking as
``reasoning_content``; the model's chat template decides whether earlier thinking is shown to it
(Qwen3 drops it; templates that do not read it drop it).

With a retrieval index (``t0s1 chat --index DIR``) each question is answered over the sources
retrieved for it (``t0s1.rag``): they are listed before the thinking, numbered as the prompt cites
them, and the ones the answer cites are named after it. The conversation keeps the questions as
typed, not the sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from rich.console import Console
from rich.markup import escape

from t0s1.cli_support import parse_int_list, parse_thinking_budget
from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing, Result, generate
from t0s1.models import LoadedModel

HELP = (
    "Commands: /budget N|auto (thinking budget in tokens), /wait K (ignore the end of thinking K times), "
    "/reset (new conversation), /help, /exit."
)


def describe(budget: BudgetForcing) -> str:
    return f"thinking budget {budget.max_thinking_tokens}, wait x{budget.num_ignore} ({escape(repr(budget.ignore_str))})"


def run_chat(
    lm: LoadedModel,
    budget: BudgetForcing,
    *,
    read_line: Callable[[str], str] | None = None,
    console: Console | None = None,
    chat_template_kwargs: dict | None = None,
    index=None,
    rag=None,
) -> list[dict]:
    """Chat until ``/exit`` or end of input; returns the conversation.
    ``chat_template_kwargs`` go to the chat template (e.g. ``{"enable_thinking": False}``).
    ``index``: a ``t0s1.rag.Index`` to answer over, with ``rag`` (a ``RagRequest``: k, retriever).

    ``read_line(prompt)`` returns the next line and raises ``EOFError`` at the end of input
    (default: the console's input, with line editing).
    """
    console = console or Console(highlight=False)
    read_line = read_line or (lambda prompt: console.input(prompt))
    messages: list[dict] = []
    console.print(f"[bold]t0s1 chat[/] with {escape(lm.name)}: {describe(budget)}. {HELP}", highlight=False)
    while True:
        try:
            line = read_line("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return messages
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/exit", "/quit"):
                return messages
            try:
                budget, messages = _command(command, argument, budget, messages, console)
            except UserError as error:
                console.print(f"[bold red]Error:[/] {escape(str(error))}", highlight=False)
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt, sources = _with_sources(lm, messages, budget, index, rag, console)
            result = _reply(lm, prompt, budget, console, chat_template_kwargs)
        except UserError as error:  # e.g. the conversation no longer fits the context
            console.print(f"[bold red]Error:[/] {escape(str(error))}", highlight=False)
            result = None
        except KeyboardInterrupt:  # while retrieving (generation has its own)
            console.print("\n[yellow](interrupted)[/]")
            result = None
        if result is None or result.finish_reason == "cancelled":
            messages.pop()  # an interrupted turn is forgotten
            continue
        if sources:
            _show_cited(result.answer, sources, console)
        messages.append({"role": "assistant", "content": result.answer, "reasoning_content": result.thinking})


def _with_sources(lm: LoadedModel, messages: list[dict], budget: BudgetForcing, index, rag, console: Console):
    """The conversation to generate from: with an index, the last question over its sources
    (listed here); and those sources."""
    if index is None or rag is None or rag.k == 0:
        return messages, []
    from t0s1.rag import build_rag_messages, reserve_tokens, retrieve_sources

    question = messages[-1]["content"]
    hits = retrieve_sources(index, question, rag.k, rag.retriever)
    packed = build_rag_messages(lm.tokenizer, question, hits, context_length=lm.context_length,
                                reserved=reserve_tokens(budget, lm.context_length), history=messages[:-1])
    if not packed.sources:
        console.print("[dim italic]no sources found[/]")
    else:
        console.print("[dim italic]sources[/]")
        for number, hit in enumerate(packed.sources, start=1):
            console.print(f"[dim][{number}] [bold]{escape(hit.title)}[/bold] ({hit.retriever} {hit.score:.3f})[/]", highlight=False)
    if packed.dropped:
        console.print(f"[dim]({packed.dropped} more did not fit the context)[/]")
    return packed.messages, packed.sources


def _show_cited(answer: str, sources: list, console: Console) -> None:
    from t0s1.rag.prompt import cited_sources

    cited = cited_sources(answer, len(sources))
    if cited:
        names = "; ".join(f"[{n}] {escape(sources[n - 1].title)}" for n in cited)
        console.print(f"[dim]cited: {names}[/]", highlight=False)
    else:
        console.print("[dim]cited: none of the sources[/]")


def _command(command: str, argument: str, budget: BudgetForcing, messages: list[dict], console: Console):
    if command == "/budget":
        budget = replace(budget, max_thinking_tokens=parse_thinking_budget(argument, "/budget"))
    elif command == "/wait":
        values = parse_int_list(argument, "/wait")
        if len(values) != 1:
            raise UserError(f"/wait takes one number of Waits, got {argument.strip()!r}.")
        budget = replace(budget, num_ignore=values[0])
    elif command == "/reset":
        messages = []
        console.print("[dim]New conversation.[/]")
        return budget, messages
    elif command == "/help":
        console.print(HELP, highlight=False)
        return budget, messages
    else:
        raise UserError(f"Unknown command {command!r}. {HELP}")
    console.print(f"[dim]{describe(budget)}[/]", highlight=False)
    return budget, messages


def _reply(lm: LoadedModel, messages: list[dict], budget: BudgetForcing, console: Console,
           chat_template_kwargs: dict | None = None) -> Result | None:
    """Generate and stream one answer; Ctrl-C stops it (returns None)."""
    shown = {"channel": None}

    def on_delta(_: int, channel: str, text: str) -> None:
        if channel != shown["channel"]:
            if channel == "thinking":
                console.print("[dim italic]thinking[/]")
            else:
                if shown["channel"] == "thinking":
                    console.print()
                console.print("[bold green]answer[/]")
            shown["channel"] = channel
        console.print(text, style="dim" if channel == "thinking" else None, end="", markup=False,
                      highlight=False, soft_wrap=True)

    try:
        [result] = generate(lm, [messages], budget, chat_template_kwargs=chat_template_kwargs, on_delta=on_delta)
    except KeyboardInterrupt:
        console.print("\n[yellow](interrupted)[/]")
        return None
    console.print()
    extended = f", {result.num_ignored} x {budget.ignore_str!r}" if result.num_ignored else ""
    capped = ", budget reached" if result.hit_budget else ""
    console.print(f"[dim]({result.thinking_tokens} thinking + {result.answer_tokens} answer tokens{extended}"
                  f"{capped}, {result.seconds:.1f} s)[/]", highlight=False)
    return result
