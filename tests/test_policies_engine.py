"""The policies on the engine: DEER's trial answers and Dynasor's probes on a scripted model whose
probabilities are set, so each decision is exact; parallel traces, DeepConf and short-m@k on a
tiny random model; the command line."""

from __future__ import annotations

import json
from dataclasses import replace
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from t0s1.errors import UserError
from t0s1.forcing import Engine, generate, generate_from_ids
from t0s1.forcing_rules import BudgetForcing, ForcingRules, render_prompt_ids
from t0s1.policies import make_policy, rules
from t0s1.policies.run import generate_with_policy, rows_at_once as policy_rows

CONTEXT = 2048


class ConfidentLM:
    """A model that writes what a table says, with the probability the table says:
    ``table[context] = (token, probability)``; the end of turn, surely, where it says nothing."""

    def __init__(self, tokenizer, profile):
        self.tokenizer, self.profile, self.name = tokenizer, profile, "confident"
        self.rules = ForcingRules(tokenizer, profile, context_length=CONTEXT)
        self.context_length = CONTEXT
        self.vocab_size = len(tokenizer)
        self.end_of_turn = min(self.rules.end_of_turn)
        self.table: dict[tuple[int, ...], tuple[int, float]] = {}

    def logits(self, context: list[int]) -> torch.Tensor:
        token, probability = self.table.get(tuple(context), (self.end_of_turn, 1.0))
        row = torch.zeros(self.vocab_size)
        # softmax gives ``probability`` to ``token`` and shares the rest evenly
        row[token] = 30.0 if probability >= 1 else math.log(probability / (1 - probability) * (self.vocab_size - 1))
        return row

    def new_runner(self, rows=None, length=None):
        return _Runner(self)


class _Runner:
    def __init__(self, lm):
        self.lm, self.contexts, self.next_slot = lm, {}, 0

    def _logits(self, slots):
        return torch.stack([self.lm.logits(self.contexts[s]) for s in slots])

    def add(self, prompts):
        slots = []
        for prompt in prompts:
            self.contexts[self.next_slot] = list(prompt)
            slots.append(self.next_slot)
            self.next_slot += 1
        return slots, self._logits(slots)

    def step(self, slots, tokens):
        for slot, token in zip(slots, tokens, strict=True):
            self.contexts[slot].append(token)
        return self._logits(slots)

    def fork(self, slot):
        self.contexts[self.next_slot] = list(self.contexts[slot])
        self.next_slot += 1
        return self.next_slot - 1

    def rollback(self, slot, count):
        del self.contexts[slot][len(self.contexts[slot]) - count :]

    def release(self, slot):
        self.contexts.pop(slot)

    def close(self):
        self.contexts.clear()


@pytest.fixture(scope="module")
def confident(tiny_model):
    return ConfidentLM(tiny_model.tokenizer, tiny_model.profile)


def _ids(lm, text):
    return lm.tokenizer(text, add_special_tokens=False).input_ids


def _script(lm, prompt, settings, thinking_script, branch_answers):
    """Write the trace (``thinking_script``: ids, None = the model ends its thinking, then the
    answer) and, for the k-th branch point met, ``branch_answers[k]`` = [(id, probability), ...]
    after the forced end. Returns the branch points (thinking tokens at each)."""
    lm.table.clear()
    points = []
    sequence = lm.rules.sequence(0, prompt, settings)

    def watch(seq, event, written):
        if len(points) < len(branch_answers) and _wants(event, seq):
            branch = seq.branch(settings, drop_last=written if event == "ignore" else 0)
            context = list(branch.ids)
            for token, probability in branch_answers[len(points)]:
                lm.table[tuple(context)] = (token, probability)
                context.append(token)
            points.append(len(seq.thinking_ids))
        return []

    sequence.on_thinking = watch
    script = iter(thinking_script)
    while not sequence.done:
        token = next(script, lm.end_of_turn)
        token = lm.end_of_turn if token is None else token
        if token in sequence.banned_ids():
            token = _ids(lm, " so")[0]
        lm.table[tuple(sequence.ids)] = (token, 0.9)
        sequence.accept(token)
        sequence.take_rewind()
    return points


def _wants(event, seq):
    """The branch points of the policy under test: its events, and for "token" every 2nd token."""
    return event in _wants.event and (event != "token" or len(seq.thinking_ids) % 2 == 0)


def _prompt(lm):
    return render_prompt_ids(lm.tokenizer, lm.profile, "How many r are in raspberry?")


