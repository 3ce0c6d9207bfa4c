"""`--backend vllm` on a real vLLM engine (vLLM's CPU build here): greedy results equal the
transformers engine's token for token, and `generate`, `eval`, `rag eval` and `lm-eval` run on it.

The transformers engine runs in this environment on the transformers release vLLM pins (t0s1's
floor), so these tests also hold the engine to that release: a KV cache passed under a name the
model ignores would make every step see one token, and the results would differ.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from t0s1 import BudgetForcing, generate
from t0s1.backends.vllm import VLLMBackend
from t0s1.cli import app
from t0s1.models import EMBEDDED_MODEL, load_model

runner = CliRunner()

PROMPTS = ["What is 12 + 35 * 2?", "How many r are in the word raspberry?", "Name a prime number greater than 20."]
GRID = [
    BudgetForcing(max_thinking_tokens=budget, num_ignore=num_ignore, max_answer_tokens=16)
    for budget in (0, 12, 40)
    for num_ignore in (0, 2)
]
FIELDS = ("thinking", "answer", "thinking_tokens", "answer_tokens", "num_ignored", "hit_budget", "finish_reason",
          "prompt_tokens", "thinking_token_ids", "answer_token_ids")


def comparable(result) -> dict:
    return {name: getattr(result, name) for name in FIELDS}


@pytest.fixture(scope="module")
def engines(vllm_llm):
    """Per profile: (the transformers engine's model, the vLLM backend), on the same weights."""
    pairs = {}
    for profile in ("s1", "think"):
        lm = load_model(EMBEDDED_MODEL, device="cpu", dtype="float32", backend="transformers", reasoning_format=profile)
        pairs[profile] = (lm, VLLMBackend(vllm_llm, model_name=EMBEDDED_MODEL, reasoning_format=profile))
    return pairs


@pytest.mark.parametrize("profile", ["s1", "think"])
def test_greedy_results_equal_the_transformers_engine_token_for_token(engines, profile):
    lm, backend = engines[profile]
    assert lm.profile.name == backend.forcing.profile.name == profile
    prompts = [prompt for _ in GRID for prompt in PROMPTS]
    settings = [setting for setting in GRID for _ in PROMPTS]
    expected = generate(lm, prompts, settings)
    got = backend.generate(prompts, settings)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        setting = settings[index]
        label = f"{profile}, prompt {index % len(PROMPTS)}, budget {setting.max_thinking_tokens}, num_ignore {setting.num_ignore}"
        assert comparable(have) == comparable(want), label
    # The grid exercised what it is for: forced ends, Waits and ends of thinking the model chose.
    assert any(r.hit_budget for r in got) and any(r.num_ignored for r in got)
    assert any(r.num_ignored == 2 for r in got) or any(not r.hit_budget and r.thinking_tokens for r in got)


def test_the_context_and_vocabulary_come_from_the_engine(engines, vllm_llm):
    lm, backend = engines["s1"]
    assert backend.context_length == vllm_llm.model_config.max_model_len == lm.context_length
    # SmolLM2's embedding matrix has exactly the tokenizer's ids: no per-request allowed-ids mask.
    assert backend.allowed_ids is None


def test_generate_command(engines, vllm_dtype):
    lm, _ = engines["s1"]
    settings = BudgetForcing(max_thinking_tokens=24, num_ignore=1, max_answer_tokens=12)
    args = ["generate", PROMPTS[0], "--backend", "vllm", "--dtype", vllm_dtype, "--reasoning-format", "s1",
            "--max-thinking-tokens", "24", "--num-ignore", "1", "--max-answer-tokens", "12"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    want = generate(lm, [PROMPTS[0]], settings)[0].to_dict()
    assert {k: got[k] for k in want if k != "seconds"} == {k: want[k] for k in want if k != "seconds"}

    printed = runner.invoke(app, args)  # the plain output: thinking and answer, then the summary line
    assert printed.exit_code == 0, printed.output
    text = " ".join(printed.output.split())
    assert "Thinking" in text and "Answer" in text and f"{want['thinking_tokens']} thinking tokens" in text
    assert " ".join(want["answer"].split()) in text


def test_eval_command(engines, vllm_dtype, shared_data_dir, tmp_path):
    from t0s1.evaluation.tasks import get_task

    lm, _ = engines["s1"]
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--tasks", "gsm8k", "--limit", "2", "--backend", "vllm", "--dtype", vllm_dtype,
                                 "--model", EMBEDDED_MODEL, "--reasoning-format", "s1", "--max-thinking-tokens", "8,24",
                                 "--num-ignore", "0,1", "--max-answer-tokens", "12", "--data-dir", str(shared_data_dir),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "vllm"
    rows = [json.loads(line) for line in (out / "samples" / "gsm8k.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4
    examples = {example.id: example for example in get_task("gsm8k").load(shared_data_dir, limit=2)}
    settings = [BudgetForcing(max_thinking_tokens=row["max_thinking_tokens"], num_ignore=row["num_ignore"], max_answer_tokens=12)
                for row in rows]
    expected = generate(lm, [examples[row["id"]].prompt for row in rows], settings)  # one batch, a setting per row
    for row, want in zip(rows, expected, strict=True):
        assert (row["thinking"], row["output"], row["thinking_tokens"], row["num_ignored"], row["hit_budget"]) == (
            want.thinking, want.answer, want.thinking_tokens, want.num_ignored, want.hit_budget), row["setting"]


def test_rag_eval_command(vllm_llm, vllm_dtype, tmp_path):
    from t0s1.rag.corpus import Document
    from t0s1.rag.store import build_index

    documents = [
        Document("A", "Apples", "Apples grow on trees in orchards."),
        Document("B", "Bananas", "Bananas are yellow fruit from the tropics."),
    ]
    index = build_index(documents, tmp_path / "index", progress=False).index
    questions = tmp_path / "questions.jsonl"
    rows = [{"id": "q1", "question": "Where do apples grow?", "gold_ids": ["A"], "answer": "trees"},
            {"id": "q2", "question": "What colour are bananas?", "gold_ids": ["B"], "answer": "yellow"}]
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "rag"
    result = runner.invoke(app, ["rag", "eval", "--index", str(index.path), "--questions", str(questions), "--out", str(out),
                                 "--k", "1", "--backend", "vllm", "--dtype", vllm_dtype, "--model", EMBEDDED_MODEL,
                                 "--max-thinking-tokens", "8", "--num-ignore", "0,1", "--max-answer-tokens", "8"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["retrieval"]["queries"] == 2
    samples = [json.loads(line) for path in (out / "samples").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert samples and all(row["thinking_tokens"] <= 8 for row in samples)
    assert {row["num_ignore"] for row in samples} == {0, 1}


def test_lm_eval_command(vllm_llm, vllm_dtype, shared_data_dir, tmp_path):
    out = tmp_path / "lm-eval"
    model_args = f"pretrained={EMBEDDED_MODEL},backend=vllm,dtype={vllm_dtype},max_tokens_thinking=8,max_gen_toks=6"
    result = runner.invoke(app, ["lm-eval", "--model_args", model_args, "--tasks", "t0s1_gsm8k", "--limit", "2",
                                 "--data-dir", str(shared_data_dir), "--output_path", str(out), "--log_samples"])
    assert result.exit_code == 0, result.output
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert "exact_match,none" in results["results"]["t0s1_gsm8k"]
    (samples_file,) = out.rglob("samples_t0s1_gsm8k_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 2 and all(s["resps"][0][0].startswith("<|im_start|>think\n") for s in samples)


def test_sampling_is_seeded(engines):
    """Under sampling the two engines draw differently (their random streams differ); a seed makes
    vLLM's own results repeat."""
    _, backend = engines["s1"]
    settings = replace(GRID[3], temperature=0.8, top_p=0.95, seed=7)
    first = backend.generate(PROMPTS[:2], settings)
    again = backend.generate(PROMPTS[:2], settings)
    assert [comparable(r) for r in first] == [comparable(r) for r in again]
    assert [r.seed for r in first] == [7, 8]
