"""Budget sweeps: continuous batching within a model's limit of sequences at once, and the rows a sweep's runner
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


def record_rows(lm, monkeypatch) -> dict:
    """The runners a call creates, the rows live in them at most, and the live rows at each add."""
    seen = {"runners": 0, "peak": 0, "live_at_add": [], "forks": 0}
    original = lm.new_runner

    def recording(**kwargs):
        runner = original(**kwargs)
        seen["runners"] += 1
        live = set()
        add, fork, release = runner.add, runner.fork, runner.release

        def note(slots):
            live.update(slots)
            seen["peak"] = max(seen["peak"], len(live))

        def counted_add(prompts):
            seen["live_at_add"].append(len(live))
            slots, logits = add(prompts)
            note(slots)
            return slots, logits

        def counted_fork(slot):
            new = fork(slot)
            seen["forks"] += 1
            note([new])
            return new

        def counted_release(slot):
            live.discard(slot)
            return release(slot)

        runner.add, runner.fork, runner.release = counted_add, counted_fork, counted_release
        return runner

    monkeypatch.setattr(lm, "new_runner", recording)
    return seen


def count_fed_rows(lm, monkeypatch) -> list[int]:
    """The rows each step of ``lm``'s runners feeds, in order."""
    fed = []
    original = lm.new_runner

    def counting(**kwargs):
        runner = original(**kwargs)
        step = runner.step
        runner.step = lambda slots, tokens: (fed.append(len(slots)), step(slots, tokens))[1]
        return runner

    monkeypatch.setattr(lm, "new_runner", counting)
    return fed


def test_a_sweep_starts_prompts_as_rows_free_up_within_the_models_limit_with_the_same_results(tiny_model, monkeypatch):
    whole = generate_sweep(tiny_model, PROMPTS, SETTINGS)
    seen = record_rows(tiny_model, monkeypatch)
    # 5 rows per prompt at most at once (the trace, its 3 settings forking at the same token, the
    # zero-budget sequence): two prompts to start with, the others as earlier ones finish, on one
    # runner that never holds more than 10 rows.
    monkeypatch.setattr(tiny_model, "max_sequences", 10, raising=False)
    limited = generate_sweep(tiny_model, PROMPTS, SETTINGS)
    assert seen["runners"] == 1 and seen["peak"] <= 10
    assert seen["live_at_add"][0] == 0 and len(seen["live_at_add"]) > 1
    assert any(live > 0 for live in seen["live_at_add"][1:])  # a prompt joined while others ran
    for i in range(len(PROMPTS)):
        for j in range(len(SETTINGS)):
            assert limited[i][j].thinking_token_ids == whole[i][j].thinking_token_ids, (i, j)
            assert limited[i][j].answer_token_ids == whole[i][j].answer_token_ids, (i, j)
            assert (limited[i][j].num_ignored, limited[i][j].hit_budget) == (whole[i][j].num_ignored, whole[i][j].hit_budget)


def test_a_prompt_counts_the_rows_it_may_hold_from_its_start_while_its_settings_fork(tiny_model, monkeypatch):
    """8 budgets, each forking at its own token and answering for up to 12 tokens, where the model
    holds 12 sequences: a prompt counts 9 rows until all its results are in, though its trace
    carries fewer settings as they fork (the forks still hold rows), so no more than 12 rows are
    ever live; the results equal one run without a limit."""
    settings = [BudgetForcing(max_thinking_tokens=b, max_answer_tokens=12) for b in range(1, 9)]
    prompts = PROMPTS[:3]
    whole = generate_sweep(tiny_model, prompts, settings)
    seen = record_rows(tiny_model, monkeypatch)
    monkeypatch.setattr(tiny_model, "max_sequences", 12, raising=False)
    limited = generate_sweep(tiny_model, prompts, settings)
    assert seen["runners"] == 1 and seen["peak"] <= 12
    assert [[r.answer_token_ids for r in row] for row in limited] == [[r.answer_token_ids for r in row] for row in whole]


def test_settings_that_leave_the_trace_at_the_same_point_share_one_answer(tiny_model, monkeypatch):
    """Budget 8 with 0, 1 and 2 ignores where the thinking never ends before the budget: all three
    are forced to end at token 8 and answer the same ids, so the sweep generates that answer once
    (the trace's row takes it: no fork at all) and hands each setting the same result, equal to a
    separate run."""
    prompts = PROMPTS[:2]
    settings = [BudgetForcing(max_thinking_tokens=8, num_ignore=k, max_answer_tokens=6) for k in (0, 1, 2)]
    separate = [generate(tiny_model, prompts, s) for s in settings]
    seen = record_rows(tiny_model, monkeypatch)
    swept = generate_sweep(tiny_model, prompts, settings)
    assert seen["forks"] == 0
    for i in range(len(prompts)):
        for j, runs in enumerate(separate):
            assert swept[i][j].hit_budget and runs[i].hit_budget
            assert swept[i][j].thinking_token_ids == runs[i].thinking_token_ids, (i, j)
            assert swept[i][j].answer_token_ids == runs[i].answer_token_ids, (i, j)
    assert swept[0][0] is not swept[0][1]  # each setting its own Result, lists included
    swept[0][0].answer_token_ids.append(-1)
    swept[0][0].thinking_token_ids.clear()
    assert swept[0][1].answer_token_ids == separate[1][0].answer_token_ids
    assert swept[0][1].thinking_token_ids == separate[1][0].thinking_token_ids


