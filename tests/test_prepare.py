"""`t0s1 prepare`: every source schema, the rendering, the report, decontamination and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.data.prepare import PREPARE_REPORT, PREVIEW, prepare
from t0s1.errors import UserError

PROMPT_TAIL = "<|im_start|>assistant\n"


def arithmetic(count: int = 8) -> list[tuple[str, list[str], str]]:
    """(question, thinking pieces, attempt): short traces a small model can learn in a few steps."""
    items = []
    for i in range(count):
        a, b = 12 + 7 * i, 30 + 3 * i
        items.append(
            (
                f"What is {a} + {b}?",
                [f"I need to add {a} and {b}.", f"{a} + {b} = {a + b}.", f"Check: {a + b} - {b} = {a}. Correct."],
                f"The sum is {a + b}.",
            )
        )
    return items


def s1k_rows(count: int = 8) -> list[dict]:
    """Rows in the simplescaling/s1K schema."""
    return [
        {
            "question": question,
            "solution": attempt,
            "cot_type": "math",
            "source_type": "synthetic/arithmetic",
            "metadata": "{}",
            "cot": None,
            "thinking_trajectories": thinking,
            "attempt": attempt,
        }
        for question, thinking, attempt in arithmetic(count)
    ]


def s1k11_rows(count: int = 4) -> list[dict]:
    """Rows in the simplescaling/s1K-1.1 schema (DeepSeek and Gemini traces differ)."""
    return [
        {
            "question": question,
            "solution": attempt,
            "cot_type": "math",
            "source_type": "synthetic/arithmetic",
            "metadata": "{}",
            "gemini_thinking_trajectory": "Gemini: " + " ".join(thinking),
            "gemini_attempt": "Gemini " + attempt,
            "deepseek_thinking_trajectory": "DeepSeek: " + " ".join(thinking),
            "deepseek_attempt": "Answer: " + attempt,
            "gemini_grade": "Yes",
            "gemini_grade_reason": "ok",
            "deepseek_grade": "Yes",
            "deepseek_grade_reason": "ok",
        }
        for question, thinking, attempt in arithmetic(count)
    ]


def tokenized_rows(count: int = 3) -> list[dict]:
    """Rows in the simplescaling/s1K_tokenized schema: one ChatML text rendered with Qwen's template."""
    rows = []
    for question, thinking, attempt in arithmetic(count):
        rows.append(
            {
                "text": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
                f"<|im_start|>think\n{chr(10).join(thinking)}\n<|im_start|>answer\nAnswer: {attempt}<|im_end|>"
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def load_prepared(out: Path) -> list[dict]:
    from datasets import load_from_disk

    return load_from_disk(str(out))["train"].to_list()


def test_s1k_renders_prompt_and_completion_with_chat_template_and_delimiters(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(3))
    report = prepare(str(source), str(tiny_model_dir), tmp_path / "out")
    rows = load_prepared(tmp_path / "out")
    assert report.schema == "s1K" and report.rows_in == report.rows_out == 3
    assert rows[0] == {
        "prompt": f"<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n{PROMPT_TAIL}",
        "completion": "<|im_start|>think\nI need to add 12 and 30.\n12 + 30 = 42.\nCheck: 42 - 30 = 12. Correct.\n"
        "<|im_start|>answer\nAnswer: The sum is 42.<|im_end|>",
    }
    preview = [json.loads(line) for line in (tmp_path / "out" / PREVIEW).read_text().splitlines()]
    assert preview == rows
    saved = json.loads((tmp_path / "out" / PREPARE_REPORT).read_text())
    assert saved["rows_out"] == 3 and saved["end_token"] == "<|im_end|>"
    assert set(saved["token_lengths"]) >= {"p50", "p90", "p95", "p99", "max"}


def test_s1k_1_1_parquet_uses_deepseek_by_default_and_gemini_on_request(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "s1k11.parquet"
    pq.write_table(pa.Table.from_pylist(s1k11_rows(2)), source)
    prepare(str(source), str(tiny_model_dir), tmp_path / "deepseek")
    deepseek = load_prepared(tmp_path / "deepseek")[0]["completion"]
    assert deepseek.startswith("<|im_start|>think\nDeepSeek: ")
    assert "\n<|im_start|>answer\nAnswer: The sum is 42.<|im_end|>" in deepseek  # no second "Answer: "
    prepare(str(source), str(tiny_model_dir), tmp_path / "gemini", trajectory="gemini")
    gemini = load_prepared(tmp_path / "gemini")[0]["completion"]
    assert gemini.startswith("<|im_start|>think\nGemini: ") and "Answer: Gemini The sum" in gemini


def test_tokenized_text_is_split_at_the_assistant_turn(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "tok.jsonl", tokenized_rows(2))
    report = prepare(str(source), str(tiny_model_dir), tmp_path / "out")
    row = load_prepared(tmp_path / "out")[0]
    assert report.schema == "tokenized"
    assert row["prompt"] == f"<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n{PROMPT_TAIL}"  # this model's template
    assert row["completion"].startswith("<|im_start|>think\nI need to add 12 and 30.")
    assert row["completion"].endswith("<|im_start|>answer\nAnswer: The sum is 42.<|im_end|>")
    assert row["completion"].count("<|im_end|>") == 1


def test_generic_file_with_renamed_columns_and_saved_dataset(tmp_path, tiny_model_dir):
    from datasets import Dataset

    rows = [{"problem": q, "reasoning": " ".join(t), "final": a} for q, t, a in arithmetic(2)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    prepare(
        str(tmp_path / "saved"),
        str(tiny_model_dir),
        tmp_path / "out",
        question_column="problem",
        thinking_column="reasoning",
        answer_column="final",
    )
    row = load_prepared(tmp_path / "out")[1]
    assert "What is 19 + 33?" in row["prompt"]
    assert row["completion"].endswith("<|im_start|>answer\nAnswer: The sum is 52.<|im_end|>")


def test_think_profile_for_models_without_chatml_delimiters(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(1))
    prepare(str(source), str(tiny_model_dir), tmp_path / "out", reasoning_format="think")
    completion = load_prepared(tmp_path / "out")[0]["completion"]
    assert completion.startswith("<think>\nI need to add") and "\n</think>\n\nAnswer: The sum is 42." in completion


def test_block_size_truncate_and_drop_are_reported(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = s1k_rows(4)
    rows[0]["thinking_trajectories"] = ["Let me count the letters one by one. " * 30]  # far longer than the rest
    source = write_jsonl(tmp_path / "s1k.jsonl", rows)
    report = prepare(str(source), str(tiny_model_dir), tmp_path / "cut", block_size=120)
    assert report.over_block_size == 1 and report.truncated == 1 and report.rows_out == 4
    assert report.token_lengths["max"] > 120
    cut = load_prepared(tmp_path / "cut")[0]
    assert len(tokenizer(cut["prompt"] + cut["completion"])["input_ids"]) <= 120
    assert cut["completion"].startswith("<|im_start|>think\nLet me count")

    report = prepare(str(source), str(tiny_model_dir), tmp_path / "drop", block_size=120, on_overflow="drop")
    assert report.over_block_size == 1 and report.dropped_over_block_size == 1 and report.rows_out == 3
    assert all("Let me count" not in row["completion"] for row in load_prepared(tmp_path / "drop"))


def test_cli_prints_and_saves_the_report(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(3))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["prepare", "--dataset", str(source), "--model", str(tiny_model_dir), "--out", str(out), "--block-size", "64"],
    )
    assert result.exit_code == 0, result.output
    assert "rows: 3 in -> 3 out" in result.output and "block size 64" in result.output
    assert json.loads((out / PREPARE_REPORT).read_text())["block_size"] == 64


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"question": "q", "thinking": "t"}], "no column 'answer'. Columns found: question, thinking"),
        ([], "is empty"),
        ([{"question": "q", "thinking": "t", "answer": "a"}, {"question": 7, "thinking": "t", "answer": "a"}],
         "Row 1: column 'question' must be a string, got int"),
        ([{**s1k_rows(1)[0], "attempt": None}], "Row 0: column 'attempt' must be a string, got NoneType"),
    ],
    ids=["missing-column", "empty", "non-string", "null-attempt"],
)
def test_bad_input_is_a_one_line_error_and_leaves_nothing(tmp_path, tiny_model_dir, rows, message):
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["prepare", "--dataset", str(source), "--model", str(tiny_model_dir), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # no staging directory left either


def test_failure_while_writing_keeps_the_previous_output(tmp_path, tiny_model_dir, monkeypatch):
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(2))
    out = tmp_path / "out"
    prepare(str(source), str(tiny_model_dir), out)
    before = sorted(p.name for p in out.iterdir())

    import datasets

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare(str(source), str(tiny_model_dir), out, block_size=50)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / PREPARE_REPORT).read_text())["block_size"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s1k.jsonl"]


def test_a_prepare_killed_midway_is_repaired_by_the_next_one(tmp_path, tiny_model_dir):
    """Killed between its two renames, a prepare leaves the earlier output moved aside and its new
    one staged: the next prepare puts the earlier output back before it starts, removes the
    staging folder, and leaves a running prepare's folders alone. A full disk is a clear error."""
    import errno
    import subprocess

    import datasets

    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(2))
    out = tmp_path / "out"
    prepare(str(source), str(tiny_model_dir), out)
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        out.rename(tmp_path / f".out.old-{gone.pid}")
        (tmp_path / f".out.writing-{gone.pid}-x1").mkdir()
        (tmp_path / f".out.writing-{alive.pid}-x2").mkdir()
        import importlib

        importlib.import_module("t0s1.data.prepare")._recover(out)  # (t0s1.data.prepare is also the function)
        assert (out / PREPARE_REPORT).is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.writing-{alive.pid}-x2", "out", "s1k.jsonl"])
    finally:
        alive.kill()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    original = datasets.DatasetDict.save_to_disk
    datasets.DatasetDict.save_to_disk = full
    try:
        with pytest.raises(UserError, match="No space left"):
            prepare(str(source), str(tiny_model_dir), out, block_size=50)
    finally:
        datasets.DatasetDict.save_to_disk = original
    assert json.loads((out / PREPARE_REPORT).read_text())["block_size"] is None


