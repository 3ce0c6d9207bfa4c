"""`t0s1 eval` / `t0s1 grade`: sweeps, resumption, metrics, files, CLI errors (tiny model)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from t0s1.backends import Backend
from t0s1.backends.engine import EngineBackend
from t0s1.cli import app
from t0s1.cli_support import parse_int_list
from t0s1.errors import UserError
from t0s1.evaluation import metrics
from t0s1.evaluation.runner import LATER_KEY_FIELDS, EvalConfig, run_eval
from t0s1.evaluation.tasks import get_task

VOLATILE = {"seconds"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SeparateRuns(Backend):
    """The engine without prefix sharing: every setting generated on its own (Backend.sweep)."""

    name = "transformers"

    def __init__(self, lm):
        self.inner = EngineBackend(lm)
        self.calls = 0

    def generate(self, prompts, budgets):
        self.calls += 1
        return self.inner.generate(prompts, budgets)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _config(**overrides):
    base = dict(model="tiny", max_thinking_tokens=[4, 8, 16], num_ignore=[0, 2], max_answer_tokens=6, batch_size=3)
    base.update(overrides)
    return EvalConfig(**base)


def test_sweep_equals_separate_runs_sample_by_sample(tiny_model, shared_data_dir, tmp_path):
    tasks = [get_task("gsm8k")]
    config = _config(batch_size=3)
    shared = run_eval(EngineBackend(tiny_model), tasks, config, tmp_path / "sweep", data_dir=shared_data_dir, limit=5, progress=False)
    separate_backend = SeparateRuns(tiny_model)
    separate = run_eval(separate_backend, tasks, config, tmp_path / "separate", data_dir=shared_data_dir, limit=5, progress=False)
    assert separate_backend.calls == 2 * len(config.settings)  # 2 batches x 6 settings, no sharing
    rows_shared = {(r["setting"], r["id"]): r for r in _rows(tmp_path / "sweep" / "samples" / "gsm8k.jsonl")}
    rows_separate = {(r["setting"], r["id"]): r for r in _rows(tmp_path / "separate" / "samples" / "gsm8k.jsonl")}
    assert len(rows_shared) == 5 * 6 and rows_shared.keys() == rows_separate.keys()
    for key, row in rows_shared.items():
        other = rows_separate[key]
        assert {k: v for k, v in row.items() if k not in VOLATILE} == {k: v for k, v in other.items() if k not in VOLATILE}, key
    assert shared == separate
    # The sweep really exercised the forcing rules: budgets were hit and Waits were injected.
    assert any(r["hit_budget"] for r in rows_shared.values())
    assert {r["thinking_tokens"] <= r["max_thinking_tokens"] for r in rows_shared.values()} == {True}


def test_killed_run_resumes_without_duplicates_or_losses(tiny_model, shared_data_dir, tmp_path):
    tasks = [get_task("gsm8k"), get_task("aime24")]
    config = _config(max_thinking_tokens=[4, 8], num_ignore=[0, 1], batch_size=2)
    backend = EngineBackend(tiny_model)
    whole = run_eval(backend, tasks, config, tmp_path / "whole", data_dir=shared_data_dir, limit=5, progress=False)

    class Killed(Exception):
        pass

    def kill_after_second_batch(task, batch):
        if (task, batch) == ("gsm8k", 1):
            raise Killed

    with pytest.raises(Killed):
        run_eval(backend, tasks, config, tmp_path / "resumed", data_dir=shared_data_dir, limit=5, progress=False, on_batch=kill_after_second_batch)
    log = tmp_path / "resumed" / "samples" / "gsm8k.jsonl"
    assert len(_rows(log)) == 2 * 2 * 4  # two batches of two questions, four settings each
    assert not (tmp_path / "resumed" / "results.json").exists()
    with log.open("a", encoding="utf-8") as handle:  # a kill in the middle of a write
        handle.write('{"task": "gsm8k", "setting": "budg')
    computed = []
    resumed = run_eval(backend, tasks, config, tmp_path / "resumed", data_dir=shared_data_dir, limit=5, progress=False, on_batch=lambda t, b: computed.append((t, b)))
    assert computed == [("gsm8k", 2), ("aime24", 0), ("aime24", 1), ("aime24", 2)]  # only what was missing
    assert resumed == whole
    assert (tmp_path / "resumed" / "results.json").read_bytes() == (tmp_path / "whole" / "results.json").read_bytes()
    rows = _rows(log)
    keys = [(r["setting"], r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 5 * 4
    # A third run computes nothing and changes nothing.
    computed.clear()
    again = run_eval(backend, tasks, config, tmp_path / "resumed", data_dir=shared_data_dir, limit=5, progress=False, on_batch=lambda t, b: computed.append((t, b)))
    assert computed == [] and again == whole


def test_outputs_metrics_and_plot(tiny_model, shared_data_dir, tmp_path):
    config = _config()
    results = run_eval(EngineBackend(tiny_model), [get_task("math500")], config, tmp_path, data_dir=shared_data_dir, limit=3, progress=False)
    task = results["tasks"]["math500"]
    assert [s["setting"] for s in task["settings"]] == [s.key for s in config.settings]
    assert set(task["methods"]) == {"budget", "wait"}
    budget = task["methods"]["budget"]
    assert budget["control"] == 100.0  # budget forcing never exceeds its cap
    assert len(budget["points"]) == 3
    assert results["scaling_unit"].startswith("accuracy points (%) per 1,000")
    png = (tmp_path / "math500.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "results.md").read_text()
    assert "## math500" in report and "| 16 | 2 |" in report and "Scaling" in report
    row = _rows(tmp_path / "samples" / "math500.jsonl")[0]
    for field in ("prompt", "output", "thinking", "thinking_tokens", "extracted", "gold", "correct"):
        assert field in row
    assert "seconds" not in json.dumps(results)  # timings live in timings.json
    assert json.loads((tmp_path / "timings.json").read_text())[0]["seconds_per_task"]["math500"] > 0


def test_sampling_gives_majority_vote_and_pass_at_k(tiny_model, shared_data_dir, tmp_path):
    config = _config(max_thinking_tokens=[8], num_ignore=[0], samples=4, temperature=1.0, batch_size=4)
    results = run_eval(EngineBackend(tiny_model), [get_task("gsm8k")], config, tmp_path, data_dir=shared_data_dir, limit=2, progress=False)
    setting = results["tasks"]["gsm8k"]["settings"][0]
    assert setting["samples"] == 8
    assert set(setting["pass_at_k"]) == {"1", "2", "4"}
    assert "majority_vote" in setting
    curve = results["tasks"]["gsm8k"]["methods"]["majority_vote"]["points"]
    assert len(curve) == 3 and curve[0][0] < curve[1][0] < curve[2][0]  # more samples, more tokens
    rows = _rows(tmp_path / "samples" / "gsm8k.jsonl")
    outputs = {r["thinking"] for r in rows}
    assert len(outputs) > 1  # samples differ
    # Reproducible: the same seeds give the same samples.
    run_eval(EngineBackend(tiny_model), [get_task("gsm8k")], config, tmp_path / "again", data_dir=shared_data_dir, limit=2, progress=False)
    again = _rows(tmp_path / "again" / "samples" / "gsm8k.jsonl")
    assert [r["thinking"] for r in again] == [r["thinking"] for r in rows]


def test_rerun_with_other_settings_is_refused(tiny_model, shared_data_dir, tmp_path):
    backend = EngineBackend(tiny_model)
    run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0]), tmp_path, data_dir=shared_data_dir, limit=1, progress=False)
    with pytest.raises(UserError, match="max_answer_tokens"):
        run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0], max_answer_tokens=9), tmp_path, data_dir=shared_data_dir, limit=1, progress=False)


@pytest.fixture
def yes_judge():
    """An OpenAI-compatible chat endpoint on loopback that judges every answer right (a stand-in
    for a hosted judge such as gpt-4o-mini); yields the judge and the requests it received."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from t0s1.evaluation.judge import LLMJudge

    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            reply = json.dumps({
                "id": "judge", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Yes"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LLMJudge("yes-judge", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="none"), requests
    finally:
        server.shutdown()
        server.server_close()


def test_a_resumed_run_regrades_logged_rows_with_the_current_grader(tiny_model, shared_data_dir, tmp_path, yes_judge, capfd):
    judge, requests = yes_judge
    tasks, backend = [get_task("gsm8k")], EngineBackend(tiny_model)
    config = _config(max_thinking_tokens=[4], num_ignore=[0], batch_size=2)
    log = tmp_path / "run" / "samples" / "gsm8k.jsonl"
    ruled = run_eval(backend, tasks, config, tmp_path / "run", data_dir=shared_data_dir, limit=2, progress=False)
    assert ruled["tasks"]["gsm8k"]["settings"][0]["accuracy"] == 0.0  # a random model is never right by the rules
    generations = {row["id"]: row["output"] for row in _rows(log)}
    capfd.readouterr()

    # Resumed with a judge and more questions: the logged rows are judged too, not left rule-graded.
    judged = run_eval(backend, tasks, config, tmp_path / "run", data_dir=shared_data_dir, limit=4, progress=False, judge=judge)
    said = capfd.readouterr().err
    task = judged["tasks"]["gsm8k"]
    assert task["settings"][0]["accuracy"] == 100.0  # every row judged, none left rule-graded
    assert task["grader"] == "LLM judge (yes-judge)"
    rows = _rows(log)
    assert len(rows) == 4 and len(requests) == 4
    assert {row["grader"] for row in rows} == {"LLM judge (yes-judge)"}
    assert all(row["correct"] and row["rule_correct"] is False for row in rows)
    assert {row["id"]: row["output"] for row in rows if row["id"] in generations} == generations  # generation reused
    assert "gsm8k: re-graded 2 logged samples with LLM judge (yes-judge) (graded before 2 by rules (number))" in said

    # Back to the rules: the judge's verdicts go, and the results equal a run graded by rules only.
    run_eval(backend, tasks, config, tmp_path / "run", data_dir=shared_data_dir, limit=4, progress=False)
    assert {row["grader"] for row in _rows(log)} == {"rules (number)"} and not any("rule_correct" in row for row in _rows(log))
    run_eval(backend, tasks, config, tmp_path / "fresh", data_dir=shared_data_dir, limit=4, progress=False)
    assert (tmp_path / "run" / "results.json").read_bytes() == (tmp_path / "fresh" / "results.json").read_bytes()


def test_metrics_definitions():
    points = [(100.0, 10.0), (200.0, 20.0), (400.0, 20.0)]
    # slopes per 1,000 tokens: (10/100, 10/300, 0/200) * 1000 = 100, 33.33, 0 -> mean 44.44
    assert metrics.scaling(points) == pytest.approx((100 + 100 / 3 + 0) / 3)
    assert metrics.scaling([(100.0, 5.0)]) is None
    assert metrics.performance(points) == 20.0
    assert metrics.control([(10, 16), (17, 16), (5, None), (16, 16)]) == 75.0
    assert metrics.majority_answer(["3", None, "4", "4", "3"]) == "3"  # tie: the first seen
    assert metrics.majority_answer([None, None]) is None
    assert metrics.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert metrics.pass_at_k(4, 1, 4) == 1.0
    assert metrics.pass_at_k(4, 0, 2) == 0.0


def test_config_validation():
    assert parse_int_list("256, 512,auto,256", "--max-thinking-tokens", allow_auto=True) == [256, 512, "auto"]
    with pytest.raises(UserError, match="negative"):
        parse_int_list("16,-1", "--max-thinking-tokens")
    with pytest.raises(UserError, match="--num-ignore: .lots. is not a non-negative integer"):
        parse_int_list("16,lots", "--num-ignore")
    with pytest.raises(UserError, match="--temperature"):
        EvalConfig(model="m", samples=4)


# ---- command line ------------------------------------------------------------------------


def test_eval_cli_end_to_end(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(tiny_model_dir), "--tasks", "gsm8k,aime25", "--limit", "2", "--max-thinking-tokens", "4,8",
         "--num-ignore", "0,1", "--max-answer-tokens", "4", "--data-dir", str(shared_data_dir), "--out", str(out), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"gsm8k", "aime25"}
    assert (out / "gsm8k.png").exists() and (out / "aime25.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--tasks", "mmlu", "--out", "x"], "Unknown task 'mmlu'"),
        (["eval", "--tasks", "gsm8k", "--out", "x", "--max-thinking-tokens", "16,-2"], "negative"),
        (["eval", "--tasks", "gsm8k", "--out", "x", "--samples", "3"], "--temperature"),
        (["eval", "--tasks", "gsm8k", "--out", "x", "--backend", "openai"], "--base-url"),
        (["eval", "--tasks", "gsm8k"], "--out"),
    ],
)
def test_eval_cli_bad_input_exits_2(args, message, shared_data_dir):
    result = CliRunner().invoke(app, [*args, "--data-dir", str(shared_data_dir)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_eval_cli_refuses_before_loading_a_model_an_out_that_is_a_file_and_a_benchmark_file_without_questions(tmp_path, shared_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / get_task("gsm8k").local_file).write_text("")
    result = CliRunner().invoke(app, ["eval", "--tasks", "gsm8k", "--out", str(tmp_path / "run"), "--data-dir", str(data)])
    assert result.exit_code == 2 and "holds no questions" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    result = CliRunner().invoke(app, ["eval", "--tasks", "gsm8k", "--out", str(taken), "--data-dir", str(shared_data_dir)])
    assert result.exit_code == 2 and "is a file; give a directory" in " ".join(result.output.split())
    assert taken.read_text() == "keep me"


def test_a_rerun_with_another_reasoning_format_or_dtype_is_refused_and_older_run_keys_still_resume(tiny_model, shared_data_dir, tmp_path):
    """The delimiters (--reasoning-format), the weights' dtype, the tokenizer and the context length
    change the samples: a rerun that changes them would mix samples of two setups in one
    results.json, and so would one that sets a field the first run left unset. A key written by an
    earlier version (no key_version, unset fields left out) still resumes as it did."""
    backend = EngineBackend(tiny_model)
    first = _config(max_thinking_tokens=[4], num_ignore=[0], reasoning_format="think", dtype="bfloat16")
    run_eval(backend, [get_task("gsm8k")], first, tmp_path / "run", data_dir=shared_data_dir, limit=1, progress=False)
    for change in ({"reasoning_format": "s1"}, {"dtype": "float32"}, {"context_length": 512}, {"tokenizer": "other/tokenizer"}):
        changed = _config(max_thinking_tokens=[4], num_ignore=[0], **{"reasoning_format": "think", "dtype": "bfloat16", **change})
        with pytest.raises(UserError, match=next(iter(change))):
            run_eval(backend, [get_task("gsm8k")], changed, tmp_path / "run", data_dir=shared_data_dir, limit=1, progress=False)

    unset = tmp_path / "unset"  # every later field unset (as on llama.cpp without --context-length)
    run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0]), unset, data_dir=shared_data_dir, limit=1, progress=False)
    assert json.loads((unset / "config.json").read_text())["context_length"] is None
    with pytest.raises(UserError, match="context_length"):
        run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0], context_length=512), unset,
                 data_dir=shared_data_dir, limit=1, progress=False)

    def as_earlier_versions_wrote(folder, keep=()):
        key = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({name: value for name, value in key.items() if name != "key_version"
                                                        and value is not None and (name not in LATER_KEY_FIELDS or name in keep)}))

    older = tmp_path / "older"  # before the later fields were recorded
    run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0]), older, data_dir=shared_data_dir, limit=1, progress=False)
    as_earlier_versions_wrote(older)
    run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0], dtype="float32"), older,
             data_dir=shared_data_dir, limit=1, progress=False)
    with pytest.raises(UserError, match="end_phrase"):
        run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0], end_phrase="Final Answer:"), older,
                 data_dir=shared_data_dir, limit=1, progress=False)
    recorded = tmp_path / "recorded"  # after: a later field it left out was unset
    run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0], dtype="float32"), recorded,
             data_dir=shared_data_dir, limit=1, progress=False)
    as_earlier_versions_wrote(recorded, keep=("dtype",))
    run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0], dtype="float32"), recorded,
             data_dir=shared_data_dir, limit=1, progress=False)
    with pytest.raises(UserError, match="reasoning_format"):
        run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0], dtype="float32", reasoning_format="s1"),
                 recorded, data_dir=shared_data_dir, limit=1, progress=False)


