"""Streamed text is the result's text: for every profile and however the model splits its text into
tokens, the deltas of each channel concatenate to ``Result.thinking`` / ``Result.answer``, and a
streamed generation gives the same result as the same generation not streamed. The hard cases are an
end delimiter written in ordinary tokens (SmolLM2 has no ``</think>`` token): split over several
tokens, left half-written, or sharing its last token with what follows (``>.``, ``>,``)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted_model import ScriptedLM

from t0s1 import BudgetForcing
from t0s1.forcing import generate_from_ids
from t0s1.forcing_rules import RenderedPrompt, render_prompt_ids
from t0s1.profiles import PROFILES, profile_by_name

# Every profile t0s1 knows, and a custom pair.
PROFILE_NAMES = [*PROFILES, "<reasoning>,</reasoning>"]

WORDS = ["Let", " me", " think", ".", ",", " so", " 2", " is", " right", " ", "\n", "\n\n", "Wait", " Wait",
         "<", "</", "think", ">", ">.", ">,", '>"', ">)", "answer", "<|im_", "start", "|>", " Final", " Answer", ":",
         "reason", "ing", "é", " 🙂", ".<", ")<", "?<", '"<', "></", " </"]
HALF_CHARACTERS = ["🙂", "😀"]  # each of their tokens alone is part of a UTF-8 character
AFTER_DELIMITER = ["", ".", ",", '"', ")", " so", "\n", "\n\n2", "</"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (the embedded model): ``</think>`` is three ordinary tokens there."""
    from transformers import AutoTokenizer

    from t0s1.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@st.composite
