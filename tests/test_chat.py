"""``t0s1 chat``: the REPL driven by scripted input."""

from __future__ import annotations

import io
import re

from rich.console import Console
from typer.testing import CliRunner

from t0s1 import BudgetForcing
from t0s1.cli import app
from t0s1.serving.chat import run_chat


def scripted(lines):
    """A ``read_line`` that replays ``lines``, then signals the end of input."""
    remaining = list(lines)

    def read_line(prompt: str) -> str:
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return read_line


def chat_with(lm, lines, budget=None):
    output = io.StringIO()
    console = Console(file=output, width=200, force_terminal=False, color_system=None)
    budget = budget or BudgetForcing(max_thinking_tokens=20, max_answer_tokens=6)
    messages = run_chat(lm, budget, read_line=scripted(lines), console=console)
    return messages, output.getvalue()


def token_counts(text):
    return [tuple(map(int, m)) for m in re.findall(r"\((\d+) thinking \+ (\d+) answer tokens", text)]


def test_chat_streams_thinking_then_answer_and_keeps_the_conversation(tiny_model):
    lines = ["How many r are in raspberry?", "And in strawberry?", "/exit", "never read"]
    messages, text = chat_with(tiny_model, lines)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert text.count("thinking\n") == 2 and text.count("answer\n") == 2
    assert text.index("thinking\n") < text.index("answer\n")
    assert len(token_counts(text)) == 2


def test_budget_and_wait_commands_change_the_next_turn(tiny_model):
    lines = ["/budget 5", "How many r are in raspberry?", "/budget 60", "/wait 1", "How many r are in raspberry?"]
    messages, text = chat_with(tiny_model, lines)
    first, second = token_counts(text)
    assert first[0] == 5  # the thinking budget binds
    assert "thinking budget 60, wait x1" in text
    assert "1 x 'Wait'" in text and second[0] > 5
    assert len(messages) == 4


def test_bad_commands_are_reported_and_the_chat_goes_on(tiny_model):
    messages, text = chat_with(tiny_model, ["/budget lots", "/wait -1", "/frobnicate", "/reset", "Hi", "/reset"])
    assert text.count("Error:") == 3
    assert "/budget: 'lots' is not a non-negative integer or auto" in text
    assert "/wait: -1 is negative" in text and "Unknown command" in text
    assert messages == [] and "New conversation." in text
    assert len(token_counts(text)) == 1


def test_what_the_user_typed_is_shown_as_text_never_as_markup(tiny_model):
    """An error repeats the command typed; with "[/x]" in it Rich raised a MarkupError and the chat
    ended with a traceback, its conversation lost. /wait 1,2 quietly took 1."""
    messages, text = chat_with(tiny_model, ["/budget [/x]", "/[/]", "/wait [red]1", "/wait 1,2", "Hi"])
    assert text.count("Error:") == 4 and "'[/x]'" in text and "'/[/]'" in text and "[red]1" in text
    assert "/wait takes one number of Waits, got '1,2'" in text
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_chat_command_reads_stdin(tiny_model_dir):
    result = CliRunner().invoke(
        app, ["chat", "--model", str(tiny_model_dir), "--max-thinking-tokens", "6", "--max-answer-tokens", "3"],
        input="Hi\n/exit\n",
    )
    assert result.exit_code == 0, result.output
    assert "(6 thinking + " in result.output


def test_bad_budget_flags_exit_with_code_2(tiny_model_dir):
    for command in ("chat", "serve"):
        result = CliRunner().invoke(app, [command, "--model", str(tiny_model_dir), "--max-thinking-tokens", "-3"])
        assert result.exit_code == 2
        assert "--max-thinking-tokens: -3 is negative" in " ".join(result.output.split())


def test_chat_never_shows_a_delimiter_written_in_ordinary_tokens():
    """SmolLM2 writes ``</think>`` as ``</`` ``think`` ``>.``: the chat shows the thinking before it,
    never the delimiter, and the conversation keeps the same text."""
    from scripted_model import ScriptedLM
    from transformers import AutoTokenizer

    from t0s1.forcing_rules import render_prompt_ids
    from t0s1.models import embedded_model_dir
    from t0s1.profiles import profile_by_name

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    lm = ScriptedLM(tokenizer, profile_by_name("think"))
    budget = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=6)
    question = "What is 1+1?"
    pieces = ["Let", " me", " think", "</", "think", ">,", " so", " 2", " is", " right", "</", "think", ">.", "\n\n", "2"]
    lm.write(render_prompt_ids(tokenizer, lm.profile, [{"role": "user", "content": question}]), budget,
             [id_ for piece in pieces for id_ in tokenizer(piece, add_special_tokens=False).input_ids])
    messages, text = chat_with(lm, [question], budget)
    assert "Let me thinkWait so 2 is right\nanswer\n2\n" in text
    assert "</" not in text and ">." not in text
    assert messages[-1] == {"role": "assistant", "content": "2", "reasoning_content": "Let me thinkWait so 2 is right"}
