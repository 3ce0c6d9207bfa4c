"""Continuous batching in the engine, as the server drives it: sequences that join a running
batch, leave it, or fail in it give exactly what they give alone."""

from __future__ import annotations

import pytest
import torch

from t0s1 import BudgetForcing, generate
from t0s1.forcing import Engine, render_prompt

PROMPTS = [
    "How many r are in raspberry?",
    "Hi",
    "What is 12 + 35 * 2? Think step by step and check the result, then check it again, twice.",
    "1+1?",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sequence(lm, index, prompt, settings):
    return lm.rules.sequence(index, render_prompt(lm, prompt), settings)


def alone(lm, prompt, settings):
    return generate(lm, [prompt], settings)[0]


@torch.inference_mode()
def test_sequences_joining_a_running_batch_equal_their_runs_alone(tiny_model):
    """Prompts shorter and longer than the running rows' cache join mid-run, one of them after the
    others have left and the cache was freed; every result equals the prompt run alone."""
    settings = [BudgetForcing(max_thinking_tokens=120, num_ignore=2, max_answer_tokens=10),
                BudgetForcing(max_thinking_tokens=30, max_answer_tokens=5),
                BudgetForcing(max_thinking_tokens=60, num_ignore=1, max_answer_tokens=8),
                BudgetForcing(max_thinking_tokens=0, max_answer_tokens=4)]
    engine = Engine(tiny_model)
    results = {}

    def step():
        for finished in engine.step():
            results[finished.index] = finished.result(0.0)

    engine.add([sequence(tiny_model, 0, PROMPTS[0], settings[0])])
    for _ in range(10):
        step()
    engine.add([sequence(tiny_model, 1, PROMPTS[1], settings[1]), sequence(tiny_model, 2, PROMPTS[2], settings[2])])
    while engine.active:
        step()
    assert engine.runner.cache is None  # every sequence has left: the cache is freed
    engine.add([sequence(tiny_model, 3, PROMPTS[3], settings[3])])  # a fresh batch
    while engine.active:
        step()
    for i, setting in enumerate(settings):
        expected = alone(tiny_model, PROMPTS[i], setting)
        assert results[i].thinking_token_ids == expected.thinking_token_ids, i
        assert results[i].answer_token_ids == expected.answer_token_ids, i
        assert (results[i].num_ignored, results[i].hit_budget) == (expected.num_ignored, expected.hit_budget)


@torch.inference_mode()
def test_a_failing_sequence_leaves_and_the_others_go_on(tiny_model, monkeypatch):
    settings = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=6)
    sample = Engine._sample

    def failing_sample(self, row, logits, argmax):
        if row.sequence.index == 1 and len(row.sequence.thinking_ids) == 5:
            raise RuntimeError("sampling failed")
        return sample(self, row, logits, argmax)

    monkeypatch.setattr(Engine, "_sample", failing_sample)
    failures = []
    engine = Engine(tiny_model, on_error=lambda sequence, error: failures.append((sequence.index, str(error))))
    engine.add([sequence(tiny_model, i, PROMPTS[i], settings) for i in range(3)])
    results = {}
    while engine.active:
        for finished in engine.step():
            results[finished.index] = finished.result(0.0)
    assert failures == [(1, "sampling failed")] and set(results) == {0, 2}
    for i in (0, 2):
        assert results[i].thinking_token_ids == alone(tiny_model, PROMPTS[i], settings).thinking_token_ids
    with pytest.raises(RuntimeError, match="sampling failed"):  # without on_error the error propagates
        generate(tiny_model, PROMPTS[:2], settings)


@torch.inference_mode()
def test_a_failed_add_leaves_the_engine_as_it_was_and_the_running_sequences_go_on(tiny_model):
    """A prefill that fails after the runner took slots (here the fork of a second sequence of the
    same prompt; on a GPU an out-of-memory) used to leave rows without logits in the engine: the
    batcher's retry then added them twice and the worker died for every client."""
    settings = [BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=6),
                BudgetForcing(max_thinking_tokens=20, max_answer_tokens=5),
                BudgetForcing(max_thinking_tokens=30, max_answer_tokens=4)]
    engine = Engine(tiny_model)
    engine.add([sequence(tiny_model, 0, PROMPTS[0], settings[0])])
    for _ in range(5):
        engine.step()
    fork, forks = engine.runner.fork, []

    def fork_failing_once(slot):
        forks.append(slot)
        if len(forks) == 1:
            raise RuntimeError("out of memory")
        return fork(slot)

    engine.runner.fork = fork_failing_once
    rows, logits, live = list(engine.rows), engine.logits.clone(), dict(engine.runner.lengths)
    joining = [sequence(tiny_model, 1, PROMPTS[2], settings[1]), sequence(tiny_model, 2, PROMPTS[2], settings[2])]
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.add(joining)
    assert engine.rows == rows and torch.equal(engine.logits, logits) and engine.runner.lengths == live
    engine.add([sequence(tiny_model, 1, PROMPTS[2], settings[1]), sequence(tiny_model, 2, PROMPTS[2], settings[2])])  # again
    results = {}
    while engine.active:
        for finished in engine.step():
            results[finished.index] = finished.result(0.0)
    assert set(results) == {0, 1, 2} and len(forks) == 2
    for i, prompt in enumerate([PROMPTS[0], PROMPTS[2], PROMPTS[2]]):
        expected = alone(tiny_model, prompt, settings[i])
        assert results[i].thinking_token_ids == expected.thinking_token_ids, i
        assert results[i].answer_token_ids == expected.answer_token_ids, i


def test_a_huge_temperature_samples_every_id_alike_not_greedily(tiny_model):
    """Past float32's range the scaled logits of banned ids were -inf / inf, NaN: the engine fell
    back to greedy decoding while the reply reported a sampling seed."""
    huge = alone(tiny_model, PROMPTS[0], BudgetForcing(max_thinking_tokens=20, max_answer_tokens=4, temperature=1e300, seed=1))
    bound = alone(tiny_model, PROMPTS[0], BudgetForcing(max_thinking_tokens=20, max_answer_tokens=4, temperature=1e30, seed=1))
    greedy = alone(tiny_model, PROMPTS[0], BudgetForcing(max_thinking_tokens=20, max_answer_tokens=4))
    assert huge.thinking_token_ids == bound.thinking_token_ids != greedy.thinking_token_ids
    assert len(set(huge.thinking_token_ids)) > 10  # uniform over a vocabulary of thousands: hardly a repeat


def test_a_vanishing_temperature_samples_greedily(tiny_model):
    """A temperature so small that the scaled logits overflow is its limit, greedy decoding (it
    used to fail with NaN probabilities)."""
    tiny = alone(tiny_model, PROMPTS[0], BudgetForcing(max_thinking_tokens=20, max_answer_tokens=4, temperature=1e-300, seed=1))
    greedy = alone(tiny_model, PROMPTS[0], BudgetForcing(max_thinking_tokens=20, max_answer_tokens=4))
    assert tiny.thinking_token_ids == greedy.thinking_token_ids and tiny.answer_token_ids == greedy.answer_token_ids
