"""The vLLM reasoning parser's streamed split (``t0s1.vllm_plugin.split.StreamSplit``, no vLLM
needed): on random replies fed in random pieces, every delta equals what splitting the whole
reply so far gives (the rule ``split_reply`` states), and a long reply costs no more per delta."""

from __future__ import annotations

import random
import time

import pytest

from t0s1.profiles import S1, THINK
from t0s1.vllm_plugin.split import StreamSplit, split_reply, thinking_body


def hold_trailing(text: str, hold: str | None) -> str:
    """``text`` without its trailing whitespace and, with ``hold``, without an end that could be the
    beginning of ``hold``."""
    cut = len(text)
    if hold:
        for size in range(min(len(hold), cut), 0, -1):
            if text.endswith(hold[:size]):
                cut -= size
                break
    return text[:cut].rstrip()


def split_so_far(text: str, profile, thinking_open: bool) -> tuple[str, str]:
    """The parts of a reply so far that may be sent: the split of the whole text, with the
    reasoning's end held back while it may begin the end delimiter, and nothing while the reply may
    begin the thinking start, even where the prompt opened the thinking (the rule, computed from
    scratch)."""
    stripped = text.lstrip()
    if profile.thinking_start.startswith(stripped):  # nothing yet, or maybe the start of the thinking
        return "", ""
    body = thinking_body(text, profile, thinking_open)
    if body is None:
        return "", stripped.rstrip()
    reasoning, found, content = body.partition(profile.thinking_end)
    if not found:
        return hold_trailing(reasoning.lstrip(), profile.thinking_end), ""
    return reasoning.strip(), content.lstrip()


def random_reply(rng: random.Random, profile) -> str:
    start, end = profile.thinking_start, profile.thinking_end
    pieces = [" ", "\n", "\n\n", "  \t", "Wait", "x", "2 + 2 = 4", "<", "<|", "<|im", "</th", start, end,
              start[: rng.randrange(1, len(start))], end[: rng.randrange(1, len(end))], "Final Answer: 4"]
    opening = rng.choice(["", "", " ", "\n", start, start, " " + start, start[:3]])
    return opening + "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 14)))


@pytest.mark.parametrize("profile", [S1, THINK], ids=["s1", "think"])
@pytest.mark.parametrize("thinking_open", [False, True], ids=["closed", "open"])
def test_every_streamed_delta_equals_the_split_of_the_reply_so_far(profile, thinking_open):
    rng = random.Random(f"{profile.name}-{thinking_open}")
    for _ in range(3000):
        reply = random_reply(rng, profile)
        stream, sent, text = StreamSplit(profile, thinking_open=thinking_open), ["", ""], ""
        while len(text) < len(reply):
            text = reply[: len(text) + rng.randrange(1, 6)]
            reasoning, content = stream.feed(text)
            expected = split_so_far(text, profile, thinking_open)
            for i, (piece, target) in enumerate(zip((reasoning, content), expected, strict=True)):
                new = target[len(sent[i]):] if target.startswith(sent[i]) else ""
                assert piece == new, (reply, text, i)
                sent[i] += piece
            assert stream.ended == bool(expected[1] and profile.thinking_end in (thinking_body(text, profile, thinking_open) or ""))
        # nothing sent is taken back: the pieces add up to the split of the whole reply (which is
        # split_reply's, stripped, unless the reply ends in what may begin a delimiter)
        assert tuple(sent) == split_so_far(reply, profile, thinking_open), reply
        whole = split_reply(reply, profile, thinking_open=thinking_open)
        if stream.ended:
            assert (sent[0] or None, sent[1].strip() or None) == whole, reply

def test_a_long_reply_costs_no_more_per_delta_than_a_short_one():
    """The split looks at each delta, not the whole reply: 80,000 deltas take about 9x the time of
    10,000 (re-splitting the whole reply each time, as the parser did, took about 60x)."""

    def stream_seconds(tokens: int) -> float:
        stream, text = StreamSplit(S1, thinking_open=False), "<|im_start|>think\n"
        started = time.perf_counter()
        for i in range(tokens):
            text += " step" if i % 7 else "\n"
            stream.feed(text)
        return time.perf_counter() - started

    short, long = min(stream_seconds(10_000) for _ in range(3)), min(stream_seconds(80_000) for _ in range(3))
    assert long < 24 * short, (short, long)
