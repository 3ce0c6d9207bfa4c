"""Budget sweeps: waves within a model's limit of sequences at once, and the rows a sweep's runner
starts with (a row per trace and one for its forks, not one per setting). On the tiny random
model (generate and policies too); tests/test_llamacpp.py runs more rows than llama.cpp holds."""

from __future__ import annotations

import pytest

from t0s1 import BudgetForcing, generate, generate_sweep

PROMPTS = ["What is 2 + 3?", "Name a prime.", "Count to three.", "Is 9 odd?", "Say hi."]
SETTINGS = [BudgetForcing(max_thinking_tokens=b, num_ignore=k, max_answer_tokens=6) for b, k in ((0, 0), (4, 0), (12, 1), (30, 2))]


def record_runners(lm, monkeypatch) -> list[dict]:
    sizes = []
    original = lm.new_runner

    def recording(**kwargs):
        sizes.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(lm, "new_runner", recording)
    return sizes


def test_a_sweep_starts_with_a_row_per_trace_and_one_for_its_forks(tiny_model, monkeypatch):
    sizes = record_runners(tiny_model, monkeypatch)
    generate_sweep(tiny_model, PROMPTS, SETTINGS)
    # Per prompt: the trace carrying the 3 settings with a budget, a row for their forks, and the
    # zero-budget setting's own sequence; not 1 + 4 rows.
    assert [s["rows"] for s in sizes] == [3 * len(PROMPTS)]


def test_a_sweep_runs_in_waves_within_the_models_limit_with_the_same_results(tiny_model, monkeypatch):
    whole = generate_sweep(tiny_model, PROMPTS, SETTINGS)
    sizes = record_runners(tiny_model, monkeypatch)
    # 5 rows per prompt at most at once (the trace, its 3 settings forking at the same token, the
    # zero-budget sequence): two prompts per wave.
    monkeypatch.setattr(tiny_model, "max_sequences", 10, raising=False)
    waves = generate_sweep(tiny_model, PROMPTS, SETTINGS)
    assert [s["rows"] for s in sizes] == [6, 6, 3]
    for i in range(len(PROMPTS)):
        for j in range(len(SETTINGS)):
            assert waves[i][j].thinking_token_ids == whole[i][j].thinking_token_ids, (i, j)
            assert waves[i][j].answer_token_ids == whole[i][j].answer_token_ids, (i, j)
            assert (waves[i][j].num_ignored, waves[i][j].hit_budget) == (whole[i][j].num_ignored, whole[i][j].hit_budget)


def test_more_prompts_than_the_model_holds_run_in_waves_with_the_same_results(tiny_model, monkeypatch):
    """generate: 5 prompts where the model holds 2 sequences at once: waves of 2, 2 and 1."""
    settings = BudgetForcing(max_thinking_tokens=6, max_answer_tokens=3, temperature=0.8, seed=3)
    prompts = [f"What is {i} + 1?" for i in range(5)]
    whole = generate(tiny_model, prompts, settings)
    sizes = record_runners(tiny_model, monkeypatch)
    monkeypatch.setattr(tiny_model, "max_sequences", 2, raising=False)
    waves = generate(tiny_model, prompts, settings)
    assert [s["rows"] for s in sizes] == [2, 2, 1]
    assert [r.thinking_token_ids + r.answer_token_ids for r in waves] == [r.thinking_token_ids + r.answer_token_ids for r in whole]


def test_a_policy_runs_its_prompts_in_waves_within_the_models_limit(tiny_model, monkeypatch):
    """A vote over 3 traces per prompt where the model holds 7 sequences: two prompts per wave,
    the same traces as one wave; a prompt whose traces alone exceed the limit is refused."""
    from t0s1.errors import UserError
    from t0s1.policies import make_policy
    from t0s1.policies.run import generate_with_policy

    settings = BudgetForcing(max_thinking_tokens=6, max_answer_tokens=3, temperature=0.8, seed=3)
    prompts = [f"What is {i} + 1?" for i in range(5)]
    whole = generate_with_policy(tiny_model, prompts, settings, make_policy("vote", n=3))
    sizes = record_runners(tiny_model, monkeypatch)
    monkeypatch.setattr(tiny_model, "max_sequences", 7, raising=False)
    waves = generate_with_policy(tiny_model, prompts, settings, make_policy("vote", n=3))
    assert [s["rows"] for s in sizes] == [6, 6, 3]
    assert [[t.result.thinking_token_ids for t in o.traces] for o in waves] == [[t.result.thinking_token_ids for t in o.traces] for o in whole]
    with pytest.raises(UserError, match="runs up to 8 sequences of a prompt at once; this backend holds at most 7"):
        generate_with_policy(tiny_model, prompts, settings, make_policy("vote", n=8))
