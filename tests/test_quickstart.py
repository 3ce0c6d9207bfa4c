"""``t0s1 quickstart`` end to end, shortened (2 training steps, 4 held-out problems)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t0s1.cli import app


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_resumes(tmp_path, smollm2):
    out = tmp_path / "run"
    args = ["quickstart", "--out", str(out), "--steps", "2", "--num-test", "4", "--budgets", "4,8,16,32"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # the table on one line per row
    assert result.exit_code == 0, result.output
    for path in ("data/train.jsonl", "data/test.jsonl", "prepared/prepare_report.json", "model/config.json",
                 "model/README.md", "eval-base/results.json", "eval-trained/results.json", "scaling.png"):
        assert (out / path).exists(), path
    trained = json.loads((out / "eval-trained" / "results.json").read_text())["tasks"]["quickstart-arithmetic"]
    settings = {(s["max_thinking_tokens"], s["num_ignore"]) for s in trained["settings"]}
    assert settings == {(b, k) for b in (4, 8, 16, 32) for k in (0, 1)}
    assert all(s["samples"] == 4 for s in trained["settings"])
    assert {"budget", "wait"} <= set(trained["methods"])
    text = " ".join(result.output.split())
    assert "trained: accuracy %" in text and "base model: accuracy %" in text
    assert "Control" in text and "Scaling" in text and "Performance" in text
    assert f"Plot: {out / 'scaling.png'}" in "".join(result.output.split("\n"))

    again = CliRunner().invoke(app, args)  # every step's output exists: nothing is redone
    assert again.exit_code == 0, again.output
    assert "already prepared" in again.output and "already trained" in again.output


def test_quickstart_rejects_bad_options(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--budgets", "16,-4"])
    assert result.exit_code == 2 and "--budgets" in result.output