@pytest.mark.parametrize("last_probability, exits", [(0.96, True), (0.94, False)])
def test_early_exit_decides_on_the_trial_answers_confidence(confident, last_probability, exits):
    lm = confident
    settings = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=6)
    count, two, nine = _ids(lm, " Let me count"), _ids(lm, " 2")[0], _ids(lm, " 9")[0]
    thinking = [*count, None, *_ids(lm, " one two"), None, nine]  # ends, Wait, ends again, answers " 9"
    _wants.event = ("end", "ignore")
    points = _script(lm, _prompt(lm), settings, thinking, [[(two, 0.5), (lm.end_of_turn, last_probability)]])
    assert points == [len(count)]
    policy = make_policy("early-exit")  # DEER: threshold 0.95, geometric mean from the 2nd token
    result = generate_with_policy(lm, [_prompt(lm)], settings, policy, extract=lambda text: text.split(":")[-1].strip() or None)[0]
    plain = generate_from_ids(lm, [_prompt(lm)], settings)[0]
    assert result.probes == 1
    trace = result.traces[0]
    if exits:  # the thinking ends at the trial point and the trial's answer is the reply
        assert trace.stopped_early and trace.result.thinking_tokens == len(count) and trace.result.num_ignored == 0
        assert result.voted == "2" and result.answer == "Final Answer: 2"
        # every token counted: the trace's 3 + the trial's 2 + the continuation until the decision
        assert result.total_tokens > len(count) + 2
    else:  # nothing changes: the reply is budget forcing's
        assert not trace.stopped_early
        assert (trace.result.thinking, trace.result.answer, trace.result.num_ignored) == (plain.thinking, plain.answer, plain.num_ignored)
        assert result.voted == "9"


def test_probe_exits_when_the_last_probes_agree_and_none_hedges(confident):
    lm = confident
    settings = BudgetForcing(max_thinking_tokens=40, max_answer_tokens=6)
    words = _ids(lm, " Let me count the letters one by one")
    assert len(words) >= 8
    seven, nine, wait = _ids(lm, " 7")[0], _ids(lm, " 9")[0], _ids(lm, " Wait")
    _wants.event = ("token",)

    def run(third_probe):
        _script(lm, _prompt(lm), settings, words[:8] + [None, nine],
                [[(seven, 0.9)], [(nine, 0.9)], third_probe, [(nine, 0.9)]])
        # probes at 2, 4, 6 thinking tokens: agree = 2 needs two equal answers in a row
        policy = make_policy("probe", {"interval": "2", "agree": "2", "probe_tokens": "3"})
        return generate_with_policy(lm, [_prompt(lm)], settings, policy, extract=lambda t: t.split(":")[-1].split()[-1] if t.split(":")[-1].split() else None)[0]

    agreeing = run([(nine, 0.9)])
    assert agreeing.traces[0].stopped_early and agreeing.traces[0].result.thinking_tokens == 6
    # the probe at 8 had started before the one at 6 was decided: dropped, its tokens counted
    assert agreeing.voted == "9" and agreeing.probes == 4
    hedging = run([*[(t, 0.9) for t in wait], (nine, 0.9)])  # the third probe says "Wait 9": no exit at 6
    # the fourth probe (at 8) agrees with the third, which hedges: no exit; the trace ends by itself
    assert not hedging.traces[0].stopped_early and hedging.traces[0].result.thinking_tokens == 8
    assert hedging.probes == 4


def test_parallel_traces_share_one_prefill_and_count_every_token(tiny_model):
    calls = []
    runner = tiny_model.new_runner()
    original = runner.add

    def add(prompts):
        calls.append(len(prompts))
        return original(prompts)

    runner.add = add
    budget = BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4, temperature=0.8, seed=3)
    rendered = render_prompt_ids(tiny_model.tokenizer, tiny_model.profile, "What is 1 + 2?")
    sequences = [tiny_model.rules.sequence(j, rendered, budget) for j in range(4)]
    Engine(tiny_model, runner=runner).run(sequences, 4)
    assert calls == [1]  # four samples, one prefill
    out = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget, make_policy("vote", n=4))[0]
    assert len(out.traces) == 4
    assert out.total_tokens == sum(t.generated_tokens for t in out.traces)
    for trace in out.traces:  # generated: the thinking and answer tokens, and a sampled stop token
        assert 0 <= trace.generated_tokens - (trace.result.thinking_tokens + trace.result.answer_tokens) <= 2
    # sampled trace j uses seed + j: the same as generating it alone
    alone = generate(tiny_model, ["What is 1 + 2?"], BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4, temperature=0.8, seed=5))[0]
    assert out.traces[2].result.thinking_token_ids == alone.thinking_token_ids


