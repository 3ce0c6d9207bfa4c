"""`t0s1 rag traces` and `t0s1 rag synth-questions`: a real `t0s1 serve` as the teacher, the s1K
rows it writes going through `t0s1 prepare` and `t0s1 train`, bad rows and failed replies counted
per row, resuming without losses, --filter-correct, templates, de-duplication."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.errors import UserError
from t0s1.forcing import BudgetForcing
from t0s1.rag.demo import KnowledgeBaseTeacher
from t0s1.rag.questions import read_questions
from t0s1.rag.store import build_index
from t0s1.rag.synth import load_template, parse_questions, synth_questions
from t0s1.rag.synthetic import KnowledgeBase
from t0s1.rag.teacher import Teacher, TeacherReply, split_reasoning
from t0s1.rag.traces import rejected_path, write_traces

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


@pytest.fixture(scope="module")
def knowledge_base():
    return KnowledgeBase(12, seed=3)


@pytest.fixture(scope="module")
def index(tmp_path_factory, knowledge_base):
    return build_index(knowledge_base.documents, tmp_path_factory.mktemp("kb") / "index", progress=False).index


@pytest.fixture(scope="module")
def served(smollm2, one_torch_thread):
    """`t0s1 serve` on the embedded SmolLM2. By default it thinks 16 tokens, "Wait" replacing every
    end of thinking: the untrained 135M model then writes thinking but no answer after the forced
    "Final Answer:". With no thinking (max_thinking_tokens 0) it answers."""
    from t0s1.serving.server import create_app, serve_in_background

    with serve_in_background(create_app(smollm2, BudgetForcing(16, num_ignore=8, max_answer_tokens=16), ui=False)) as url:
        yield f"{url}/v1"


def question_rows(knowledge_base, count=3):
    return [q.to_row() for q in knowledge_base.questions(knowledge_base.people, count, seed=1)]


def write_rows(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in extra_lines), encoding="utf-8")
    return path


def test_reasoning_comes_from_the_reasoning_field_or_think_tags():
    assert split_reasoning("Paris [1]", "The source says Paris.") == ("The source says Paris.", "Paris [1]")
    assert split_reasoning("<think>\nThe source says Paris.\n</think>\n\nParis [1]") == ("The source says Paris.", "Paris [1]")
    assert split_reasoning("Paris [1]") == ("", "Paris [1]")
    assert split_reasoning("The source says</think>Paris") == ("The source says", "Paris")


def test_a_teacher_reply_cut_by_its_token_limit_or_far_too_long_is_an_error_reply():
    """A reply cut at max_tokens ('The capital is Par') became a training trace, and a 5 MB one was
    taken whole."""
    from types import SimpleNamespace as Reply

    from t0s1.rag.teacher import OpenAITeacher, TeacherRequest

    def teacher(content, finish, reasoning=None):
        message = Reply(content=content, reasoning_content=reasoning)
        completions = Reply(create=lambda **request: Reply(choices=[Reply(message=message, finish_reason=finish)]))
        return OpenAITeacher("m", "http://127.0.0.1:9/v1", client=Reply(chat=Reply(completions=completions)), max_tokens=16)

    request = [TeacherRequest([{"role": "user", "content": "q"}])]
    assert "cut by its token limit" in teacher("<think>reasoning</think>The capital is Par", "length").reply(request)[0].error
    assert "cut by its token limit" in teacher("The patient should be giv", "length", "reasoning").reply(request)[0].error
    assert "at most 1,000,000 are taken" in teacher("x" * 2_000_000, "stop").reply(request)[0].error
    whole = teacher("<think>reasoning</think>The capital is Paris [1]", "stop").reply(request)[0]
    assert whole.error is None and whole.answer == "The capital is Paris [1]"


def test_traces_refuse_another_student_packing_and_a_batch_size_below_one(knowledge_base, index, tmp_path):
    """The student's context and tokenizer pack the sources: a rerun with another context appended
    rows packed otherwise to the same file. A batch size of 0 was a traceback, -1 did nothing."""
    from t0s1.data.prepare import load_tokenizer
    from t0s1.models import EMBEDDED_MODEL
    from t0s1.rag.questions import read_questions
    from t0s1.rag.teacher import Teacher, TeacherReply
    from t0s1.rag.traces import write_traces

    class Echo(Teacher):
        name = "echo"

        def reply(self, requests):
            return [TeacherReply("thinking", "an answer") for _ in requests]

    questions = read_questions(write_rows(tmp_path / "q.jsonl", question_rows(knowledge_base, 2)), index=index).questions
    tokenizer, out = load_tokenizer(EMBEDDED_MODEL), tmp_path / "traces.jsonl"
    write_traces(questions[:1], index, Echo(), out, tokenizer=tokenizer, context_length=8192, reserved_tokens=600, progress=False)
    with pytest.raises(UserError, match="context_length differ"):
        write_traces(questions, index, Echo(), out, tokenizer=tokenizer, context_length=1200, reserved_tokens=600, progress=False)
    for size in (0, -1):
        with pytest.raises(UserError, match="--batch-size must be at least 1"):
            write_traces(questions, index, Echo(), out, tokenizer=tokenizer, context_length=8192, reserved_tokens=600, batch_size=size,
                         progress=False)
    write_traces(questions, index, Echo(), out, tokenizer=tokenizer, context_length=8192, reserved_tokens=600, progress=False)
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        synth_questions(knowledge_base.documents[:2], Echo(), tmp_path / "questions.jsonl", batch_size=0, progress=False)


def test_traces_from_a_served_teacher_pass_prepare_and_train(served, knowledge_base, index, tmp_path):
    questions = write_rows(tmp_path / "questions.jsonl", question_rows(knowledge_base), extra_lines=[
        json.dumps({"question": "", "gold_ids": [knowledge_base.people[0].name]}),
        json.dumps({"question": "Who keeps goats?", "gold_ids": ["Nobody Here"]}),
    ])
    out = tmp_path / "traces.jsonl"
    args = ["rag", "traces", "--index", str(index.path), "--questions", str(questions), "--out", str(out),
            "--teacher", "smollm2-135m-instruct", "--base-url", served, "--k", "2", "--max-thinking-tokens", "64",
            "--teacher-max-thinking-tokens", "0", "--teacher-max-tokens", "24"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 traces written" in flat(result.output) and "2 question rows skipped" in flat(result.output)
    assert "line 4: the question is empty" in flat(result.output) and "'Nobody Here' is not a document" in flat(result.output)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row, asked in zip(rows, question_rows(knowledge_base), strict=True):
        assert set(row) == {"question", "solution", "cot_type", "source_type", "metadata", "cot", "thinking_trajectories", "attempt"}
        metadata = json.loads(row["metadata"])
        assert metadata["question"] == asked["question"] and metadata["gold_ids"] == asked["gold_ids"]
        assert len(metadata["sources"]) == 2 and metadata["teacher"] == "smollm2-135m-instruct"
        # the question carries the numbered sources the student will see
        assert row["question"].endswith(f"Question: {asked['question']}")
        assert all(f"[{n}] {doc}" in row["question"] for n, doc in enumerate(metadata["sources"], start=1))
        assert row["attempt"].startswith("Final Answer:") and len(row["attempt"]) > 14 and row["solution"] == asked["answer"]

    again = runner.invoke(app, args)  # a rerun asks nothing again
    assert again.exit_code == 0 and "0 traces written" in flat(again.output) and "(3 there already)" in flat(again.output)
    assert len(out.read_text().splitlines()) == 3

    prepared = tmp_path / "prepared"
    prepare = runner.invoke(app, ["prepare", "--dataset", str(out), "--out", str(prepared), "--block-size", "512"])
    assert prepare.exit_code == 0, prepare.output
    assert json.loads((prepared / "prepare_report.json").read_text())["rows_out"] == 3
    from t0s1.training.sft import main as train

    trainer = train(["quickstart-rag", "--dataset_name", str(prepared), "--output_dir", str(tmp_path / "model"),
                     "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "512",
                     "--merge_lora", "false", "--save_strategy", "no", "--logging_steps", "1"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "model" / "adapter_model.safetensors").is_file()


def test_a_served_teacher_that_thinks_but_gives_no_answer_is_counted_per_row_and_asked_again(served, knowledge_base, index, tmp_path):
    questions = write_rows(tmp_path / "questions.jsonl", question_rows(knowledge_base))
    out = tmp_path / "traces.jsonl"
    args = ["rag", "traces", "--index", str(index.path), "--questions", str(questions), "--out", str(out),
            "--teacher", "smollm2-135m-instruct", "--base-url", served, "--k", "2"]
    for _ in range(2):  # failed questions are asked again on a rerun
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "0 traces written" in flat(result.output) and "3 failed" in flat(result.output)
        assert flat(result.output).count("holds no answer (only thinking") == 3
        assert out.read_text() == ""
    rejected = [json.loads(line) for line in rejected_path(out).read_text().splitlines()]
    assert [row["kind"] for row in rejected] == ["failed"] * 6

    from t0s1.rag.teacher import OpenAITeacher, TeacherRequest

    reply = OpenAITeacher("smollm2-135m-instruct", served).reply([TeacherRequest([{"role": "user", "content": "Hi"}])])[0]
    assert len(reply.thinking) > 10 and "holds no answer" in reply.error  # the thinking comes from reasoning_content


def test_synth_questions_through_a_served_teacher_counts_each_document(served, index, tmp_path):
    out = tmp_path / "questions.jsonl"
    args = ["rag", "synth-questions", str(index.path), "--out", str(out), "--teacher", "smollm2-135m-instruct",
            "--base-url", served, "--limit", "2", "--per-document", "1", "--teacher-max-tokens", "24"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rejected = [json.loads(line) for line in rejected_path(out).read_text().splitlines()] if rejected_path(out).exists() else []
    documents = {index.document(0).id, index.document(1).id}
    # A 135M teacher seldom writes the Question/Answer form: every document is either used or named as failed.
    assert {doc for row in rows for doc in row["gold_ids"]} | {row["id"] for row in rejected} == documents
    assert f"{len(rows)} questions written" in flat(result.output) and f"{len(rejected)} documents failed" in flat(result.output)
    for row in rows:
        assert row["question"] and row["answer"] and row["teacher"] == "smollm2-135m-instruct"


class ScriptedTeacher(Teacher):
    """Replies from a list, in order; records what it was asked."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.asked = list(replies), []

    def reply(self, requests):
        self.asked += [request.messages[-1]["content"] for request in requests]
        return [self.replies.pop(0) for _ in requests]