def test_refuses_to_overwrite_a_directory_it_did_not_write(tmp_path, tiny_model_dir):
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(1))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a directory written by prepare"):
        prepare(str(source), str(tiny_model_dir), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_unknown_hub_dataset_offline_is_a_user_error(tmp_path, tiny_model_dir, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests, and no waiting for it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="Could not load 'simplescaling/not-a-dataset-t0s1'"):
        prepare("simplescaling/not-a-dataset-t0s1", str(tiny_model_dir), tmp_path / "out")


def test_decontamination_drops_benchmark_questions_with_the_shared_8gram(tmp_path, tiny_model_dir, shared_data_dir):
    pytest.importorskip("t0s1.evaluation.tasks")
    from t0s1.evaluation.tasks import get_task

    math = get_task("math500").load(data_dir=str(shared_data_dir), limit=1)[0]
    aime = get_task("aime24").load(data_dir=str(shared_data_dir), limit=1)[0]
    rows = s1k_rows(3)
    rows[1]["question"] = "Solve this one. " + math.question  # a training copy of a MATH500 problem
    rows[2]["question"] = aime.question.upper()  # case and punctuation do not hide an overlap
    source = write_jsonl(tmp_path / "s1k.jsonl", rows)
    result = CliRunner().invoke(
        app,
        [
            "prepare", "--dataset", str(source), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"),
            "--decontaminate", "math500,aime24,gpqa_diamond", "--data-dir", str(shared_data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / PREPARE_REPORT).read_text())
    dropped = {item["row"]: item for item in report["decontamination"]["dropped"]}
    assert set(dropped) == {1, 2}
    assert dropped[1]["benchmark"] == "math500" and dropped[2]["benchmark"] == "aime24"
    for item in dropped.values():
        assert len(item["ngram"].split()) == 8
    assert dropped[1]["ngram"] in " ".join(__import__("re").findall(r"\w+", math.question.lower()))
    assert report["rows_out"] == 1 and "2 rows dropped" in result.output
    assert load_prepared(tmp_path / "out")[0]["prompt"].count("What is 12 + 30?") == 1


@pytest.mark.parametrize(
    "family, completion_start",
    [("qwen3", "<think>\nI need to add"), ("qwq", "I need to add"), ("deepseek-r1-distill-qwen", "I need to add")],
)
def test_each_profile_renders_its_own_format(tmp_path, family, completion_start):
    """Templates that open the thinking in the generation prompt get no second start in the completion."""
    from model_families import build_family_model_dir

    model_dir = build_family_model_dir(family, tmp_path / "model")
    source = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(1))
    prepare(str(source), str(model_dir), tmp_path / "out")
    row = load_prepared(tmp_path / "out")[0]
    assert row["completion"].startswith(completion_start)
    assert (row["prompt"] + row["completion"]).count("<think>") == 1
    assert "\n</think>\n\nAnswer: The sum is 42." in row["completion"]


def test_tokenized_rows_train_the_completion_and_cut_without_an_end_token(tiny_model_dir):
    from transformers import AutoTokenizer

    from t0s1.data.prepare import tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"prompt": "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
           "completion": "<|im_start|>think\n2 + 2 = 4.\n<|im_start|>answer\nAnswer: 4<|im_end|>"}
    [whole] = tokenize_rows([row], tokenizer, None)
    prompt_length = len(tokenizer(row["prompt"])["input_ids"])
    assert whole["completion_mask"] == [0] * prompt_length + [1] * (len(whole["input_ids"]) - prompt_length)
    assert tokenizer.decode(whole["input_ids"][prompt_length:]) == row["completion"]
    [cut] = tokenize_rows([row], tokenizer, prompt_length + 3)
    assert cut["input_ids"] == whole["input_ids"][: prompt_length + 3]  # cut there, nothing appended
    assert tokenize_rows([row], tokenizer, prompt_length) == []  # a prompt alone trains nothing


