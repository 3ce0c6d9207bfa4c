"""The budget forcing engine: exactness against the slow reference, invariants, batching, errors."""

from __future__ import annotations

import pytest
import torch
from forcing_reference import reference_generate

from t0s1 import BudgetForcing, UserError, generate, generate_sweep
from t0s1.forcing import render_prompt, resolve_budget

PROMPTS = [
    "How many r are in raspberry?",
    "What is 12 + 35 * 2? Think step by step and check the result.",
    "Hi",
    "Wait, let me count the letters one by one: r a s p b e r r y. How many?",
    "Final Answer: 42",
]


def assert_invariants(lm, results, settings: BudgetForcing):
    ignore_ids = lm.tokenizer(settings.ignore_str, add_special_tokens=False).input_ids
    for result in results:
        assert result.thinking_tokens == len(result.thinking_token_ids)
        assert result.thinking_tokens <= settings.max_thinking_tokens
        assert result.num_ignored <= settings.num_ignore
        forced_prefix = lm.tokenizer("\nFinal Answer:", add_special_tokens=False).input_ids
        # hit_budget exactly when the forced end was used: the answer then starts with "Final Answer:"
        assert result.hit_budget == (result.answer_token_ids[: len(forced_prefix)] == forced_prefix)
        assert result.hit_budget == result.answer.startswith("Final Answer:")
        if result.hit_budget:
            assert result.thinking_tokens == settings.max_thinking_tokens
        assert result.answer_tokens <= settings.max_answer_tokens
        assert all(i < len(lm.tokenizer) for i in result.thinking_token_ids + result.answer_token_ids)
        # The ignore string appears num_ignored times, as whole id runs, in the thinking ids.
        ids = result.thinking_token_ids
        runs = sum(ids[i : i + len(ignore_ids)] == ignore_ids for i in range(len(ids) - len(ignore_ids) + 1))
        assert runs >= result.num_ignored
        assert result.thinking.count(settings.ignore_str) >= result.num_ignored


def assert_matches_reference(lm, prompts, settings):
    results = generate(lm, prompts, settings)
    assert_invariants(lm, results, settings)
    for prompt, result in zip(prompts, results, strict=True):
        expected = reference_generate(lm, prompt, settings)
        assert result.thinking_token_ids == expected.thinking_token_ids, prompt
        assert result.answer_token_ids == expected.answer_token_ids, prompt
        assert result.num_ignored == expected.num_ignored
        assert result.hit_budget == expected.hit_budget
    return results


@pytest.mark.parametrize("num_ignore", [0, 2])
@pytest.mark.parametrize("budget", [12, 300])
@pytest.mark.parametrize("batch", [1, 5])
def test_engine_equals_reference_on_tiny_model(tiny_model, num_ignore, budget, batch):
    settings = BudgetForcing(max_thinking_tokens=budget, num_ignore=num_ignore, max_answer_tokens=24)
    results = assert_matches_reference(tiny_model, PROMPTS[:batch], settings)
    if budget == 12:
        assert any(r.hit_budget for r in results)
    if budget == 300 and batch > 1:
        assert any(not r.hit_budget for r in results)  # the budget does not bind
        if num_ignore:
            assert any(r.num_ignored == num_ignore for r in results)


def test_ignore_string_is_injected_where_thinking_ended(tiny_model):
    settings = BudgetForcing(max_thinking_tokens=300, num_ignore=2, ignore_str="Wait", max_answer_tokens=8)
    plain = generate(tiny_model, PROMPTS, BudgetForcing(max_thinking_tokens=300, max_answer_tokens=8))
    extended = generate(tiny_model, PROMPTS, settings)
    wait = tiny_model.tokenizer("Wait", add_special_tokens=False).input_ids
    for short, long in zip(plain, extended, strict=True):
        if long.num_ignored:
            # Up to the first end of thinking both runs agree; there the Wait goes in.
            cut = len(short.thinking_token_ids)
            assert long.thinking_token_ids[:cut] == short.thinking_token_ids
            assert long.thinking_token_ids[cut : cut + len(wait)] == wait
            assert long.thinking_tokens > short.thinking_tokens