def test_a_rerun_removes_the_temporary_files_a_killed_run_left(tiny_model, shared_data_dir, tmp_path):
    """A kill between a file's write and its rename leaves ``.NAME.PID.tmp``; the next run in the
    folder removes those of dead processes (a running writer's stay)."""
    import os

    backend, config = EngineBackend(tiny_model), _config(max_thinking_tokens=[4], num_ignore=[0])
    run_eval(backend, [get_task("gsm8k")], config, tmp_path, data_dir=shared_data_dir, limit=1, progress=False)
    dead = [tmp_path / ".results.json.999999999.tmp", tmp_path / ".gsm8k.999999999.tmp.png",
            tmp_path / "samples" / ".gsm8k.jsonl.999999999.tmp"]
    for path in dead:
        path.write_text("half a file")
    running, unrelated = tmp_path / f".report.md.{os.getpid()}.tmp", tmp_path / ".notes.tmp"
    running.write_text("being written")
    unrelated.write_text("not ours")
    run_eval(backend, [get_task("gsm8k")], config, tmp_path, data_dir=shared_data_dir, limit=1, progress=False)
    assert not any(path.exists() for path in dead) and running.exists() and unrelated.exists()


@pytest.mark.parametrize("damage", [("config.json", "[]"), ("samples/gsm8k.jsonl", "[1, 2]\n"), ("samples/gsm8k.jsonl", b"\xff\xfe\n")])
def test_damaged_run_files_are_a_clear_error(tiny_model, shared_data_dir, tmp_path, damage):
    backend = EngineBackend(tiny_model)
    config = _config(max_thinking_tokens=[4], num_ignore=[0])
    run_eval(backend, [get_task("gsm8k")], config, tmp_path, data_dir=shared_data_dir, limit=1, progress=False)
    name, content = damage
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match="not"):
        run_eval(backend, [get_task("gsm8k")], config, tmp_path, data_dir=shared_data_dir, limit=1, progress=False)


