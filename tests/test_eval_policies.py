"""``t0s1 eval`` and ``t0s1 rag eval`` with test-time policies as sweep dimensions."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t0s1.backends.engine import EngineBackend
from t0s1.cli import app
from t0s1.errors import UserError
from t0s1.evaluation.runner import EvalConfig, expand_policies, run_eval
from t0s1.evaluation.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _config(**overrides):
    base = dict(model="tiny", max_thinking_tokens=[4, 8], num_ignore=[0], max_answer_tokens=6, batch_size=2,
                temperature=1.0, seed=3, policies=expand_policies(["budget", "vote"], {}, n=2))
    base.update(overrides)
    return EvalConfig(**base)


def _without_seconds(results: dict) -> dict:
    """results.json less the wall times (they differ between two runs of the same samples)."""
    copy = json.loads(json.dumps(results))
    for task in copy["tasks"].values():
        for setting in task["settings"]:
            setting.pop("seconds")
    return copy


def test_two_policies_by_two_budgets_resume_to_the_same_results(tiny_model, shared_data_dir, tmp_path):
    tasks, config, backend = [get_task("gsm8k")], _config(), EngineBackend(tiny_model)
    assert [s.key for s in config.settings] == [
        "budget=4,ignore=0,policy=budget", "budget=8,ignore=0,policy=budget",
        "budget=4,ignore=0,policy=vote[n=2]", "budget=8,ignore=0,policy=vote[n=2]"]
    whole = run_eval(backend, tasks, config, tmp_path / "whole", data_dir=shared_data_dir, limit=3, progress=False)

    task = whole["tasks"]["gsm8k"]
    assert whole["config"]["policies"] == ["budget", "vote[n=2]"]
    assert whole["scaling_unit"].startswith("accuracy points (%) per 1,000 average total generated tokens")
    rows = _rows(tmp_path / "whole" / "samples" / "gsm8k.jsonl")
    assert len(rows) == 3 * 4
    for setting in task["settings"]:
        mine = [r for r in rows if r["setting"] == setting["setting"]]
        assert setting["policy"] == mine[0]["policy"] and len(mine) == setting["samples"] == 3
        assert setting["total_tokens"] == sum(r["total_tokens"] for r in mine)
        correct = sum(r["correct"] for r in mine)
        assert setting["tokens_per_correct"] == (round(setting["total_tokens"] / correct, 4) if correct else None)
        assert setting["seconds"] > 0
    for row in rows:
        generated = sum(t["generated_tokens"] for t in row["traces"])
        assert row["total_tokens"] >= generated > 0  # every trace counted
        assert len(row["traces"]) == (2 if row["policy"] == "vote[n=2]" else 1)
        assert row["thinking_tokens"] <= row["max_thinking_tokens"]  # budget forcing applies to every policy
    # one trace: the carrier's reply is the whole generation
    for row in rows:
        if row["policy"] == "budget":
            assert row["total_tokens"] == row["traces"][0]["generated_tokens"]
    # a vote spends about twice a single trace's tokens at the same budget
    by_key = {s["setting"]: s for s in task["settings"]}
    assert by_key["budget=8,ignore=0,policy=vote[n=2]"]["total_tokens"] > by_key["budget=8,ignore=0,policy=budget"]["total_tokens"]
    # s1's metrics per policy over the budgets, against total tokens
    assert set(task["methods"]) == {"budget", "vote[n=2]"}
    for method in task["methods"].values():
        assert len(method["points"]) == 2 and method["control"] == 100.0
    assert (tmp_path / "whole" / "gsm8k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "whole" / "results.md").read_text()
    assert "| policy |" in report and "| vote[n=2] |" in report and "tokens per correct" in report

    class Killed(Exception):
        pass

    def kill_after_third_batch(task_name, batch):
        if batch == 2:
            raise Killed

    with pytest.raises(Killed):
        run_eval(backend, tasks, config, tmp_path / "resumed", data_dir=shared_data_dir, limit=3, progress=False,
                 on_batch=kill_after_third_batch)
    log = tmp_path / "resumed" / "samples" / "gsm8k.jsonl"
    assert len(_rows(log)) == 2 + 1 + 2  # batches of 2 and 1 questions: the first setting, then 2 of the second
    with log.open("a", encoding="utf-8") as handle:  # a kill in the middle of a write
        handle.write('{"task": "gsm8k", "setting": "budg')
    computed = []
    resumed = run_eval(backend, tasks, config, tmp_path / "resumed", data_dir=shared_data_dir, limit=3, progress=False,
                       on_batch=lambda t, b: computed.append(b))
    assert computed == [3, 4, 5, 6, 7]  # only what was missing
    assert _without_seconds(resumed) == _without_seconds(whole)
    keys = [(r["setting"], r["id"], r["sample"]) for r in _rows(log)]
    assert len(keys) == len(set(keys)) == 3 * 4
    same = {k: v for k, v in json.loads(json.dumps(_rows(log)[0])).items() if k != "seconds"}
    first = next(r for r in rows if (r["setting"], r["id"]) == (same["setting"], same["id"]))
    assert same == {k: v for k, v in first.items() if k != "seconds"}  # the same generation


def test_a_rerun_after_a_policy_default_changed_is_refused_and_new_policies_are_recorded(tiny_model, shared_data_dir, tmp_path, monkeypatch):
    """Labels leave out parameters at their defaults and key the rows: policies.json keeps each
    label's full parameters, so rows made with an old default are never reused under a new one."""
    import dataclasses

    from t0s1 import policies

    backend, tasks = EngineBackend(tiny_model), [get_task("gsm8k")]
    run_eval(backend, tasks, _config(max_thinking_tokens=[4]), tmp_path, data_dir=shared_data_dir, limit=1, progress=False)
    recorded = json.loads((tmp_path / "policies.json").read_text())
    assert recorded == {"budget": {"n": 1}, "vote[n=2]": {"n": 2}}
    # another policy in the same folder: added to the record
    more = _config(max_thinking_tokens=[4], policies=expand_policies(["vote", "deepconf"], {}, n=2))
    run_eval(backend, tasks, more, tmp_path, data_dir=shared_data_dir, limit=1, progress=False)
    recorded = json.loads((tmp_path / "policies.json").read_text())
    assert set(recorded) == {"budget", "vote[n=2]", "deepconf[n=2]"} and recorded["deepconf[n=2]"]["window"] == 2048

    @dataclasses.dataclass(frozen=True)
    class NarrowerDeepConf(policies.DeepConf):  # an upgrade that changed a default
        window: int = 16

    monkeypatch.setitem(policies.POLICIES, "deepconf", NarrowerDeepConf)
    changed = _config(max_thinking_tokens=[4], policies=expand_policies(["deepconf"], {}, n=2))
    with pytest.raises(UserError, match=r"deepconf\[n=2\]: window 2048 then, 16 now"):
        run_eval(backend, tasks, changed, tmp_path, data_dir=shared_data_dir, limit=1, progress=False)
    assert json.loads((tmp_path / "policies.json").read_text()) == recorded  # a refused rerun changes nothing