def test_synth_parses_deduplicates_and_resumes(knowledge_base, tmp_path):
    documents = knowledge_base.documents[:4]
    out = tmp_path / "questions.jsonl"
    first = ScriptedTeacher([
        TeacherReply("", f"Question: Where does {documents[0].id} live?\nAnswer: There\n\n1. Question: Where does "
                         f"{documents[0].id} live\nAnswer: Again"),
        TeacherReply("", f"**Question 1:** How many goats does {documents[1].id} keep?\n**Answer:** 5"),
        TeacherReply(error="could not reach the teacher"),
        TeacherReply("", "I cannot write questions."),
    ])
    report = synth_questions(documents, first, out, per_document=2, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["question"], row["answer"], row["gold_ids"]) for row in rows] == [
        (f"Where does {documents[0].id} live?", "There", [documents[0].id]),
        (f"How many goats does {documents[1].id} keep?", "5", [documents[1].id]),
    ]
    assert report.written == 2 and report.duplicates == 1 and [p.id for p in report.failed] == [documents[2].id, documents[3].id]
    assert documents[0].text in first.asked[0] and "2 questions" in first.asked[0]
    assert read_questions(out).questions[0].id == rows[0]["id"]  # a question file rag eval reads

    second = ScriptedTeacher([TeacherReply("", f"Question: where does {documents[0].id.upper()} LIVE?\nAnswer: x"),
                              TeacherReply("", f"Question: Who is {documents[3].id}?\nAnswer: A goat keeper")])
    report = synth_questions(documents, second, out, per_document=2, progress=False)
    assert len(second.asked) == 2 and documents[2].text in second.asked[0]  # only the failed ones are asked again
    assert report.already_done == 2 and report.written == 1 and report.duplicates == 1
    assert len(out.read_text().splitlines()) == 3