def test_a_rerun_with_nothing_to_plot_leaves_no_earlier_plot(tiny_model, shared_data_dir, tmp_path):
    backend = EngineBackend(tiny_model)
    run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4, 8], num_ignore=[0]), tmp_path, data_dir=shared_data_dir,
             limit=1, progress=False)
    assert (tmp_path / "gsm8k.png").exists()
    results = run_eval(backend, [get_task("gsm8k")], _config(max_thinking_tokens=[4], num_ignore=[0]), tmp_path,
                       data_dir=shared_data_dir, limit=1, progress=False)
    assert not results["tasks"]["gsm8k"]["methods"] and not (tmp_path / "gsm8k.png").exists()


def test_list_tasks(shared_data_dir):
    result = CliRunner().invoke(app, ["eval", "--list-tasks"])
    assert result.exit_code == 0
    for name in ("aime24", "aime24_nofigures", "aime25", "math500", "gpqa_diamond", "gsm8k"):
        assert name in result.output


def test_grade_cli(shared_data_dir, tmp_path):
    examples = get_task("math500").load(shared_data_dir, limit=3)
    predictions = tmp_path / "predictions.jsonl"
    lines = [
        {"id": examples[0].id, "output": f"So the answer is $\\boxed{{{examples[0].gold}}}$."},
        {"index": 1, "output": "Final Answer: 123456789"},
        {"id": examples[2].id, "output": f"<|im_start|>think\nhmm\n<|im_start|>answer\nAnswer: ${examples[2].gold}$"},
    ]
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "verdicts.jsonl"
    result = CliRunner().invoke(app, ["grade", "--task", "math500", "--predictions", str(predictions), "--out", str(out), "--data-dir", str(shared_data_dir)])
    assert result.exit_code == 0, result.output
    assert "66.67%" in result.output
    verdicts = _rows(out)
    assert [v["id"] for v in verdicts] == [e.id for e in examples]
    assert [v["correct"] for v in verdicts] == [True, False, True]
    assert verdicts[1]["extracted"] == "123456789" and verdicts[1]["gold"] == examples[1].gold
    assert set(verdicts[0]) == {"id", "extracted", "gold", "correct"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"id": "test/x.json"}, "line 2: missing the field `output`"),
        ({"output": "1"}, "line 2: missing `id`"),
        ({"id": "nope", "output": "1"}, "line 2: id 'nope' is not in math500"),
        ({"index": 999, "output": "1"}, "line 2: index 999 is out of range"),
    ],
)
def test_grade_cli_bad_predictions(line, message, shared_data_dir, tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"index": 0, "output": "1"}) + "\n" + json.dumps(line) + "\n")
    result = CliRunner().invoke(app, ["grade", "--task", "math500", "--predictions", str(predictions), "--data-dir", str(shared_data_dir)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


# ---- the real model ----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gsm8k_sweep_resumes_to_the_same_results(smollm2, shared_data_dir, tmp_path):
    """>= 20 GSM8K problems at 3 budgets on the embedded model; a killed run, resumed, matches."""
    tasks = [get_task("gsm8k")]
    config = EvalConfig(model="smollm2-135m-instruct", max_thinking_tokens=[16, 32, 64], num_ignore=[0], max_answer_tokens=16, batch_size=10)
    backend = EngineBackend(smollm2)
    whole = run_eval(backend, tasks, config, tmp_path / "whole", data_dir=shared_data_dir, limit=20, progress=False)
    assert [s["samples"] for s in whole["tasks"]["gsm8k"]["settings"]] == [20, 20, 20]
    assert (tmp_path / "whole" / "gsm8k.png").exists() and (tmp_path / "whole" / "results.md").exists()
    # "Kill" after the first batch: keep its rows plus a torn line, as a SIGKILL mid-write leaves them.
    resumed = tmp_path / "resumed"
    (resumed / "samples").mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / "config.json", resumed / "config.json")
    rows = (tmp_path / "whole" / "samples" / "gsm8k.jsonl").read_text().splitlines(keepends=True)
    (resumed / "samples" / "gsm8k.jsonl").write_text("".join(rows[:30]) + rows[30][:40])
    computed = []
    again = run_eval(backend, tasks, config, resumed, data_dir=shared_data_dir, limit=20, progress=False, on_batch=lambda t, b: computed.append(b))
    assert computed == [1]  # only the lost batch was generated again
    assert (resumed / "results.json").read_bytes() == (tmp_path / "whole" / "results.json").read_bytes()
    assert again == whole
