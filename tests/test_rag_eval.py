"""`t0s1 rag eval`: retrieval metrics against hand-computed values, bad question rows, the grid of
k x budgets through the evaluation runner, resuming after a kill, t0's inconclusive rule."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from t0s1.backends import make_backend
from t0s1.cli import app
from t0s1.evaluation.runner import EvalConfig
from t0s1.evaluation.tasks import Example
from t0s1.rag.corpus import Document
from t0s1.rag.evaluate import GOLD, RagEvalSpec, RagTask, build_tasks, retrieve_all, run_rag_eval
from t0s1.rag.metrics import score_rankings
from t0s1.rag.questions import read_questions
from t0s1.rag.store import build_index

runner = CliRunner()

DOCUMENTS = [
    Document("A", "Apples", "Apples grow on trees in orchards."),
    Document("B", "Bananas", "Bananas are yellow fruit from the tropics."),
    Document("C", "Cherries", "Cherries are small red stone fruit."),
    Document("D", "Apple pie", "Apple pie is baked with apples and cinnamon."),
]

# bm25 ranks, worked out from the terms each question shares with each document:
#   q1 "apples orchards trees"  gold A     ranking A, D         gold rank 1
#   q2 "cinnamon pie"           gold D     ranking D            gold rank 1
#   q3 "yellow fruit"           gold C     ranking B, C         gold rank 2
#   q4 "red cherries bananas"   gold B, C  ranking C, B         gold ranks 1, 2
#   q5 "cinnamon"               gold B     ranking D            gold not retrieved
QUESTIONS = [
    {"id": "q1", "question": "apples orchards trees", "gold_ids": ["A"], "answer": "trees"},
    {"id": "q2", "question": "cinnamon pie", "gold_ids": "D", "answer": "cinnamon"},
    {"id": "q3", "question": "yellow fruit", "gold_ids": ["C"], "answer": "bananas"},
    {"id": "q4", "question": "red cherries bananas", "gold_ids": ["B", "C"], "answer": "fruit"},
    {"id": "q5", "question": "cinnamon", "gold_ids": ["B"], "answer": "pie"},
]
# By hand, over the 5 questions:
#   p@1      = (1 + 1 + 0 + 1 + 0) / 5        = 0.6
#   p@2      = (1 + 1 + 1 + 1 + 0) / 5        = 0.8
#   recall@1 = (1 + 1 + 0 + 0.5 + 0) / 5      = 0.5
#   recall@2 = (1 + 1 + 1 + 1 + 0) / 5        = 0.8
#   mrr      = (1 + 1 + 1/2 + 1 + 0) / 5      = 0.7
EXPECTED = {"p@1": 0.6, "p@2": 0.8, "recall@1": 0.5, "recall@2": 0.8, "mrr": 0.7}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return build_index(DOCUMENTS, tmp_path_factory.mktemp("rag-eval") / "index", progress=False).index


def write_questions(path, rows, extra_lines=()):
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_metrics_match_hand_computed_values():
    rankings = [["A", "D"], ["D"], ["B", "C"], ["C", "B"], ["D"]]
    gold = [{"A"}, {"D"}, {"C"}, {"B", "C"}, {"B"}]
    scores = score_rankings(rankings, gold, ks=(1, 2)).to_dict()
    for key, value in EXPECTED.items():
        assert scores[key] == pytest.approx(value), key
    # MRR counts only ranks within the depth: the second document at depth 1 scores 0
    assert score_rankings([["B", "C"]], [{"C"}], ks=(1,), depth=1).mrr == 0
    with pytest.raises(ValueError, match="without gold ids"):  # was a miss in p@k and MRR, and nothing in recall
        score_rankings([["A"], ["B"]], [{"A"}, set()])


def test_retrieval_only_reports_hand_computed_metrics_and_skips_bad_rows(index, tmp_path):
    questions = write_questions(tmp_path / "questions.jsonl", QUESTIONS, extra_lines=[
        "{not json",
        json.dumps({"id": "empty", "question": "  ", "gold_ids": ["A"], "answer": "x"}),
        json.dumps({"id": "ghost", "question": "apples", "gold_ids": ["Z"], "answer": "x"}),
        json.dumps({"id": "q1", "question": "apple pie", "gold_ids": ["D"], "answer": "x"}),
        json.dumps({"id": "nogold", "question": "apples"}),
    ])
    out = tmp_path / "out"
    # --model names nothing loadable: --retrieval-only must not load a generator
    result = runner.invoke(app, ["rag", "eval", "--index", str(index.path), "--questions", str(questions), "--out", str(out),
                                 "--k", "1,2", "--retrieval-only", "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 0, result.output
    retrieval = json.loads((out / "results.json").read_text())["retrieval"]
    assert retrieval["queries"] == 5 and retrieval["retriever"] == "bm25"
    for key, value in EXPECTED.items():
        assert retrieval[key] == pytest.approx(value), key
    skipped = json.loads((out / "results.json").read_text())["rag"]["skipped"]
    assert [row["line"] for row in skipped] == [6, 7, 8, 9, 10]
    reasons = " ".join(row["reason"] for row in skipped)
    for expected in ("not valid JSON", "question is empty", "'Z' is not a document of the index", "used by line 1", "no gold"):
        assert expected in reasons
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "5 of 10 rows skipped" in output
    assert "p@1 0.600" in output and "mrr 0.700" in output
    ranks = {row["id"]: row["gold_ranks"] for row in map(json.loads, (out / "retrieval.jsonl").read_text().splitlines())}
    assert ranks["q3"] == {"C": 2} and ranks["q4"] == {"B": 2, "C": 1} and ranks["q5"] == {"B": None}


def test_a_file_without_usable_questions_is_refused(index, tmp_path):
    questions = write_questions(tmp_path / "bad.jsonl", [{"question": "", "gold_ids": ["A"]}])
    result = runner.invoke(app, ["rag", "eval", "--index", str(index.path), "--questions", str(questions),
                                 "--out", str(tmp_path / "out"), "--retrieval-only"])
    assert result.exit_code == 2 and "no usable question" in " ".join(result.output.split())


def test_repeated_gold_ids_count_once(index, tmp_path):
    """A gold id written twice put its source twice in the gold-ceiling prompt."""
    gold = QUESTIONS[0]["gold_ids"][0]
    repeated = {**QUESTIONS[0], "gold_ids": [gold, gold]}
    [question] = read_questions(write_questions(tmp_path / "q.jsonl", [repeated]), index=index).questions
    assert question.gold_ids == (gold,)


def test_grid_prompts_hold_no_sources_the_first_k_or_the_gold_documents(index, tmp_path, tiny_model):
    questions = read_questions(write_questions(tmp_path / "q.jsonl", QUESTIONS), index=index).questions
    spec = RagEvalSpec(ks=(1,))
    retrieval = retrieve_all(index, questions, spec)
    tasks = {task.k: task for task in build_tasks(index, questions, retrieval, spec, tokenizer=tiny_model.tokenizer,
                                                   context_length=2048, reserved_tokens=64)}
    assert list(tasks) == [0, 1, GOLD]
    assert RagEvalSpec(ks=(1, 5, 20), grid_ks=(5,)).grid == [0, 5, GOLD] and RagEvalSpec(ks=(5, 1), baselines=False).grid == [1, 5]
    q3 = {k: next(e for e in task.examples if e.id == "q3") for k, task in tasks.items()}
    assert "(no sources were found)" in q3[0].prompt and "\n[1] " not in q3[0].prompt
    assert "\n[1] Bananas" in q3[1].prompt and "\n[2] " not in q3[1].prompt and q3[1].meta["gold_in_prompt"] is False
    assert "\n[1] Cherries" in q3[GOLD].prompt and "Bananas" not in q3[GOLD].prompt and q3[GOLD].meta["gold_in_prompt"]
    assert all(e.prompt.endswith(f"Question: {e.question}") for task in tasks.values() for e in task.examples)


def test_inconclusive_counts_only_when_no_gold_source_is_in_the_prompt():
    without_gold = Example("q", "question", "prompt", "paris", {"gold_in_prompt": False})
    with_gold = Example("q", "question", "prompt", "paris", {"gold_in_prompt": True})
    inconclusive = "Answer: the answer is inconclusive, no source names the capital."
    strict, t0_rule = RagTask(1, [], "exact", False), RagTask(1, [], "exact", True)
    assert not strict.grade_example(without_gold, inconclusive).correct
    assert t0_rule.grade_example(without_gold, inconclusive).correct
    assert not t0_rule.grade_example(with_gold, inconclusive).correct
    assert t0_rule.grade_example(with_gold, "Answer: Paris [1]").correct
    assert not t0_rule.grade_example(without_gold, "Answer: Lyon").correct


def _eval_args(index, questions, out, model):
    return ["rag", "eval", "--index", str(index.path), "--questions", str(questions), "--out", str(out), "--k", "1,2",
            "--model", str(model), "--device", "cpu", "--max-thinking-tokens", "4,8", "--max-answer-tokens", "6",
            "--batch-size", "2"]


@pytest.mark.usefixtures("one_torch_thread")
def test_grid_runs_and_a_killed_run_resumes_to_the_same_results(index, tmp_path, tiny_model_dir):
    questions = write_questions(tmp_path / "questions.jsonl", QUESTIONS)
    straight = runner.invoke(app, _eval_args(index, questions, tmp_path / "straight", tiny_model_dir))
    assert straight.exit_code == 0, straight.output
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert set(results["tasks"]) == {"rag-k0", "rag-k1", "rag-k2", "rag-gold"}
    assert [(row["k"], row["max_thinking_tokens"]) for row in results["accuracy_by_k"]] == [
        (k, budget) for k in ("0", "1", "2", "gold") for budget in (4, 8)]
    assert results["retrieval"]["p@2"] == pytest.approx(0.8) and results["tasks"]["rag-k2"]["examples"] == 5
    for name in ("results.md", "accuracy_vs_k.png", "accuracy_vs_thinking.png", "samples/rag-gold.jsonl"):
        assert (tmp_path / "straight" / name).is_file(), name
    assert "gold sources" in straight.output and "budget 8" in straight.output  # the k x budget table

    # The same run, killed in its third batch (the second task), then rerun.
    question_file = read_questions(questions, index=index, need_gold=True, need_answer=True)
    config = EvalConfig(model=str(tiny_model_dir), max_thinking_tokens=[4, 8], num_ignore=[0], max_answer_tokens=6, batch_size=2)
    backend = make_backend("transformers", str(tiny_model_dir), device="cpu")
    calls, sweep = [], backend.sweep

    def killed(prompts, settings):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sweep(prompts, settings)

    backend.sweep = killed
    with pytest.raises(KeyboardInterrupt):
        run_rag_eval(index, question_file, tmp_path / "killed", RagEvalSpec(ks=(1, 2)), backend=backend, config=config, progress=False)
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = runner.invoke(app, _eval_args(index, questions, tmp_path / "killed", tiny_model_dir))
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "killed" / "results.json").read_text() == (tmp_path / "straight" / "results.json").read_text()
    for name in ("rag-k0", "rag-k1", "rag-k2", "rag-gold"):
        rows = (tmp_path / "killed" / "samples" / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) == 5 * 2 and len({(r["id"], r["setting"]) for r in map(json.loads, rows)}) == 10

    # The same corpus indexed again (another build, which may chunk or rank otherwise) is refused,
    # and the refused run leaves the folder's retrieval log as it was.
    rebuilt = build_index(DOCUMENTS, tmp_path / "rebuilt", progress=False).index
    logged = (tmp_path / "killed" / "retrieval.jsonl").read_bytes()
    other_build = runner.invoke(app, _eval_args(rebuilt, questions, tmp_path / "killed", tiny_model_dir))
    assert other_build.exit_code == 2 and "index_build_id" in " ".join(other_build.output.split())
    assert (tmp_path / "killed" / "retrieval.jsonl").read_bytes() == logged
    only = runner.invoke(app, [*_eval_args(index, questions, tmp_path / "killed", tiny_model_dir), "--retrieval-only"])
    assert only.exit_code == 2 and "holds a full evaluation" in " ".join(only.output.split())

    # Other prompts (a changed questions file) are refused instead of mixed in.
    write_questions(questions, QUESTIONS[:4])
    changed = runner.invoke(app, _eval_args(index, questions, tmp_path / "killed", tiny_model_dir))
    assert changed.exit_code == 2 and "questions_sha256" in " ".join(changed.output.split())


@pytest.mark.usefixtures("one_torch_thread")
def test_a_rerun_with_other_grading_rules_regrades_the_logged_rows(index, tmp_path, tiny_model_dir):
    questions = write_questions(tmp_path / "questions.jsonl", QUESTIONS)

    def args(out, *grading):
        return ["rag", "eval", "--index", str(index.path), "--questions", str(questions), "--out", str(out), "--k", "1",
                "--no-baselines", "--model", str(tiny_model_dir), "--device", "cpu", "--max-thinking-tokens", "4",
                "--max-answer-tokens", "6", "--batch-size", "5", *grading]

    first = runner.invoke(app, args(tmp_path / "run"))
    assert first.exit_code == 0, first.output
    regraded = runner.invoke(app, args(tmp_path / "run", "--answer-kind", "choice", "--inconclusive-counts"))
    assert regraded.exit_code == 0, regraded.output
    grader = "rules (choice, inconclusive counts without a gold source)"
    assert f"rag-k1: re-graded 5 logged samples with {grader}" in " ".join(regraded.output.split())
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples" / "rag-k1.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {row["grader"] for row in rows} == {grader}
    fresh = runner.invoke(app, args(tmp_path / "fresh", "--answer-kind", "choice", "--inconclusive-counts"))
    assert fresh.exit_code == 0, fresh.output
    assert (tmp_path / "run" / "results.json").read_text() == (tmp_path / "fresh" / "results.json").read_text()