def test_more_prompts_than_the_model_holds_start_as_others_finish_with_the_same_results(tiny_model, monkeypatch):
    """generate: 5 prompts where the model holds 2 sequences at once."""
    settings = BudgetForcing(max_thinking_tokens=6, max_answer_tokens=3, temperature=0.8, seed=3)
    prompts = [f"What is {i} + 1?" for i in range(5)]
    whole = generate(tiny_model, prompts, settings)
    seen = record_rows(tiny_model, monkeypatch)
    monkeypatch.setattr(tiny_model, "max_sequences", 2, raising=False)
    limited = generate(tiny_model, prompts, settings)
    assert seen["runners"] == 1 and seen["peak"] == 2
    assert [r.thinking_token_ids + r.answer_token_ids for r in limited] == [r.thinking_token_ids + r.answer_token_ids for r in whole]


def test_a_policy_starts_prompts_as_others_finish_within_the_models_limit(tiny_model, monkeypatch):
    """A vote over 3 traces per prompt where the model holds 7 sequences: two prompts to start
    with, the others as earlier ones finish, on one runner that never holds more than 7 rows; the
    same traces as with no limit. A prompt whose traces alone exceed the limit is refused."""
    from t0s1.errors import UserError
    from t0s1.policies import make_policy
    from t0s1.policies.run import generate_with_policy

    settings = [BudgetForcing(max_thinking_tokens=2 + 4 * (i % 2), max_answer_tokens=3, temperature=0.8, seed=3) for i in range(5)]
    prompts = [f"What is {i} + 1?" for i in range(5)]
    whole = generate_with_policy(tiny_model, prompts, settings, make_policy("vote", n=3))
    seen = record_rows(tiny_model, monkeypatch)
    monkeypatch.setattr(tiny_model, "max_sequences", 7, raising=False)
    limited = generate_with_policy(tiny_model, prompts, settings, make_policy("vote", n=3))
    assert seen["runners"] == 1 and seen["peak"] <= 7
    assert any(live > 0 for live in seen["live_at_add"][1:])  # a prompt joined while others ran
    assert [[t.result.thinking_token_ids for t in o.traces] for o in limited] == [[t.result.thinking_token_ids for t in o.traces] for o in whole]
    with pytest.raises(UserError, match="runs up to 8 sequences of a prompt at once; this backend holds at most 7"):
        generate_with_policy(tiny_model, prompts, settings[0], make_policy("vote", n=8))


def test_a_trace_ends_when_its_last_setting_leaves_even_while_it_could_think_on(monkeypatch):
    """Settings (budget 20, 2 ignores) and (200, 0): the trace thinks under the widest, (200, 2).
    The model ends its thinking at token 5, where (200, 0) answers, and thinks on after each Wait;
    at token 20 the last setting leaves, and the trace ends there instead of thinking on to 200 for
    no setting while its prompt no longer counts against the model's limit of 3 sequences."""
    from scripted_model import ScriptedLM
    from transformers import AutoTokenizer

    from t0s1.forcing import render_prompt
    from t0s1.models import embedded_model_dir
    from t0s1.profiles import profile_by_name

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    lm = ScriptedLM(tokenizer, profile_by_name("think"))
    settings = [BudgetForcing(max_thinking_tokens=20, num_ignore=2, max_answer_tokens=4),
                BudgetForcing(max_thinking_tokens=200, num_ignore=0, max_answer_tokens=4)]
    widest = BudgetForcing(max_thinking_tokens=200, num_ignore=2, max_answer_tokens=4)
    words = tokenizer(" so it is", add_special_tokens=False).input_ids
    end = tokenizer("</think>", add_special_tokens=False).input_ids
    prompts = ["What is 1+1?", "Count.", "Hi"]
    for prompt in prompts:
        lm.write(render_prompt(lm, prompt), widest, (words * 2)[:5] + end + words * 100)
    separate = [generate(lm, prompts, s) for s in settings]
    seen = record_rows(lm, monkeypatch)
    fed = count_fed_rows(lm, monkeypatch)
    monkeypatch.setattr(lm, "max_sequences", 3, raising=False)
    swept = generate_sweep(lm, prompts, settings)
    for i in range(len(prompts)):
        for j, runs in enumerate(separate):
            assert swept[i][j].thinking_token_ids == runs[i].thinking_token_ids, (i, j)
            assert swept[i][j].answer_token_ids == runs[i].answer_token_ids, (i, j)
    assert [r.thinking_tokens for r in swept[0]] == [20, 5] and swept[0][0].hit_budget
    assert seen["peak"] <= 3
    assert sum(fed) < 3 * 40  # each prompt: about 20 thinking tokens and short answers, not 200