def scripts(draw, tokenizer, delimiter: str) -> list[int]:
    """Token ids a model may write: words (some ending with the start of a delimiter, ``.<``), stop
    ids, halves of UTF-8 characters, and the end delimiter (or its start, or its rest) cut into 1-4
    pieces at random places, each piece tokenised on its own, the last one sharing its tokens with
    what follows."""
    stops = sorted({tokenizer.eos_token_id, *tokenizer.all_special_ids})
    word = st.sampled_from(WORDS).map(lambda text: encode(tokenizer, text))
    stop = st.sampled_from(stops).map(lambda id_: [id_])
    half = st.sampled_from(sorted({id_ for text in HALF_CHARACTERS for id_ in encode(tokenizer, text)})).map(lambda id_: [id_])

    @st.composite
    def delimiter_pieces(draw):
        cut = draw(st.integers(1, len(delimiter) - 1))
        text = draw(st.sampled_from([delimiter, delimiter[:cut], delimiter[cut:]]))  # whole, its start, its rest
        text = draw(st.sampled_from(["", " ", "x"])) + text + draw(st.sampled_from(AFTER_DELIMITER))
        cuts = sorted(draw(st.sets(st.integers(1, len(text) - 1), max_size=3))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        return [id_ for piece in pieces for id_ in encode(tokenizer, piece)]

    parts = draw(st.lists(st.one_of(word, word, stop, half, delimiter_pieces(), delimiter_pieces()), max_size=14))
    return [id_ for part in parts for id_ in part]


budgets = st.builds(
    BudgetForcing,
    max_thinking_tokens=st.integers(0, 40),
    num_ignore=st.integers(0, 2),
    ignore_str=st.sampled_from(["Wait", "\nWait", " Hmm,"]),
    max_answer_tokens=st.integers(1, 10),
    end_phrase=st.sampled_from([None, "", "Time is up."]),
    answer_prefix=st.sampled_from([None, "", "Answer:"]),
)


def streamed_and_plain(lm, prompts, budgets_):
    """(results streamed, the deltas per (prompt, channel) in order, results not streamed)."""
    deltas: list[tuple[int, str, str]] = []
    streamed = generate_from_ids(lm, prompts, budgets_, on_delta=lambda i, channel, text: deltas.append((i, channel, text)))
    plain = generate_from_ids(lm, prompts, budgets_)
    return streamed, deltas, plain


def comparable(result) -> dict:
    data = result.to_dict(with_token_ids=True)
    data.pop("seconds")
    return data


def assert_stream_is_the_result(lm, prompts, budgets_):
    streamed, deltas, plain = streamed_and_plain(lm, prompts, budgets_)
    written_end = lm.rules.written_end
    for i, (result, alone) in enumerate(zip(streamed, plain, strict=True)):
        assert comparable(result) == comparable(alone), i
        mine = [(channel, text) for j, channel, text in deltas if j == i]
        assert all(text for _, text in mine)  # no empty deltas
        channels = [channel for channel, _ in mine]
        assert channels == sorted(channels, key=["thinking", "answer"].index)  # thinking, then answer
        assert "".join(text for channel, text in mine if channel == "thinking") == result.thinking
        assert "".join(text for channel, text in mine if channel == "answer") == result.answer
        if written_end:
            assert written_end not in result.thinking
    return streamed


@pytest.mark.parametrize("name", PROFILE_NAMES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_streamed_text_equals_the_result_for_any_token_split(tokenizer, name, data):
    profile = profile_by_name(name)
    lm = ScriptedLM(tokenizer, profile)
    prompts, budgets_ = [], []
    for question in data.draw(st.lists(st.sampled_from(["Hi", "What is 1+1?", "Count."]), min_size=1, max_size=2, unique=True)):
        on = data.draw(st.sampled_from([True, True, False]), label="thinking on")
        prompt = render_prompt_ids(tokenizer, profile, question, None if on else {"enable_thinking": False})
        if not on and prompt.thinking:  # a template without the switch: the answer right away
            prompt = RenderedPrompt(prompt.ids, thinking=False)
        setting = data.draw(budgets, label="budget")
        lm.write(prompt, setting, data.draw(scripts(tokenizer, profile.thinking_end), label="script"))
        prompts.append(prompt)
        budgets_.append(setting)
    assert_stream_is_the_result(lm, prompts, budgets_)


def think_lm(tokenizer, script_text: list[str], settings_: BudgetForcing, profile: str = "think"):
    lm = ScriptedLM(tokenizer, profile_by_name(profile))
    prompt = render_prompt_ids(tokenizer, lm.profile, "What is 1+1?")
    lm.write(prompt, settings_, [id_ for piece in script_text for id_ in encode(tokenizer, piece)])
    return lm, prompt


@pytest.mark.parametrize(
    "num_ignore, expected_thinking",
    [(0, "Let me think"), (1, "Let me thinkWait so 2 is right.")],
)
@pytest.mark.parametrize("after", [".", ",", '"', ")"])
def test_a_delimiter_sharing_its_last_token_is_never_streamed(tokenizer, num_ignore, expected_thinking, after):
    """SmolLM2 writes ``</think>`` as ``</`` ``think`` ``>.``: the end is found inside the last
    token; what precedes the delimiter is the thinking, the delimiter is never sent."""
    assert encode(tokenizer, ">" + after) == [encode(tokenizer, ">" + after)[0]]  # one token
    script = ["Let", " me", " think", "</", "think", ">" + after, " so", " 2", " is", " right", ".", "</think>", "\n\n", "2"]
    if not num_ignore:
        script = script[:6] + script[-2:]
    budget = BudgetForcing(max_thinking_tokens=40, num_ignore=num_ignore, max_answer_tokens=5)
    lm, prompt = think_lm(tokenizer, script, budget)
    [result] = assert_stream_is_the_result(lm, [prompt], [budget])
    assert (result.thinking, result.answer, result.num_ignored) == (expected_thinking, "2", num_ignore)


@pytest.mark.parametrize(
    "split, thinking",
    [
        (["</", "think", ">"], "Let me think"),
        (["<", "/", "t", "h", "i", "n", "k", ">"], "Let me think"),  # one character a token
        (["</th", "ink>\n\n2"], "Let me think"),  # sharing tokens with the answer
        ([".<", "/", "think", ">"], "Let me think."),  # text and the delimiter's start in one token
    ],
)
def test_a_delimiter_split_over_many_tokens_ends_the_thinking(tokenizer, split, thinking):
    budget = BudgetForcing(max_thinking_tokens=40, max_answer_tokens=5)
    script = ["Let", " me", " think", *split] + ([] if split[-1].endswith("2") else ["\n\n", "2"])
    lm, prompt = think_lm(tokenizer, script, budget)
    [result] = assert_stream_is_the_result(lm, [prompt], [budget])
    assert (result.thinking, result.answer, result.hit_budget) == (thinking, "2", False)


def test_the_server_streams_what_it_answers(tokenizer):
    """A streamed chat completion carries the reasoning and content of the same request not
    streamed: the written ``</think>`` (and the ``,`` / ``.`` sharing its last token) never."""
    import openai

    from t0s1.serving.server import create_app, serve_in_background

    budget = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=5)
    script = ["Let", " me", " think", "</", "think", ">,", " so", " 2", " is", " right", ".", "</", "think", ">.", "\n\n", "2"]
    lm, _ = think_lm(tokenizer, script, budget)
    messages = [{"role": "user", "content": "What is 1+1?"}]
    with serve_in_background(create_app(lm, budget, ui=False)) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(model="m", messages=messages).choices[0].message
        reasoning, content = [], []
        for chunk in client.chat.completions.create(model="m", messages=messages, stream=True):
            for choice in chunk.choices:
                reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
                content.append(choice.delta.content or "")
    assert (reply.reasoning_content, reply.content) == ("Let me thinkWait so 2 is right.", "2")
    assert ("".join(reasoning), "".join(content)) == (reply.reasoning_content, reply.content)


def test_lm_eval_until_gives_what_a_run_without_it_gives(tokenizer):
    """lm-eval's ``until`` watches the streamed answer; the thinking it reports is the same."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from t0s1.backends.engine import EngineBackend
    from t0s1.lm_eval import T0S1LM

    budget = BudgetForcing(max_thinking_tokens=40, max_answer_tokens=5)
    lm, _ = think_lm(tokenizer, ["Let", " me", " think", "</", "think", ">.", "\n\n", "2"], budget)
    model = T0S1LM(backend=EngineBackend(lm), max_thinking_tokens=40, max_answer_tokens=5, progress=False)
    texts = [
        model.generate_until([Instance("generate_until", {}, ("What is 1+1?", {"until": until}), 0, metadata=("demo", 0, 1))])
        for until in ([], ["no such text"])
    ]
    assert texts[0] == texts[1] == [lm.profile.assistant_content("Let me think", "2")]
