"""Budget sweeps: waves within a model's limit of sequences at once, and the rows a sweep's runner
starts with (a row per trace and one for its forks, not one per setting). On the tiny random
model; tests/test_llamacpp.py runs a sweep of more rows than llama.cpp holds."""

from __future__ import annotations

from t0s1 import BudgetForcing, generate_sweep

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