def test_templates_are_files_checked_before_use(tmp_path):
    assert "{text}" in load_template()
    (tmp_path / "bad.txt").write_text("Ask about {document}: {text}")
    with pytest.raises(UserError, match=r"\{document\}"):
        load_template(tmp_path / "bad.txt")
    (tmp_path / "blind.txt").write_text("Ask about {title}.")
    with pytest.raises(UserError, match="never shows the document"):
        load_template(tmp_path / "blind.txt")
    assert parse_questions("Q: One?\nA: 1\nQuestion: dangling\n\nquestion 3: Three?\nanswer 3: 3") == [("One?", "1"), ("Three?", "3")]


class Failing(Teacher):
    """Fails on the questions it is told to (no answer), else answers as the knowledge base."""

    name = "sometimes"

    def __init__(self, knowledge_base, fail_ids):
        self.inner, self.fail_ids, self.asked = KnowledgeBaseTeacher(knowledge_base), set(fail_ids), []

    def reply(self, requests):
        self.asked += [request.question.id for request in requests]
        return [TeacherReply("thinking only", "", "the teacher's reply holds no answer") if request.question.id in self.fail_ids
                else self.inner.reply([request])[0] for request in requests]


def test_filter_correct_failures_and_rerun(knowledge_base, index, tmp_path):
    rows = question_rows(knowledge_base, 4)
    rows[1]["answer"] = "a wrong answer"
    questions = read_questions(write_rows(tmp_path / "q.jsonl", rows), index=index).questions
    out = tmp_path / "traces.jsonl"
    teacher = Failing(knowledge_base, fail_ids=[rows[2]["id"]])
    common = dict(tokenizer=_tokenizer(), context_length=8192, reserved_tokens=128, k=3, filter_correct=True, progress=False)
    report = write_traces(questions, index, teacher, out, **common)
    assert report.written == 2 and [p.id for p in report.incorrect] == [rows[1]["id"]] and [p.id for p in report.failed] == [rows[2]["id"]]
    assert "holds no answer" in report.summary()
    written = [json.loads(json.loads(line)["metadata"]) for line in out.read_text().splitlines()]
    assert [meta["id"] for meta in written] == [rows[0]["id"], rows[3]["id"]] and all(meta["correct"] for meta in written)
    kinds = {row["id"]: row["kind"] for row in map(json.loads, rejected_path(out).read_text().splitlines())}
    assert kinds == {rows[1]["id"]: "incorrect", rows[2]["id"]: "failed"}

    teacher = Failing(knowledge_base, fail_ids=[])
    report = write_traces(questions, index, teacher, out, **common)
    assert teacher.asked == [rows[2]["id"]]  # the failed one only; the incorrect one stays rejected
    assert report.written == 1 and report.already_done == 3 and len(out.read_text().splitlines()) == 3
    with pytest.raises(UserError, match=r"traces made with other settings \(k differ"):  # would append rows made otherwise
        write_traces(questions, index, teacher, out, **{**common, "k": 2})
    assert len(out.read_text().splitlines()) == 3


def _tokenizer():
    from t0s1.data.prepare import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