def test_a_benchmark_question_shorter_than_the_ngram_is_found_whole_or_inside_a_training_question():
    from t0s1.data.decontaminate import BenchmarkIndex

    index = BenchmarkIndex({"math500": [("test/1", "Compute $\\dbinom{8}{4}$."), ("test/2", "Evaluate.")]})
    assert index.match(0, "compute $\\dbinom{8}{4}$").benchmark_id == "test/1"  # an exact copy, 4 words
    assert index.match(1, "Please compute $\\dbinom{8}{4}$ by hand.").ngram == "compute binom 8 4"
    assert index.match(2, "Evaluate.").benchmark_id == "test/2"  # one word: only as the whole question
    assert index.match(3, "Evaluate the integral of x from 0 to 1.") is None
    assert index.match(4, "Compute 8 choose 4.") is None


def test_decontamination_sees_through_latex_spellings_subscripts_and_unicode_forms():
    """Each of these training questions is the benchmark question written another way; they were
    all missed (\\binom for \\dbinom, a_{1} for a_1, the ligature ﬁ for fi, \\left( for ()."""
    from t0s1.data.decontaminate import BenchmarkIndex

    index = BenchmarkIndex({"math500": [
        ("c/116", "Compute $\\dbinom{31}{28}$."),
        ("a/1", "Let $a_1 = 3$ and $a_{n+1} = 2a_n + 1$ for all $n$; find $a_5$."),
        ("n/2", "Find the first five prime numbers greater than one hundred and their sum."),
        ("f/3", "What is the value of $\\frac{1}{2} + \\frac{1}{3}$ written as a common fraction in lowest terms?"),
    ]})
    assert index.match(0, "Compute $\\binom{31}{28}$.").benchmark_id == "c/116"
    assert index.match(1, "Let $a_{1} = 3$ and $a_{n+1} = 2a_{n} + 1$ for all $n$; find $a_{5}$.").benchmark_id == "a/1"
    assert index.match(2, "Find the ﬁrst ﬁve prime numbers greater than one hundred and their sum.").benchmark_id == "n/2"
    assert index.match(3, "What is the value of $\\left(\\dfrac{1}{2} + \\tfrac{1}{3}\\right)$ written as a common fraction?").benchmark_id == "f/3"
    assert index.match(4, "Compute $\\binom{30}{28}$.") is None  # other numbers: another question


