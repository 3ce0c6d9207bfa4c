"""The policies' decision rules, checked against the papers' own code where it is published
(DeepConf's ``deepconf.utils``) and on hand-computed values elsewhere; the parameters' errors."""

from __future__ import annotations

import importlib.util
import math
import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t0s1.errors import UserError
from t0s1.policies import POLICIES, DeepConf, make_policy, parse_policy_args
from t0s1.policies import rules


def _deepconf_utils():
    """``deepconf/utils.py`` loaded by path: the package's ``__init__`` imports vLLM."""
    spec = importlib.util.find_spec("deepconf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("deepconf is not installed (pip install deepconf): the test extras install it")
    path = f"{list(spec.submodule_search_locations)[0]}/utils.py"
    module_spec = importlib.util.spec_from_file_location("deepconf_utils_reference", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def deepconf_utils():
    return _deepconf_utils()


def _random_traces(seed: int, count: int = 12):
    rng = random.Random(seed)
    traces = []
    for _ in range(count):
        length = rng.choice([0, 1, 5, 40, 100, 300])
        steps = [sorted((-rng.expovariate(rng.uniform(0.3, 3)) for _ in range(20)), reverse=True) for _ in range(length)]
        answer = rng.choice(["12", "7", "3/4", None])
        traces.append((steps, answer))
    return traces


@pytest.mark.parametrize("seed", range(6))
def test_confidences_equal_deepconf(deepconf_utils, seed):
    for steps, _ in _random_traces(seed):
        reference_input = [{i: SimpleNamespace(logprob=lp) for i, lp in enumerate(step)} for step in steps]
        confs = [rules.token_confidence(step) for step in steps]
        assert confs == deepconf_utils.compute_confidence(reference_input)
        for window in (1, 8, 64, 2048):
            assert rules.group_confidences(confs, window) == pytest.approx(deepconf_utils.compute_least_grouped(confs, window))
            trace = {"confs": confs}
            assert rules.trace_confidence(confs, "tail", window=window) == pytest.approx(
                deepconf_utils.calculate_tail_confidence(trace, tail_tokens=window))
            assert rules.trace_confidence(confs, "bottom", window=window) == pytest.approx(
                deepconf_utils.calculate_bottom_window_confidence(trace, window_size=window, bottom_percent=0.1))
            assert rules.trace_confidence(confs, "lowest", window=window) == pytest.approx(
                deepconf_utils.calculate_bottom_window_confidence(trace, window_size=window, bottom_percent=-1))
        assert rules.trace_confidence(confs, "mean") == pytest.approx(deepconf_utils.calculate_mean_confidence({"confs": confs}))


@pytest.mark.parametrize("seed", range(6))
def test_votes_and_filter_equal_deepconf(deepconf_utils, seed):
    traces = _random_traces(seed, count=16)
    confs = [[rules.token_confidence(step) for step in steps] for steps, _ in traces]
    answers = [answer for _, answer in traces]
    scores = [rules.trace_confidence(c, "bottom", window=64) for c in confs]
    given_answers = [a for a in answers if a is not None]
    assert rules.majority_vote(answers) == deepconf_utils.simple_majority_vote(given_answers)
    assert rules.weighted_vote(answers, scores) == deepconf_utils.weighted_majority_vote(answers, scores)
    for keep in (10, 50, 90):
        kept = rules.keep_top(scores, keep)
        # deepconf's filter scores the traces itself (bottom 10% of 2,048-token windows):
        trace_dicts = [{"confs": c, "i": i} for i, c in enumerate(confs)]
        reference = deepconf_utils.filter_top_confidence(trace_dicts, confidence_type="bottom_window", top_percent=keep / 100)
        bottom_2048 = [rules.trace_confidence(c, "bottom", window=2048) for c in confs]
        assert [t["i"] for t in reference] == [i for i, k in enumerate(rules.keep_top(bottom_2048, keep)) if k]
        assert sum(kept) >= 1


@given(st.lists(st.floats(min_value=0, max_value=30, allow_nan=False), min_size=1, max_size=60), st.integers(1, 70))
@settings(max_examples=200, deadline=None)
def test_group_confidences_property(confs, window):
    reference = _deepconf_utils()
    assert rules.group_confidences(confs, window) == pytest.approx(reference.compute_least_grouped(confs, window), abs=1e-3)


def test_warmup_threshold_is_the_percentile_of_lowest_groups():
    lowest = [10.0, 12.0, 14.0, 16.0, 18.0]
    # keep 90%: the 10th percentile (numpy's linear interpolation): 10 + 0.4 * 2
    assert rules.warmup_threshold(lowest, 90) == pytest.approx(10.8)
    assert rules.warmup_threshold(lowest, 10) == pytest.approx(17.2)


def test_consensus_and_short_m_of_k():
    assert rules.consensus(["1", "1", "2", None]) == pytest.approx(2 / 3)
    assert rules.consensus([None, None]) == 0.0
    assert rules.consensus(["1", "2"], [3.0, 1.0]) == pytest.approx(0.75)
    # the three shortest are 7 (10), 5 (12), 7 (15): 7 wins; with m=2 a tie 7 / 5 goes to the shorter 7
    answers, lengths = ["5", "7", "9", "7", "5"], [12, 10, 40, 15, 50]
    assert rules.short_m_of_k_vote(answers, lengths, 3) == "7"
    assert rules.short_m_of_k_vote(answers, lengths, 1) == "7"
    assert rules.short_m_of_k_vote(["5", "7"], [9, 10], 2) == "5"
    assert rules.short_m_of_k_vote([None, None], [1, 2], 2) is None


def test_trial_confidence_follows_deer():
    probabilities = [0.2, 0.9, 0.99, 0.96]
    # the first token is skipped (it follows the forced answer prefix)
    assert rules.trial_confidence(probabilities, "mean") == pytest.approx((0.9 + 0.99 + 0.96) / 3)
    assert rules.trial_confidence(probabilities, "min") == pytest.approx(0.9)
    assert rules.trial_confidence(probabilities, "geometric") == pytest.approx(math.exp((math.log(0.9) + math.log(0.99) + math.log(0.96)) / 3))
    assert rules.trial_confidence([0.97]) == pytest.approx(0.97)
    assert rules.trial_confidence([]) == 0.0


def test_probes_agree_follows_dynasor():
    assert rules.probes_agree(["4", "4", "4"], ["4}", "4}", "4}"], 3)
    assert not rules.probes_agree(["4", "4"], ["4}", "4}"], 3)  # too few probes yet
    assert not rules.probes_agree(["4", "5", "4"], ["", "", ""], 3)
    assert not rules.probes_agree(["4", "", "4"], ["", "", ""], 3)  # an empty answer
    assert rules.probes_agree(["", "4", "4"], ["", "", ""], 2)  # only the last two count
    assert not rules.probes_agree(["4", "4", "4"], ["4}", "Wait, 4}", "4}"], 3)  # one hedges
    assert rules.probes_agree(["4", "4"], ["I know it is 4", "note: 4"], 2)  # whole words only


def test_make_policy_and_its_errors():
    policy = make_policy("deepconf", parse_policy_args(["mode=online", "warmup=4", "keep_percent=10", "window=64"]), n=16)
    assert isinstance(policy, DeepConf) and policy.mode == "online" and policy.warmup == 4 and policy.keep_percent == 10.0
    assert policy.label() == "deepconf[n=16,mode=online,window=64,keep_percent=10,warmup=4]"
    assert make_policy("budget").label() == "budget"
    assert set(POLICIES) == {"budget", "vote", "deepconf", "early-exit", "probe", "short-m-of-k"}
    with pytest.raises(UserError, match="unknown policy 'beam'"):
        make_policy("beam")
    with pytest.raises(UserError, match="no parameter 'windw'.*window"):
        make_policy("deepconf", {"windw": "5"})
    with pytest.raises(UserError, match="n must be a positive integer"):
        make_policy("vote", n=0)
    with pytest.raises(UserError, match="keep_percent must be a number in"):
        make_policy("deepconf", {"keep_percent": "120"})
    with pytest.raises(UserError, match="keep_percent must be a number in"):
        make_policy("deepconf", {"keep_percent": "-1"})
    for key in ("keep_percent", "bottom_percent", "consensus"):  # NaN fails every comparison: refused as such
        with pytest.raises(UserError, match=f"{key} must be a number in"):
            make_policy("deepconf", {key: "nan"})
    with pytest.raises(UserError, match="threshold must be a number in"):
        make_policy("early-exit", {"threshold": "nan"})
    with pytest.raises(UserError, match="top_k=101 is above 100"):
        make_policy("deepconf", {"top_k": "101"})
    with pytest.raises(UserError, match="wave must be a positive integer"):
        make_policy("deepconf", {"mode": "online", "warmup": "2", "wave": "0"}, n=4)
    # labels key results (and resumed evaluations): two values never share one
    assert make_policy("early-exit", {"threshold": "0.9999999"}).label() != make_policy("early-exit", {"threshold": "1"}).label()
    assert make_policy("early-exit", {"threshold": "0.9"}).label() == "early-exit[threshold=0.9]"
    with pytest.raises(UserError, match="window must be a int"):
        make_policy("deepconf", {"window": "big"})
    with pytest.raises(UserError, match=r"leaves no trace after the 16 warm-up .* \(e\.g\. n=32.* \(e\.g\. warmup=4\)"):
        make_policy("deepconf", {"mode": "online"}, n=16)
    with pytest.raises(UserError, match="runs one trace per prompt"):
        make_policy("early-exit", n=4)
    with pytest.raises(UserError, match="m=9 is larger"):
        make_policy("short-m-of-k", {"m": "9"})
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_policy_args(["window"])
