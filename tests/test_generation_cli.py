"""``t0s1 generate`` on the tiny model: human and JSON output, files of prompts, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t0s1 import BudgetForcing, generate
from t0s1.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_json_output_has_the_result_fields(tiny_model_dir, tiny_model):
    result = run("How many r are in raspberry?", "--model", tiny_model_dir, "--max-thinking-tokens", 20,
                 "--num-ignore", 1, "--max-answer-tokens", 8, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = generate(tiny_model, ["How many r are in raspberry?"],
                        BudgetForcing(max_thinking_tokens=20, num_ignore=1, max_answer_tokens=8))[0]
    for key in ("thinking", "answer", "thinking_tokens", "answer_tokens", "num_ignored", "hit_budget", "finish_reason"):
        assert data[key] == getattr(expected, key), key
    assert data["thinking_tokens"] <= 20 and "seconds" in data


def test_human_output_shows_thinking_answer_and_summary(tiny_model_dir):
    result = run("What is 2 + 2?", "--model", tiny_model_dir, "--max-thinking-tokens", 10, "--max-answer-tokens", 5)
    assert result.exit_code == 0, result.output
    assert "Thinking" in result.stdout and "Answer" in result.stdout
    assert "10 thinking tokens (forced by the budget" in result.stdout


def test_file_of_prompts_gives_jsonl_in_order(tiny_model_dir, tiny_model, tmp_path):
    prompts = ["How many r?", "What is 12 + 35?", "Hi", "Wait, let me count."]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    result = run("--file", path, "--out", out, "--model", tiny_model_dir, "--max-thinking-tokens", 16,
                 "--max-answer-tokens", 6, "--batch-size", 3)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == prompts
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    expected = generate(tiny_model, prompts, BudgetForcing(max_thinking_tokens=16, max_answer_tokens=6))
    assert [row["thinking"] for row in rows] == [r.thinking for r in expected]


@pytest.mark.parametrize(
    "args, message",
    [
        (["", "--max-thinking-tokens", "5"], "empty"),
        (["hi", "--max-thinking-tokens", "-1"], "non-negative integer"),
        (["hi", "--max-thinking-tokens", "1.5"], "non-negative integer"),
        (["hi", "--num-ignore", "-1"], "num_ignore"),
        (["hi", "--max-thinking-tokens", "100000"], "context"),
        (["hi", "--model", "./missing-model"], "does not exist"),
        ([], "Give either a PROMPT or --file"),
    ],
)
def test_bad_input_exits_2_with_a_message(tiny_model_dir, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_model_dir)]
    result = runner.invoke(app, ["generate", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_bad_prompt_files_name_the_line(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"question": "no prompt field"}\n')
    result = run("--file", path, "--model", tiny_model_dir)
    assert result.exit_code == 2
    assert "line 2" in result.output and "prompt" in result.output


def test_out_is_written_whole_or_not_at_all(tiny_model_dir, tmp_path):
    """--out without --file, or naming a directory, is refused before the model loads; a run that
    fails on a later batch (a prompt longer than the context) leaves the earlier file as it was."""
    out = tmp_path / "out.jsonl"
    result = run("hi", "--out", out, "--model", tiny_model_dir)
    assert result.exit_code == 2 and "--out writes the rows of --file" in " ".join(result.output.split())
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "word " * 5000}) + "\n")
    result = run("--file", path, "--out", tmp_path, "--model", tiny_model_dir)
    assert result.exit_code == 2 and "is a directory" in " ".join(result.output.split())
    result = run("--file", path, "--json", "--model", tiny_model_dir)  # was silently ignored
    assert result.exit_code == 2 and "--file writes a JSON row per prompt already" in " ".join(result.output.split())
    out.write_text("an earlier run\n")
    result = run("--file", path, "--out", out, "--model", tiny_model_dir, "--max-thinking-tokens", 4, "--batch-size", 1)
    assert result.exit_code == 2, result.output
    assert out.read_text() == "an earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "prompts.jsonl"]  # no temporary file left
    # A run killed before its rename (SIGKILL) leaves its temporary file: the next run writing out removes it,
    # and only its own (another file's is not touched).
    killed, other = tmp_path / ".out.999999999.tmp.jsonl", tmp_path / ".notes.999999999.tmp.jsonl"
    killed.write_text("rows of a killed run\n")
    other.write_text("someone else's\n")
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    result = run("--file", path, "--out", out, "--model", tiny_model_dir, "--max-thinking-tokens", 4)
    assert result.exit_code == 0, result.output
    assert not killed.exists() and other.exists() and len(out.read_text().splitlines()) == 1