def test_deepconf_keeps_log_probs_and_votes(tiny_model):
    budget = BudgetForcing(max_thinking_tokens=8, max_answer_tokens=4, temperature=0.8, seed=0)
    offline = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget, make_policy("deepconf", {"window": "4"}, n=4))[0]
    for trace in offline.traces:
        # one confidence per sampled token: the thinking, the end of thinking the model wrote (when the
        # budget did not end it; it is no thinking token), the answer and its end of turn
        result = trace.result
        sampled = result.thinking_tokens + (not result.hit_budget) + result.answer_tokens + (result.finish_reason == "stop")
        assert len(trace.confs) == sampled
        assert all(c > 0 for c in trace.confs) and trace.confidence is not None
        # k float32 numbers a token (not a list of Python floats each), largest first; lists in to_dict
        steps = trace.result.top_logprobs
        assert steps.dtype == np.float32 and steps.shape == (sampled, 20) and steps.nbytes == sampled * 20 * 4
        assert (np.diff(steps, axis=1) <= 0).all()
        assert trace.result.to_dict()["top_logprobs"] == steps.tolist()
        assert trace.confs == [rules.token_confidence(step.tolist()) for step in steps]
    assert sum(t.voted for t in offline.traces) >= 1
    online = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget,
                                  make_policy("deepconf", {"mode": "online", "warmup": "2", "window": "2", "keep_percent": "10"}, n=6))[0]
    assert len(online.traces) >= 2 and online.total_tokens >= sum(t.result.thinking_tokens for t in online.traces[:2])


def test_short_m_of_k_stops_the_rest(tiny_model):
    budget = BudgetForcing(max_thinking_tokens=12, max_answer_tokens=4, temperature=0.9, seed=1)
    out = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget, make_policy("short-m-of-k", {"m": "1"}, n=4))[0]
    finished = [t for t in out.traces if t.result.finish_reason != "cancelled"]
    assert len(finished) >= 1 and sum(t.voted for t in out.traces) == 1


def test_short_m_of_k_cancels_only_traces_still_running(tiny_model):
    """Traces that finished in the same step as the m-th were relabelled cancelled: reported with no
    answer while whole (their tokens counted). Here all four end in one step, at max_answer_tokens:
    they finish as they would alone, and the first m vote."""
    budget = BudgetForcing(max_thinking_tokens=20, num_ignore=1, max_answer_tokens=5, temperature=0.9, seed=4)
    out = generate_with_policy(tiny_model, ["How many r are in raspberry?"], budget, make_policy("short-m-of-k", {"m": "2"}, n=4))[0]
    for j, trace in enumerate(out.traces):
        alone = generate(tiny_model, ["How many r are in raspberry?"], replace(budget, seed=4 + j))[0]
        assert trace.result.finish_reason == alone.finish_reason == "length" and not trace.stopped_early
        assert trace.result.answer_token_ids == alone.answer_token_ids
    assert [t.voted for t in out.traces] == [True, True, False, False]


@pytest.mark.parametrize("name, args", [("early-exit", {}), ("probe", {"interval": "4"})])
def test_branching_policies_run_prompts_admitted_after_the_first(tiny_model, monkeypatch, name, args):
    """A prompt admitted once another had left (more prompts than the model's rows allow) asked for
    its trace before it had one: KeyError 0 (llama.cpp: 129 prompts for early exit, 52 for probes)."""
    prompts = [f"What is {i} + {i}?" for i in range(3)]
    budget = BudgetForcing(max_thinking_tokens=24, num_ignore=1, max_answer_tokens=3)
    policy = make_policy(name, args)
    free = generate_with_policy(tiny_model, prompts, budget, policy)
    monkeypatch.setattr(tiny_model, "max_sequences", policy_rows(policy), raising=False)  # one prompt at a time
    limited = generate_with_policy(tiny_model, prompts, budget, policy)
    assert [o.result.thinking_token_ids for o in limited] == [o.result.thinking_token_ids for o in free]