def test_greedy_budget_policy_gives_the_plain_samples(tiny_model, shared_data_dir, tmp_path):
    """--policy budget is today's budget forcing: the same replies, now with total tokens."""
    backend, tasks = EngineBackend(tiny_model), [get_task("gsm8k")]
    plain = _config(temperature=0.0, policies=[], max_thinking_tokens=[8], num_ignore=[0, 1])
    policy = _config(temperature=0.0, policies=expand_policies(["budget"]), max_thinking_tokens=[8], num_ignore=[0, 1])
    assert plain.generation_key() == policy.generation_key()  # policies are sweep dimensions, not part of the key
    run_eval(backend, tasks, plain, tmp_path / "plain", data_dir=shared_data_dir, limit=2, progress=False)
    results = run_eval(backend, tasks, policy, tmp_path / "policy", data_dir=shared_data_dir, limit=2, progress=False)
    fields = ("id", "thinking", "output", "thinking_tokens", "answer_tokens", "num_ignored", "extracted", "correct")
    plain_rows = [{f: r[f] for f in fields} for r in _rows(tmp_path / "plain" / "samples" / "gsm8k.jsonl")]
    policy_rows = [{f: r[f] for f in fields} for r in _rows(tmp_path / "policy" / "samples" / "gsm8k.jsonl")]
    assert sorted(plain_rows, key=str) == sorted(policy_rows, key=str)
    assert set(results["tasks"]["gsm8k"]["methods"]) == {"budget", "budget (Wait)"}


def test_plain_run_is_unchanged(tiny_model, shared_data_dir, tmp_path):
    """Without policies: the same setting keys, no policy fields in the rows, the token fields added."""
    config = _config(temperature=0.0, policies=[])
    assert [s.key for s in config.settings] == ["budget=4,ignore=0", "budget=8,ignore=0"]
    results = run_eval(EngineBackend(tiny_model), [get_task("gsm8k")], config, tmp_path, data_dir=shared_data_dir, limit=2, progress=False)
    assert "policies" not in results["config"] and "seconds" not in json.dumps(results)
    for setting in results["tasks"]["gsm8k"]["settings"]:
        assert "policy" not in setting
        rows = [r for r in _rows(tmp_path / "samples" / "gsm8k.jsonl") if r["setting"] == setting["setting"]]
        assert setting["total_tokens"] == sum(r["thinking_tokens"] + r["answer_tokens"] for r in rows)
        assert not {"policy", "total_tokens", "traces"} & set(rows[0])