def test_rows_are_tokenized_as_at_inference_one_bos_when_the_template_writes_it(tiny_model_dir):
    """A template that writes the BOS token itself (Llama 3, Gemma) and a tokenizer that would add
    one too: the training ids hold it once, as the prompt the engine feeds does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from t0s1.data.prepare import token_lengths, tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = "<|im_start|>"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])
    row = {"prompt": f"{bos}user\nWhat is 2 + 2?<|im_end|>\n{bos}assistant\n", "completion": "Answer: 4<|im_end|>"}
    assert tokenizer(row["prompt"]).input_ids[:2] == [tokenizer.convert_tokens_to_ids(bos)] * 2  # what adding would do
    [tokenized] = tokenize_rows([row], tokenizer, None)
    expected = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False).input_ids
    assert tokenized["input_ids"] == expected and token_lengths([row], tokenizer) == [len(expected)]


@pytest.mark.parametrize(("name", "content", "says"), [
    ("bad.jsonl", b'{"question": "q"}\n\xff\xfe\n', "line 2: not UTF-8 text"),
    ("bad.parquet", b"PAR1 not really", "not a readable Parquet file"),
    ("bad.json", b"[1, 2, 3]", "neither JSON objects nor a list of them"),
    ("bad2.json", b'{"a": 1}\xff', "not UTF-8 text"),
])
def test_unreadable_data_files_are_a_one_line_error(tmp_path, tiny_model_dir, name, content, says):
    source = tmp_path / name
    source.write_bytes(content)
    result = CliRunner().invoke(app, ["prepare", "--dataset", str(source), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_a_cut_completion_never_ends_inside_a_character():
    """SmolLM2's byte-level tokens split a CJK character over two or three tokens: a cut between
    them would end the trained completion on U+FFFD."""
    from transformers import AutoTokenizer

    from t0s1.data.prepare import truncate_row
    from t0s1.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    row = {"prompt": "Q: ", "completion": "数学是一门研究数量结构变化以及空间模型等概念的学科"}
    start = len(tokenizer(row["prompt"], add_special_tokens=False).input_ids)
    cuts = [truncate_row(row, tokenizer, size)["completion"] for size in range(start + 1, start + 30)]
    assert all("\ufffd" not in cut and row["completion"].startswith(cut) for cut in cuts)
    assert len(set(cuts)) > 10


def test_a_dataset_config_is_for_hub_datasets_and_refused_for_local_data(tmp_path):
    """TRL's dataset_config reaches load_dataset for a hub id; it was silently ignored everywhere."""
    from t0s1.data.sources import read_rows

    path = write_jsonl(tmp_path / "s1k.jsonl", s1k_rows(2))
    assert len(read_rows(str(path))[0]) == 2
    with pytest.raises(UserError, match="names a configuration of a hub dataset"):
        read_rows(str(path), "train", "main")


def test_trajectory_is_refused_for_data_with_one_trace_per_row(tmp_path, tiny_model_dir):
    """--trajectory picks s1K-1.1's DeepSeek or Gemini traces; on a generic file it was ignored."""
    path = write_jsonl(tmp_path / "generic.jsonl", [{"question": "1+1?", "thinking": "one and one", "answer": "2"}])
    with pytest.raises(UserError, match="leave --trajectory out"):
        prepare(str(path), str(tiny_model_dir), tmp_path / "out", trajectory="gemini")
    assert not (tmp_path / "out").exists()