def test_policy_errors(tiny_model):
    with pytest.raises(UserError, match="needs sampling"):
        generate_with_policy(tiny_model, ["q"], BudgetForcing(), make_policy("vote", n=4))
    import t0s1

    with pytest.raises(UserError, match="one BudgetForcing"):
        t0s1.generate(tiny_model, ["q"], [BudgetForcing()], policy="budget")
    out = t0s1.generate(tiny_model, ["q"], BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2), policy="budget")
    assert out[0].policy == "budget" and len(out[0].traces) == 1


def test_generate_command_with_a_policy(tiny_model_dir):
    base = [sys.executable, "-m", "t0s1", "generate", "What is 1 + 2?", "--model", str(tiny_model_dir), "--backend", "transformers",
            "--max-thinking-tokens", "8", "--max-answer-tokens", "4", "--temperature", "0.7"]
    command = base + ["--policy", "deepconf", "--n", "3", "--policy-arg", "window=4", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {"voted", "answer", "total_tokens", "traces"} <= set(data)
    assert len(data["traces"]) == 3
    assert {"answer", "thinking_tokens", "stopped_early", "confs", "confidence"} <= set(data["traces"][0])
    bad = subprocess.run(base + ["--policy", "deepconf", "--policy-arg", "keep_percent=150"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "keep_percent must be a number in" in bad.stderr + bad.stdout
    unknown = subprocess.run(base + ["--policy", "beam"], capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "unknown policy 'beam'" in unknown.stderr + unknown.stdout


def test_lm_eval_model_runs_a_policy(tiny_model, tiny_model_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from t0s1.backends.engine import EngineBackend
    from t0s1.lm_eval import T0S1LM
    from t0s1.lm_eval.model import harness_answer

    settings = {"max_thinking_tokens": 8, "max_answer_tokens": 4, "temperature": 0.7, "seed": 0}
    model = T0S1LM(backend=EngineBackend(tiny_model), progress=False, policy="vote", n=3, **settings)
    request = Instance("generate_until", {}, ("What is 1 + 2?", {"until": []}), 0, metadata=("demo", 0, 1))
    text = model.generate_until([request])[0]
    from t0s1.evaluation.runner import sample_seed

    seeded = BudgetForcing(**{**settings, "seed": sample_seed(0, 0, 0)})  # the harness seeds (question, k) as t0s1 eval
    expected = generate_with_policy(tiny_model, ["What is 1 + 2?"], seeded, make_policy("vote", n=3), extract=harness_answer)[0]
    assert text == tiny_model.profile.assistant_content(expected.result.thinking, expected.answer)
    # the task's answer kind is unknown inside the harness: math, else a choice letter, else the first line
    assert [harness_answer(reply) for reply in ("so \\boxed{12}.", "It must be (B).", "Paris\nsurely", "")] == ["12", "B", "Paris", None]
    assert model.get_model_info()["policy"] == "vote[n=3]"
    with pytest.raises(UserError, match="need policy=NAME"):
        T0S1LM(backend=EngineBackend(tiny_model), progress=False, n=3)
    with pytest.raises(UserError, match="no parameter 'windw'"):
        T0S1LM(backend=EngineBackend(tiny_model), progress=False, policy="deepconf", policy_windw=3)
    with pytest.raises(UserError, match=r"policy=deepconf runs on the engine backends \(transformers, llamacpp\), not openai"):
        T0S1LM(pretrained=str(tiny_model_dir), backend="openai", base_url="http://127.0.0.1:9/v1", tokenizer=str(tiny_model_dir),
               policy="deepconf", progress=False)  # refused before any request (nothing listens there)


def test_parameters_from_json_and_top_k_beyond_the_vocabulary(tiny_model, monkeypatch):
    assert make_policy("deepconf", {"window": 5.0}).window == 5  # a JSON body's 5.0 is the integer 5
    with pytest.raises(UserError, match="window must be a positive integer"):
        make_policy("deepconf", {"window": 5.5})
    budget = BudgetForcing(max_thinking_tokens=4, max_answer_tokens=2, temperature=0.7)
    monkeypatch.setattr(type(tiny_model), "vocab_size", property(lambda self: 40))  # a vocabulary under top_k's bound
    with pytest.raises(UserError, match="larger than the model's vocabulary"):
        generate_with_policy(tiny_model, ["q"], budget, make_policy("deepconf", {"top_k": "50"}, n=2))


def test_deepconf_online_stops_a_trace_whose_window_falls_below_the_threshold(confident):
    """The running window mean equals the mean of the last ``window`` token confidences."""
    from t0s1.policies.run import _DeepConf

    lm = confident
    policy = make_policy("deepconf", {"mode": "online", "warmup": "1", "window": "3"}, n=2)
    controller = _DeepConf(lm, policy, BudgetForcing(temperature=0.5), _prompt(lm), 0, lambda text: None)
    sequence = lm.rules.sequence(1, _prompt(lm), BudgetForcing(temperature=0.5))
    steps = [[-0.1, -2.0], [-0.2, -3.0], [-0.1, -1.0], [-0.5, -0.6], [-0.3, -0.4]]
    expected = [rules_conf(step) for step in steps]
    for count in range(1, len(steps) + 1):
        sequence.top_logprobs = steps[:count]
        mean = controller._window_mean(sequence)
        if count < 3:
            assert mean == float("inf")
        else:
            assert mean == pytest.approx(sum(expected[count - 3 : count]) / 3)


def rules_conf(step):
    from t0s1.policies import rules

    return rules.token_confidence(step)


def test_branches_of_many_prompts_stay_with_their_own_prompt(tiny_model):
    """Branches come and go by the hundred: each keeps its prompt (a lookup by id() mixed them up
    once a freed branch's id was reused)."""
    prompts = [f"What is {i} + {i}?" for i in range(6)]
    budget = BudgetForcing(max_thinking_tokens=24, num_ignore=1, max_answer_tokens=3)
    out = generate_with_policy(tiny_model, prompts, budget, make_policy("probe", {"interval": "2", "agree": "1", "probe_tokens": "2"}))
    assert len(out) == 6 and all(len(o.traces) == 1 and o.probes >= 1 for o in out)
    plain = generate(tiny_model, prompts, budget)
    assert all(o.result.thinking_tokens <= p.thinking_tokens for o, p in zip(out, plain, strict=True))


@pytest.mark.parametrize("answers, wave, started", [
    (["a", "a"], 1, 3),  # the warm-up agrees: one later trace, then consensus
    (["a", "b"], 1, 3),  # disagreement: traces one at a time until "a" holds the consensus
    (["a", "b"], 2, 4),  # two at a time: the wave that reaches consensus is whole
    (["a", "b", "c", "d", "e", "f"], 1, 6),  # never agreeing: all n traces
])
def test_deepconf_online_samples_in_waves_until_consensus(tiny_model, monkeypatch, answers, wave, started):
    """DeepConf online starts its later traces ``wave`` at a time and checks the consensus after
    each later trace, as the paper's loop: every trace past the consensus is never sampled."""
    from t0s1.policies import rules

    monkeypatch.setattr(rules, "warmup_threshold", lambda lowest, keep_percent: float("-inf"))  # every trace votes
    replies = iter(answers)
    budget = BudgetForcing(max_thinking_tokens=6, max_answer_tokens=2, temperature=0.8, seed=0)
    args = {"mode": "online", "warmup": "2", "window": "1000", "keep_percent": "100", "consensus": "0.6", "wave": str(wave)}
    out = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget, make_policy("deepconf", args, n=6),
                               extract=lambda text: next(replies, "a"))[0]
    assert len(out.traces) == started
    assert out.voted in answers and (out.voted == "a" or started == 6)
    assert out.total_tokens == sum(t.generated_tokens for t in out.traces)


def test_deepconf_online_forks_its_later_traces_from_the_kept_prefill(tiny_model_dir, monkeypatch):
    """DeepConf online's later traces start after the warm-up traces have left the engine: they
    fork the prompt's prefill, kept for them, instead of prefilling the prompt again (n samples of
    one prompt, one prefill), and each samples as trace j alone; the copy is dropped once its
    prompt is done. (float64: the later traces of two prompts share a batch, and only in float64
    does a row's result not depend on its neighbours to the last bit.)"""
    from t0s1.forcing import TorchRunner
    from t0s1.models import load_model

    lm = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float64)
    monkeypatch.setattr(rules, "warmup_threshold", lambda lowest, keep_percent: float("-inf"))  # no trace stops early
    prefilled, dropped, original_add, original_drop = [], [], TorchRunner.add, TorchRunner.drop_kept
    monkeypatch.setattr(TorchRunner, "add", lambda self, ids: (prefilled.append(len(ids)), original_add(self, ids))[1])
    monkeypatch.setattr(TorchRunner, "drop_kept", lambda self, handle: (dropped.append(handle in self.kept), original_drop(self, handle))[1])
    budget = BudgetForcing(max_thinking_tokens=10, max_answer_tokens=3, temperature=0.8, seed=3)
    answers = iter(range(100))  # never a consensus: every trace runs
    policy = make_policy("deepconf", {"mode": "online", "warmup": "2", "window": "4"}, n=5)
    out = generate_with_policy(lm, ["What is 1 + 2?", "Hi"], budget, policy, extract=lambda text: str(next(answers)))
    assert prefilled == [2] and all(len(o.traces) == 5 for o in out)
    assert dropped == [True, True]
    for j in range(5):
        alone = generate(lm, ["Hi"], BudgetForcing(max_thinking_tokens=10, max_answer_tokens=3, temperature=0.8, seed=3 + j))[0]
        assert out[1].traces[j].result.thinking_token_ids == alone.thinking_token_ids


def test_deepconf_online_later_traces_below_the_threshold_do_not_vote(tiny_model, monkeypatch):
    """A later trace shorter than the window is never checked while it runs; its score still
    decides whether it votes, as for the warm-up traces (DeepConf's reference filters them all)."""
    from t0s1.policies import rules

    monkeypatch.setattr(rules, "warmup_threshold", lambda lowest, keep_percent: float("inf"))  # no trace reaches it
    budget = BudgetForcing(max_thinking_tokens=6, max_answer_tokens=2, temperature=0.8, seed=0)
    args = {"mode": "online", "warmup": "2", "window": "1000", "wave": "2"}
    out = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget, make_policy("deepconf", args, n=4),
                               extract=lambda text: "a")[0]
    assert len(out.traces) == 4 and not any(t.voted for t in out.traces) and out.voted is None


def test_probes_pending_at_once_are_bounded(tiny_model, monkeypatch):
    """A probe every token, each running 8 tokens: at most MAX_PENDING_PROBES forks at once."""
    from t0s1.policies import MAX_PENDING_PROBES
    from t0s1.policies.run import _Probe

    most = []
    original = _Probe.after_step

    def watch(self, engine):
        most.append(len(self.pending))
        return original(self, engine)

    monkeypatch.setattr(_Probe, "after_step", watch)
    budget = BudgetForcing(max_thinking_tokens=24, max_answer_tokens=8)
    out = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget,
                               make_policy("probe", {"interval": "1", "probe_tokens": "8", "agree": "30"}))[0]
    assert max(most) == MAX_PENDING_PROBES and out.probes >= MAX_PENDING_PROBES


def test_a_dropped_probe_frees_its_row_before_the_trace_forks_the_next(tiny_model, monkeypatch):
    """A probe every token, each decided after 2 tokens and dropped (they never agree): the trace
    forks a new probe in the step after one is dropped, and the runner never holds more rows than
    the policy counts on (``peak_rows``, what admission reserves for the prompt)."""
    from test_sweep import record_rows

    from t0s1.policies.run import rows_at_once

    seen = record_rows(tiny_model, monkeypatch)
    budget = BudgetForcing(max_thinking_tokens=24, max_answer_tokens=8)
    out = generate_with_policy(tiny_model, ["What is 1 + 2?"], budget,
                               make_policy("probe", {"interval": "1", "probe_tokens": "2", "agree": "30"}))[0]
    assert out.probes >= 5
    assert seen["peak"] <= rows_at_once(make_policy("probe")), seen


def test_generate_file_with_a_policy_runs_in_batches_with_a_seed_per_prompt(tiny_model_dir, tmp_path):
    """Prompt i of a file samples its traces from seed + i, whatever the batch size: two copies of
    one prompt get different traces, and batches of 1 give what one batch of 2 gives."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1 + 2?"}\n' * 2, encoding="utf-8")
    rows = {}
    for batch_size in (1, 2):
        out = tmp_path / f"out{batch_size}.jsonl"
        command = [sys.executable, "-m", "t0s1", "generate", "--file", str(prompts), "--out", str(out), "--model", str(tiny_model_dir),
                   "--backend", "transformers", "--max-thinking-tokens", "8", "--max-answer-tokens", "4", "--temperature", "0.8",
                   "--policy", "vote", "--n", "2", "--batch-size", str(batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        rows[batch_size] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["index"], r["prompt"]) for r in rows[2]] == [(0, "What is 1 + 2?"), (1, "What is 1 + 2?")]
    first, second = ([t["thinking"] for t in r["traces"]] for r in rows[2])
    assert first != second
    assert [[t["thinking"] for t in r["traces"]] for r in rows[1]] == [first, second]