def test_policy_parameters_are_sweep_dimensions():
    policies = expand_policies(["budget", "vote", "deepconf"], {"window": "64", "keep_percent": "10,90"}, n=8)
    assert [p.label() for p in policies] == ["budget", "vote", "deepconf[window=64,keep_percent=10]", "deepconf[window=64]"]
    assert [p.label() for p in expand_policies(["vote", "short-m-of-k"], {"n": "4,8", "m": "2"})] == [
        "vote[n=4]", "vote", "short-m-of-k[n=4,m=2]", "short-m-of-k[m=2]"]


@pytest.mark.parametrize(
    ("names", "args", "n", "message"),
    [
        (["budget", "nope"], {}, None, "unknown policy 'nope'"),
        (["budget", "vote"], {"window": "64"}, None, "--policy-arg window: none of the policies budget, vote has it"),
        (["budget", "probe"], {}, 4, "--n applies to the policies that run several traces"),
        (["deepconf"], {"keep_percent": "10,200"}, None, "keep_percent must be a number in (0, 100]"),
        (["deepconf"], {"mode": "online"}, 8, "warm-up"),
        ([" "], {}, None, "no policy given"),
    ],
)
def test_bad_policies_are_user_errors(names, args, n, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        expand_policies(names, args, n)


def test_config_refuses_what_policies_cannot_do():
    with pytest.raises(UserError, match="greedy decoding"):
        _config(temperature=0.0)
    with pytest.raises(UserError, match="engine backends"):
        _config(backend="openai")


# ---- command line ------------------------------------------------------------------------


def test_eval_cli_with_policies(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--limit", "2", "--max-thinking-tokens", "4,8",
            "--max-answer-tokens", "4", "--data-dir", str(shared_data_dir), "--out", str(out), "--device", "cpu",
            "--policy", "budget,vote", "--n", "2", "--temperature", "1.0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "results.json").read_text())["tasks"]["gsm8k"]["settings"]
    assert [s["policy"] for s in settings] == ["budget", "budget", "vote[n=2]", "vote[n=2]"]
    assert "vote[n=2]" in result.output  # printed as text, not as markup


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "budget,nope"], "unknown policy 'nope'"),
        (["--policy", "budget", "--policy-arg", "window=64"], "none of the policies budget has it"),
        (["--policy", "vote", "--n", "0", "--temperature", "1"], "n must be a positive integer"),
        (["--policy", "vote"], "greedy decoding"),
        (["--n", "4"], "give the policies with --policy"),
        (["--policy", "vote", "--temperature", "1", "--backend", "openai", "--base-url", "http://localhost:1/v1"], "engine backends"),
    ],
)
def test_eval_cli_bad_policies_exit_2(args, message, shared_data_dir):
    result = CliRunner().invoke(app, ["eval", "--tasks", "gsm8k", "--out", "x", "--data-dir", str(shared_data_dir), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


# ---- rag eval ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag_index(tmp_path_factory):
    from t0s1.rag.corpus import Document
    from t0s1.rag.store import build_index

    documents = [Document("A", "Apples", "Apples grow on trees in orchards."),
                 Document("B", "Bananas", "Bananas are yellow fruit from the tropics.")]
    return build_index(documents, tmp_path_factory.mktemp("rag-policies") / "index", progress=False).index


def test_rag_eval_with_policies(rag_index, tiny_model_dir, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps(row) for row in [
        {"id": "q1", "question": "apples orchards trees", "gold_ids": ["A"], "answer": "trees"},
        {"id": "q2", "question": "yellow fruit", "gold_ids": ["B"], "answer": "bananas"},
    ]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    args = ["rag", "eval", "--index", str(rag_index.path), "--questions", str(questions), "--out", str(out), "--k", "1",
            "--model", str(tiny_model_dir), "--device", "cpu", "--max-thinking-tokens", "4,8", "--max-answer-tokens", "4",
            "--policy", "budget,probe", "--policy-arg", "interval=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"rag-k0", "rag-k1", "rag-gold"}
    assert [(row["k"], row["policy"], row["max_thinking_tokens"]) for row in results["accuracy_by_k"]] == [
        (k, policy, budget) for k in ("0", "1", "gold") for policy in ("budget", "probe[interval=2]") for budget in (4, 8)]
    rows = _rows(out / "samples" / "rag-k1.jsonl")
    probes = [row for row in rows if row["policy"] == "probe[interval=2]"]
    assert probes and any(row["probes"] > 0 for row in probes)  # probes forked every 2 thinking tokens, counted
    assert all(row["total_tokens"] >= row["thinking_tokens"] for row in rows)
    assert "probe[inter" in result.output  # the table's column header (as text, not markup; cut to fit)
    assert "probe[interval=2], budget 8" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_thinking.png").is_file()

    greedy_vote = CliRunner().invoke(app, [*args[:-4], "--policy", "vote", "--out", str(tmp_path / "vote")])
    assert greedy_vote.exit_code == 2 and "--temperature" in " ".join(greedy_vote.output.split())
