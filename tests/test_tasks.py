"""The task registry: loading local files, the hub fallback, prompts, GPQA option shuffling."""

from __future__ import annotations

import json

import pytest

from t0s1.errors import UserError
from t0s1.evaluation.tasks import TASKS, Example, get_task, resolve_data_dir

EXPECTED = {"aime24": 30, "aime24_nofigures": 30, "aime25": 30, "math500": 500, "gpqa_diamond": 198, "gsm8k": 1319}


def test_registry_names():
    assert set(TASKS) == set(EXPECTED)
    for task in TASKS.values():
        assert task.hub_id and task.split and task.local_file.endswith(".jsonl")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_task_loads_from_the_data_dir(name, shared_data_dir):
    examples = get_task(name).load(shared_data_dir)
    assert len(examples) == EXPECTED[name]
    assert len({e.id for e in examples}) == len(examples)
    assert all(isinstance(e, Example) and e.prompt.strip() and e.gold for e in examples)
    assert get_task(name).load(shared_data_dir, limit=3) == examples[:3]


def test_ids_prompts_and_golds(shared_data_dir):
    math = get_task("math500").load(shared_data_dir, limit=1)[0]
    row = json.loads((shared_data_dir / "math500.jsonl").read_text().splitlines()[0])
    assert math.id == row["unique_id"] and math.prompt == row["problem"] == math.question and math.gold == row["answer"]
    assert math.meta["level"] == row["level"]
    aime = get_task("aime24").load(shared_data_dir, limit=1)[0]
    assert aime.id == "2024-I-1" and aime.gold.isdigit()
    nofig = {e.id: e for e in get_task("aime24_nofigures").load(shared_data_dir)}
    official = {e.id: e for e in get_task("aime24").load(shared_data_dir)}
    assert nofig.keys() == official.keys()
    assert all(nofig[i].gold == official[i].gold for i in official)
    assert nofig["2024-II-8"].question != official["2024-II-8"].question  # the two wordings differ
    gsm = get_task("gsm8k").load(shared_data_dir, limit=1)[0]
    assert gsm.id == "gsm8k-test-0000" and gsm.gold == "18"


def test_gpqa_options_are_shuffled_with_a_fixed_seed_per_question(shared_data_dir):
    rows = {json.loads(line)["id"]: json.loads(line) for line in (shared_data_dir / "gpqa_diamond.jsonl").read_text().splitlines()}
    # GPQA canary: assertions compare booleans and name only ids, so no question text is printed.
    first = get_task("gpqa_diamond").load(shared_data_dir)
    second = get_task("gpqa_diamond").load(shared_data_dir)
    same_order = [e.meta["options"] for e in first] == [e.meta["options"] for e in second]
    assert same_order, "the option order changed between loads"
    gold_letters = [e.gold for e in first]
    for example in first:
        row = rows[example.id]
        options = example.meta["options"]
        checks = {
            "letters": list(options) == ["A", "B", "C", "D"],
            "gold letter": options[example.gold] == row["correct_answer"],
            "same options": sorted(options.values()) == sorted([row["correct_answer"], *row["incorrect_answers"]]),
            "options shown": all(f"\n{letter}) {text}" in example.prompt for letter, text in options.items()),
            "question first": example.prompt.startswith(example.question),
        }
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, (example.id, failed)
    # The correct option is spread over the letters, not always first.
    assert all(gold_letters.count(letter) > 25 for letter in "ABCD")


def test_get_task_unknown_names_the_known_tasks():
    with pytest.raises(UserError) as error:
        get_task("aime2024")
    assert "aime24_nofigures" in str(error.value) and "gsm8k" in str(error.value)


def test_data_dir_from_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("T0S1_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("T0S1_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other
    with pytest.raises(UserError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")


def test_local_file_in_env_dir_is_used(tmp_path, monkeypatch):
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"id": "q1", "question": "1+1?", "final_answer": "2"}) + "\n")
    monkeypatch.setenv("T0S1_DATA_DIR", str(tmp_path))
    assert get_task("gsm8k").load() == [Example("q1", "1+1?", "1+1?", "2", {})]


def test_unreachable_hub_says_to_pass_data_dir(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("T0S1_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="--data-dir") as error:
        get_task("gsm8k").load()
    assert "openai/gsm8k" in str(error.value)
    with pytest.raises(UserError, match=f"no gsm8k_test.jsonl in {tmp_path}"):
        get_task("gsm8k").load(tmp_path)


def test_hub_rows_use_the_hub_field_mapping(monkeypatch):
    """GSM8K hub rows have no id and a solution ending in '#### N': ids are numbered, gold is N."""
    import datasets

    class FakeDataset(list):
        def select(self, indices):
            return FakeDataset(self[i] for i in indices)

    calls = []

    def fake_load(hub_id, config, split):
        calls.append((hub_id, config, split))
        return FakeDataset([{"question": "Q1", "answer": "a\n#### 1,200"}, {"question": "Q2", "answer": "b\n#### 7"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.delenv("T0S1_DATA_DIR", raising=False)
    examples = get_task("gsm8k").load(limit=1)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert examples == [Example("gsm8k-0", "Q1", "Q1", "1200", {})]


def test_bad_rows_are_user_errors(tmp_path):
    (tmp_path / "math500.jsonl").write_text('{"unique_id": "a", "problem": "p"}\n')
    with pytest.raises(UserError, match="row 1 has no field 'answer'"):
        get_task("math500").load(tmp_path)
    (tmp_path / "math500.jsonl").write_text('{"unique_id": "a", "problem": "p", "answer": "1"}\nnot json\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        get_task("math500").load(tmp_path)
    with pytest.raises(UserError, match="limit"):
        get_task("math500").load(tmp_path, limit=0)
    # a null or blank gold became the gold answer "None"; a question that is blank was taken
    for row, words in (('{"id": "a", "problem": "p", "answer": null}', "has no gold answer"),
                       ('{"id": "a", "problem": "  ", "answer": "1"}', "has no question")):
        (tmp_path / "aime24.jsonl").write_text(row + "\n")
        with pytest.raises(UserError, match=f"row 1 {words}"):
            get_task("aime24").load(tmp_path)
    # GPQA's wrong options: text that is not a JSON list, or a number, were tracebacks
    for wrong in ('"y; z; w"', "3", '{"a": 1}'):
        (tmp_path / "gpqa_diamond.jsonl").write_text(
            f'{{"id": "a", "question": "q", "correct_answer": "x", "incorrect_answers": {wrong}}}\n')
        with pytest.raises(UserError, match="must be a list of the wrong options"):
            get_task("gpqa_diamond").load(tmp_path)