def test_zero_budget_answers_at_once(tiny_model):
    settings = BudgetForcing(max_thinking_tokens=0, num_ignore=3, max_answer_tokens=6)
    results = assert_matches_reference(tiny_model, PROMPTS[:2], settings)
    assert all(r.thinking_tokens == 0 and r.hit_budget and r.num_ignored == 0 for r in results)


def test_never_samples_outside_the_vocabulary(tiny_model):
    """s1's "Token id out of vocabulary" bug: the embedding matrix is larger than the vocabulary."""
    head = tiny_model.model.get_output_embeddings().weight
    saved = head.data.clone()
    vocab = len(tiny_model.tokenizer)
    assert head.shape[0] > vocab
    try:
        with torch.no_grad():
            head[vocab:] = head[:vocab].mean(0) + 50 * head[:vocab].std()  # padding rows would win
        settings = BudgetForcing(max_thinking_tokens=40, max_answer_tokens=10, temperature=1.0, seed=1)
        for result in generate(tiny_model, PROMPTS, settings):
            assert max(result.thinking_token_ids + result.answer_token_ids) < vocab
    finally:
        head.data.copy_(saved)


def test_continues_from_the_kv_cache(tiny_model, monkeypatch):
    """After the prompt, every forward pass feeds exactly one new token per sequence."""
    model = tiny_model.model
    shapes = []
    original = model.forward

    def counting_forward(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    settings = BudgetForcing(max_thinking_tokens=60, num_ignore=2, max_answer_tokens=10)
    results = generate(tiny_model, PROMPTS[:3], settings)
    prompt_width = max(r.prompt_tokens for r in results)
    assert shapes[0] == (3, prompt_width)
    assert all(width == 1 for _, width in shapes[1:])
    fed = sum(batch for batch, _ in shapes[1:])
    # Each sequence feeds its thinking, the delimiters it was given and its answer, nothing twice.
    generated = sum(r.thinking_tokens + len(r.answer_token_ids) for r in results)
    delimiter_tokens = fed - generated
    assert 0 <= delimiter_tokens <= 3 * 8


def test_batch_results_do_not_depend_on_neighbours(tiny_model):
    settings = [
        BudgetForcing(max_thinking_tokens=8, max_answer_tokens=5),
        BudgetForcing(max_thinking_tokens=200, num_ignore=2, max_answer_tokens=20),
        BudgetForcing(max_thinking_tokens=0, max_answer_tokens=3),
    ]
    together = generate(tiny_model, PROMPTS[:3], settings)
    for prompt, setting, result in zip(PROMPTS, settings, together):
        alone = generate(tiny_model, [prompt], setting)[0]
        assert alone.thinking_token_ids == result.thinking_token_ids
        assert alone.answer_token_ids == result.answer_token_ids


def test_sweep_equals_separate_runs(tiny_model):
    settings = [
        BudgetForcing(max_thinking_tokens=b, num_ignore=k, max_answer_tokens=12)
        for b in (0, 6, 30, 120)
        for k in (0, 2)
    ]
    swept = generate_sweep(tiny_model, PROMPTS, settings)
    for j, setting in enumerate(settings):
        separate = generate(tiny_model, PROMPTS, setting)
        for i in range(len(PROMPTS)):
            assert swept[i][j].thinking_token_ids == separate[i].thinking_token_ids
            assert swept[i][j].answer_token_ids == separate[i].answer_token_ids
            assert swept[i][j].num_ignored == separate[i].num_ignored
            assert swept[i][j].hit_budget == separate[i].hit_budget


def test_streamed_deltas_rebuild_the_result(tiny_model):
    received = {}
    channels = []

    def on_delta(index, channel, text):
        received[(index, channel)] = received.get((index, channel), "") + text
        channels.append((index, channel))

    settings = BudgetForcing(max_thinking_tokens=50, num_ignore=1, max_answer_tokens=15)
    results = generate(tiny_model, PROMPTS[:3], settings, on_delta=on_delta)
    for i, result in enumerate(results):
        assert received.get((i, "thinking"), "") == result.thinking
        assert received.get((i, "answer"), "") == result.answer
        mine = [c for j, c in channels if j == i]
        assert mine == sorted(mine, key=["thinking", "answer"].index)  # thinking first, then answer


def test_cancelled_sequence_stops_and_others_go_on(tiny_model):
    settings = BudgetForcing(max_thinking_tokens=100, max_answer_tokens=20)
    results = generate(tiny_model, PROMPTS[:2], settings, is_cancelled=lambda i: i == 0)
    assert results[0].finish_reason == "cancelled"
    assert results[0].thinking_tokens == 0
    assert results[1].thinking_token_ids == generate(tiny_model, PROMPTS[1:2], settings)[0].thinking_token_ids


def test_sampling_is_seeded(tiny_model):
    settings = BudgetForcing(max_thinking_tokens=30, max_answer_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    first = generate(tiny_model, PROMPTS[:3], settings)
    again = generate(tiny_model, PROMPTS[:3], settings)
    other = generate(tiny_model, PROMPTS[:3], BudgetForcing(**{**settings.__dict__, "seed": 8}))
    assert [r.thinking_token_ids for r in first] == [r.thinking_token_ids for r in again]
    assert [r.thinking_token_ids for r in first] != [r.thinking_token_ids for r in other]


def test_auto_budget_fills_the_context_of_each_prompt(tiny_model):
    """"auto" = the context - the prompt's own length - the forced end - 100: a prompt's budget does
    not depend on the other prompts of its batch."""
    settings = BudgetForcing(max_thinking_tokens="auto", max_answer_tokens=4)
    for prompt in PROMPTS[:2]:
        budget = resolve_budget(tiny_model, settings, len(render_prompt(tiny_model, prompt).ids))
        forced_end = len(tiny_model.tokenizer("\n<|im_start|>answer\nFinal Answer:", add_special_tokens=False).input_ids)
        assert budget == tiny_model.context_length - len(render_prompt(tiny_model, prompt).ids) - forced_end - 100
    short = BudgetForcing(max_thinking_tokens="auto", max_answer_tokens=4)
    together = generate(tiny_model, PROMPTS[:2], short)
    alone = [generate(tiny_model, [p], short)[0] for p in PROMPTS[:2]]
    assert [r.thinking_token_ids for r in together] == [r.thinking_token_ids for r in alone]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_thinking_tokens": -1}, "max_thinking_tokens"),
        ({"max_thinking_tokens": 2.5}, "max_thinking_tokens"),
        ({"max_thinking_tokens": "lots"}, "max_thinking_tokens"),
        ({"num_ignore": -2}, "num_ignore"),
        ({"max_answer_tokens": 0}, "max_answer_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(UserError, match=message):
        BudgetForcing(**kwargs)


def test_bad_prompts_and_budgets_are_rejected(tiny_model):
    with pytest.raises(UserError, match="empty"):
        generate(tiny_model, ["What?", "  "], BudgetForcing(max_thinking_tokens=4))
    with pytest.raises(UserError, match="context"):
        generate(tiny_model, ["What?"], BudgetForcing(max_thinking_tokens=tiny_model.context_length))
    with pytest.raises(UserError, match="budget settings for"):
        generate(tiny_model, ["a", "b"], [BudgetForcing()])


@pytest.mark.slow
@pytest.mark.parametrize("num_ignore", [0, 2])
def test_engine_equals_reference_on_smollm2(smollm2, num_ignore):
    prompts = ["Say hi.", "What is 7 + 5?", "Name a colour.", "How many r are in the word raspberry?"]
    for budget in (12, 64):
        settings = BudgetForcing(max_thinking_tokens=budget, num_ignore=num_ignore, max_answer_tokens=12)
        batched = generate(smollm2, prompts, settings)
        alone = generate(smollm2, prompts[-1:], settings)  # batch 1
        assert_invariants(smollm2, batched + alone, settings)
        for prompt, result in zip(prompts, batched, strict=True):
            expected = reference_generate(smollm2, prompt, settings)
            assert result.thinking_token_ids == expected.thinking_token_ids, prompt
            assert result.answer_token_ids == expected.answer_token_ids, prompt
            assert (result.num_ignored, result.hit_budget) == (expected.num_ignored, expected.hit_budget)
        assert alone[0].thinking_token_ids == expected.thinking_token_ids
        assert alone[0].answer_token_ids == expected.answer_token_ids
        if budget == 12:
            assert any(r.hit_budget for r in batched), "want a budget that binds"
        else:
            assert any(not r.hit_budget for r in batched), "want a budget that does not bind"
            assert any(r.num_ignored for r in batched) == bool(num_ignore)


def test_per_prompt_settings_keep_their_own_seed(tiny_model):
    """A sampled request gives the same text wherever it lands in a batch (the server relies on it)."""
    sampled = BudgetForcing(max_thinking_tokens=25, max_answer_tokens=8, temperature=1.0, seed=123)
    greedy = BudgetForcing(max_thinking_tokens=5, max_answer_tokens=3)
    alone = generate(tiny_model, [PROMPTS[1]], [sampled])[0]
    batched = generate(tiny_model, [PROMPTS[0], PROMPTS[2], PROMPTS[1]], [greedy, greedy, sampled])[2]
    assert batched.thinking_token_ids == alone.thinking_token_ids
    assert batched.answer_token_ids == alone.answer_token_ids
    # One setting for the whole call: prompt i is sampled with seed + i.
    shared = generate(tiny_model, [PROMPTS[0], PROMPTS[1]], sampled)[1]
    assert shared.thinking_token_ids == generate(
        tiny_model, [PROMPTS[1]], BudgetForcing(**{**sampled.__dict__, "seed": 124})
    )[0].thinking_token_ids


@pytest.mark.slow
def test_s1_outputs_on_the_embedded_model_are_unchanged(smollm2, one_torch_thread):
    """Greedy (and seeded) outputs of the s1 profile on the embedded SmolLM2, recorded before the
    decisions moved into model profiles (tests/fixtures/s1_reference_smollm2.json), stay the same.
    The seeded case was recorded again when the engine's draw changed (its ``note``)."""
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "fixtures" / "s1_reference_smollm2.json").read_text())
    for case in recorded["cases"]:
        streamed = {}

        def on_delta(index, channel, text):
            streamed[(index, channel)] = streamed.get((index, channel), "") + text

        results = generate(smollm2, recorded["prompts"], BudgetForcing(**case["settings"]), on_delta=on_delta)
        for i, (result, expected) in enumerate(zip(results, case["results"], strict=True)):
            for key, value in expected.items():
                assert getattr(result, key) == value, (case["settings"], i, key)
            assert streamed.get((i, "thinking"), "") == result.thinking
            assert streamed.get((i, "answer"), "") == result.answer


# ---- a failed forward pass ------------------------------------------------------------------------


class FailingRunner:
    """The real runner, except that one forward pass fails: the first ``step`` after a sequence has
    left the batch (so that one sequence finishes in the step whose forward pass fails)."""

    def __init__(self, runner, *, fail: bool = True):
        self.runner = runner
        self.fail = fail  # still to fail once
        self.armed = False
        self.failed = False

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def release(self, slot: int) -> None:
        self.runner.release(slot)
        self.armed = self.fail

    def step(self, slots, tokens):
        if self.armed:
            self.fail = self.armed = False
            self.failed = True
            raise RuntimeError("the forward pass failed (injected)")
        return self.runner.step(slots, tokens)


SHORT = BudgetForcing(max_thinking_tokens=0, max_answer_tokens=3)
LONG = BudgetForcing(max_thinking_tokens=60, max_answer_tokens=20)


def test_a_failed_forward_pass_keeps_the_results_finished_in_its_step(tiny_model):
    from t0s1.forcing import Engine, ForwardPassError

    expected = generate(tiny_model, PROMPTS[:2], [SHORT, LONG])
    assert expected[1].thinking_tokens + expected[1].answer_tokens > 12  # the long one runs on
    runner = FailingRunner(tiny_model.new_runner())
    engine = Engine(tiny_model, runner=runner)
    engine.add([tiny_model.rules.sequence(i, render_prompt(tiny_model, PROMPTS[i]), s) for i, s in enumerate([SHORT, LONG])])
    with pytest.raises(ForwardPassError, match="injected") as failure, torch.inference_mode():
        while engine.active:
            assert not engine.step()  # nothing finishes before the failing step
    assert runner.failed and engine.active == 0
    assert isinstance(failure.value.error, RuntimeError) and failure.value.__cause__ is failure.value.error
    [finished] = failure.value.finished
    result = finished.result(0.0)
    assert finished.index == 0 and result.answer_token_ids == expected[0].answer_token_ids
    assert result.answer == expected[0].answer

    # generate (Engine.run): the original error, after the finished sequence's text was streamed whole.
    streamed = {}

    def on_delta(index, channel, text):
        streamed[(index, channel)] = streamed.get((index, channel), "") + text

    class FailingModel:
        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def new_runner(self, **kwargs):
            return FailingRunner(tiny_model.new_runner(**kwargs))

    with pytest.raises(RuntimeError, match=r"^the forward pass failed \(injected\)$"):
        generate(FailingModel(), PROMPTS[:2], [SHORT, LONG], on_delta=on_delta)
    assert streamed[(0, "answer")] == expected[0].answer


def test_a_failed_forward_pass_in_the_server_fails_only_the_running_requests(tiny_model):
    """The server's batcher delivers the request that finished in the failing step, fails the one
    still running, and serves the next request on a fresh engine."""
    import asyncio
    import threading

    from t0s1.serving.batcher import Batcher

    expected = generate(tiny_model, PROMPTS[:2], [SHORT, LONG])
    both_queued = threading.Event()
    runners = []

    class FailingModel:
        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def new_runner(self, **kwargs):
            runner = FailingRunner(tiny_model.new_runner(**kwargs), fail=not runners)
            add = runner.runner.add

            def add_when_both_are_queued(prompts):  # both requests run in the same batch
                both_queued.wait(30)
                return add(prompts)

            runner.add = add_when_both_are_queued
            runners.append(runner)
            return runner

    async def outcome(job):
        while True:
            kind, value = await asyncio.wait_for(job.events.get(), 60)
            if kind in ("result", "error"):
                return kind, value

    async def serve():
        batcher = Batcher(FailingModel(), max_batch=4)
        batcher.start()
        try:
            jobs = [batcher.submit(render_prompt(tiny_model, PROMPTS[i]), s, stream=True) for i, s in enumerate([SHORT, LONG])]
            both_queued.set()
            short, long = [await outcome(job) for job in jobs]
            after = await outcome(batcher.submit(render_prompt(tiny_model, PROMPTS[1]), LONG, stream=False))
        finally:
            batcher.stop()
        return short, long, after

    short, long, after = asyncio.run(serve())
    assert runners[0].failed
    assert short[0] == "result" and short[1].answer_token_ids == expected[0].answer_token_ids
    assert long[0] == "error" and "injected" in str(long[1])
    assert after[0] == "result" and after[1].thinking_token_ids == expected[1].thinking_token_ids


def test_a_prompt_longer_than_the_context_says_so_without_a_negative_budget():
    from t0s1.errors import UserError
    from t0s1.forcing_rules import BudgetForcing

    with pytest.raises(UserError, match="leaves no room to think or answer. Shorten the prompt") as error:
        BudgetForcing(max_thinking_tokens=64).thinking_budget(prompt_length=9000, context_length=8192, forced_end_length=7)
    assert "-" not in str(error.value).split("context is")[1]


def test_the_draw_follows_the_probabilities_within_the_nucleus_and_never_takes_an_impossible_id(monkeypatch):
    """``draw_token``: one uniform number against the cumulative probabilities. Ids of probability 0
    (masked, or outside the top-p nucleus) are never drawn, even when the uniform number times the
    total rounds up to the total; the others come in proportion; a seed repeats its draws."""
    from t0s1.forcing import draw_token

    probs = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.3, 0.0])
    draws = [draw_token(probs, 1.0, torch.Generator().manual_seed(seed)) for seed in range(3000)]
    assert set(draws) == {1, 3, 4}
    assert [round(draws.count(i) / len(draws), 1) for i in (1, 3, 4)] == [0.1, 0.6, 0.3]
    generator, again = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [draw_token(probs, 1.0, generator) for _ in range(20)] == [draw_token(probs, 1.0, again) for _ in range(20)]
    # top_p 0.8: the nucleus is 3 (0.6) and 4 (0.3), the ids whose mass before them is at most 0.8
    assert {draw_token(probs, 0.8, torch.Generator().manual_seed(seed)) for seed in range(500)} == {3, 4}
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor(1.0, dtype=torch.float64))
    assert draw_token(probs, 1.0, None) == 4
