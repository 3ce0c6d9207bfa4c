"""``t0s1 quickstart``: what Wait changes (from sample rows), and the whole loop, shortened."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.quickstart.pipeline import SUMMARY_FILE, budget_curves, wait_effects


def sample(budget: int, ignore: int, problem: str, *, correct: bool, hit_budget: bool, tokens: int) -> dict:
    """A sample row as ``t0s1 eval`` writes it (only the fields the quickstart reads)."""
    return {"max_thinking_tokens": budget, "num_ignore": ignore, "id": problem, "correct": correct,
            "hit_budget": hit_budget, "thinking_tokens": tokens}


def test_wait_effects_count_fixed_and_broken_answers_and_the_self_stopped_problems():
    rows = [
        # p1 stopped on its own with a wrong answer; the Wait fixes it.
        sample(64, 0, "p1", correct=False, hit_budget=False, tokens=40),
        sample(64, 1, "p1", correct=True, hit_budget=False, tokens=60),
        # p2 stopped on its own, right; the Wait breaks it.
        sample(64, 0, "p2", correct=True, hit_budget=False, tokens=30),
        sample(64, 1, "p2", correct=False, hit_budget=True, tokens=64),
        # p3 ran out of budget: no Wait was appended, the answer is the same.
        sample(64, 0, "p3", correct=False, hit_budget=True, tokens=64),
        sample(64, 1, "p3", correct=False, hit_budget=True, tokens=64),
        # p4 stopped on its own, right, and stays right.
        sample(64, 0, "p4", correct=True, hit_budget=False, tokens=35),
        sample(64, 1, "p4", correct=True, hit_budget=False, tokens=50),
    ]
    (effect,) = wait_effects(rows, [64], [0, 1])
    assert (effect.budget, effect.num_ignore) == (64, 1)
    assert (effect.accuracy_without_wait, effect.accuracy, effect.gain) == (50.0, 50.0, 0.0)
    assert (effect.fixed, effect.broken, effect.self_stopped) == (1, 1, 3)
    assert effect.self_stopped_accuracy_without_wait == effect.self_stopped_accuracy == pytest.approx(200 / 3, abs=1e-3)


def test_wait_effects_report_a_gain_on_all_and_on_the_self_stopped_problems():
    rows = []
    for i in range(10):  # ten problems that stop on their own; Wait fixes three of the six wrong ones
        right_without = i < 4
        rows.append(sample(128, 0, f"p{i}", correct=right_without, hit_budget=False, tokens=50))
        rows.append(sample(128, 2, f"p{i}", correct=right_without or i < 7, hit_budget=False, tokens=90))
    rows += [sample(128, 0, "cut", correct=False, hit_budget=True, tokens=128),
             sample(128, 2, "cut", correct=False, hit_budget=True, tokens=128)]
    (effect,) = wait_effects(rows, [128], [0, 2])
    assert effect.num_ignore == 2
    assert effect.accuracy_without_wait == pytest.approx(100 * 4 / 11, abs=1e-3)
    assert effect.accuracy == pytest.approx(100 * 7 / 11, abs=1e-3)
    assert effect.self_stopped == 10
    assert (effect.self_stopped_accuracy_without_wait, effect.self_stopped_accuracy) == (40.0, 70.0)
    assert (effect.fixed, effect.broken) == (3, 0)


def test_budget_curves_give_the_s1_metrics_of_each_num_ignore():
    settings = []
    for budget, accuracy, wait_accuracy in ((16, 10.0, 10.0), (64, 50.0, 60.0)):
        for ignore, value in ((0, accuracy), (1, wait_accuracy)):
            tokens = budget if budget == 16 else 40 + 20 * ignore
            settings.append({"max_thinking_tokens": budget, "num_ignore": ignore, "accuracy": value,
                             "avg_thinking_tokens": float(tokens)})
    settings.append({"max_thinking_tokens": 8, "num_ignore": 0, "accuracy": 0.0, "avg_thinking_tokens": 9.5})  # over its budget
    curves = budget_curves({"settings": settings}, [16, 64], [0, 1])
    assert list(curves) == ["no Wait", "1 Wait"]
    assert curves["no Wait"]["points"] == [[16.0, 10.0], [40.0, 50.0]]
    assert curves["1 Wait"]["points"] == [[16.0, 10.0], [60.0, 60.0]]
    assert curves["no Wait"]["performance"] == 50.0 and curves["1 Wait"]["performance"] == 60.0
    assert curves["no Wait"]["scaling"] == pytest.approx(40 / 24 * 1000, abs=1e-2)
    assert curves["no Wait"]["control"] == 100.0
    assert budget_curves({"settings": settings}, [8, 16, 64], [0])["no Wait"]["control"] == pytest.approx(200 / 3)  # s1: a share of runs


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_resumes(tmp_path, smollm2, one_torch_thread):
    out = tmp_path / "run"
    args = ["quickstart", "--out", str(out), "--steps", "2", "--num-test", "4", "--budgets", "8,16"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # the table on one line per row
    assert result.exit_code == 0, result.output
    for path in ("data/train.jsonl", "data/test.jsonl", "prepared/prepare_report.json", "model/config.json",
                 "model/README.md", "model.q8_0.gguf", "eval-base/results.json", "eval-trained/results.json",
                 "scaling.png", SUMMARY_FILE):
        assert (out / path).exists(), path
    results = json.loads((out / "eval-trained" / "results.json").read_text())
    assert json.loads((out / "eval-trained" / "config.json").read_text())["model"] == str(out / "model.q8_0.gguf")
    assert json.loads((out / "eval-base" / "config.json").read_text())["backend"] == "llamacpp"
    trained = results["tasks"]["quickstart-arithmetic"]
    settings = {(s["max_thinking_tokens"], s["num_ignore"]) for s in trained["settings"]}
    assert settings == {(b, k) for b in (8, 16) for k in (0, 1, 2)}
    assert all(s["samples"] == 4 for s in trained["settings"])
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["backend"] == "llamacpp" and set(summary["seconds"]) == {"data", "prepare", "train", "export", "base", "trained", "policies"}
    policies = {row["policy"].split("[")[0]: row for row in summary["policies"]}
    assert list(policies) == ["budget", "deepconf", "early-exit"]
    assert policies["deepconf"]["total_tokens"] > policies["budget"]["total_tokens"] > 0  # 4 traces against 1
    assert json.loads((out / "eval-policies" / "config.json").read_text())["model"] == str(out / "model.q8_0.gguf")
    assert list(summary["curves"]) == ["no Wait", "1 Wait", "2 Waits"]
    assert {(w["budget"], w["num_ignore"]) for w in summary["wait"]} == {(b, k) for b in (8, 16) for k in (1, 2)}
    text = " ".join(result.output.split())
    assert "no Wait" in text and "1 Wait" in text and "2 Waits" in text and "base" in text
    assert "Control" in text and "Scaling" in text and "Performance" in text
    assert "2 Waits at budget 16:" in text and "Test-time policies on the trained model" in text
    assert f"Plot: {out / 'scaling.png'}" in "".join(result.output.split("\n"))
    # What a newcomer reads: the stage headers, one bar each and the results, no library noise.
    for noise in ("Warning", "Loading weights", "{'loss'", "it/s]", "examples/s]"):
        assert noise not in result.output, noise

    again = CliRunner().invoke(app, args)  # every step's output exists: nothing is redone
    assert again.exit_code == 0, again.output
    assert "already prepared" in again.output and "already trained" in again.output and "already exported" in again.output
    # Other problem counts would test on problems the reused model trained on; other steps would keep
    # that model: both are refused before any work (they ran on, with the old data and model).
    for flag, value, field in (("--num-test", "6", "num_test"), ("--steps", "3", "steps")):
        changed = [*args]
        changed[changed.index(flag) + 1] = value
        refused = CliRunner().invoke(app, changed)
        assert refused.exit_code == 2 and f"({field} differ)" in " ".join(refused.output.split()), refused.output


def test_quickstart_rejects_bad_options(tmp_path):
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--budgets", "16,-4"])
    assert result.exit_code == 2 and "--budgets" in result.output
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--budgets", "64"])
    assert result.exit_code == 2 and "--budgets" in result.output
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--backend", "vllm"])
    assert result.exit_code == 2 and "--backend must be llamacpp or transformers" in result.output
    result = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--quant", "q9"])
    assert result.exit_code == 2 and "Unknown quant type" in result.output
    result = CliRunner().invoke(app, ["quickstart", "--rag", "--out", str(tmp_path), "--backend", "transformers"])
    assert result.exit_code == 2 and "--rag" in result.output
    assert not any(tmp_path.iterdir())
