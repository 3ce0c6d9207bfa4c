"""Model profiles on the real chat templates of the families people use (tests/fixtures/chat_templates):
detection, the rendered prompt, the ids injected at a forced end and at a Wait, the split into
thinking and answer, thinking switched off, delimiters made of ordinary tokens, and the server."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from forcing_reference import reference_generate
from model_families import build_family_model_dir
from typer.testing import CliRunner

from t0s1 import BudgetForcing, UserError, generate, generate_sweep, load_model
from t0s1.cli import app
from t0s1.forcing import render_prompt
from t0s1.profiles import QWEN_END_PHRASE, S1, THINK, THINK_HYBRID, THINK_PREFILLED, detect_profile, profile_by_name
from t0s1.serving.server import create_app, serve_in_background

QUESTION = "What is 12 + 35 * 2?"


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    built = {}

    def build(family: str, **kwargs) -> str:
        key = (family, tuple(sorted(kwargs.get("drop_tokens", ()))))
        if key not in built:
            built[key] = str(build_family_model_dir(family, tmp_path_factory.mktemp(family), **kwargs))
        return built[key]

    return build


@pytest.fixture(scope="module")
def family(family_dir):
    loaded = {}

    def load(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.get("drop_tokens", ()))))
        if key not in loaded:
            loaded[key] = load_model(family_dir(name, **kwargs), device="cpu")
        return loaded[key]

    return load


def tokens(lm, ids) -> list[str]:
    return lm.tokenizer.convert_ids_to_tokens(list(ids))


def recorded_run(lm, monkeypatch, prompts, settings, **kwargs):
    """Generate, recording every id fed to the model per prompt: (results, fed ids per prompt)."""
    runner = lm.new_runner()
    fed: dict[int, list[int]] = {}
    add, step, rollback = runner.add, runner.step, runner.rollback

    def recording_add(prompt_ids):
        slots, logits = add(prompt_ids)
        for slot, ids in zip(slots, prompt_ids, strict=True):
            fed[slot] = list(ids)
        return slots, logits

    def recording_step(slots, feeds):
        for slot, token in zip(slots, feeds, strict=True):
            fed[slot].append(token)
        return step(slots, feeds)

    def recording_rollback(slot, count):
        del fed[slot][-count:]
        rollback(slot, count)

    runner.add, runner.step, runner.rollback = recording_add, recording_step, recording_rollback
    monkeypatch.setattr(lm, "new_runner", lambda **sizes: runner)
    results = generate(lm, prompts, settings, **kwargs)
    monkeypatch.undo()
    return results, [fed[slot] for slot in sorted(fed)]


# ---- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, profile, why",
    [
        ("qwen2.5-instruct", S1, "ChatML"),
        ("smollm2", S1, "ChatML"),
        ("qwen3", THINK_HYBRID, "enable_thinking"),
        ("qwen3-thinking-2507", THINK_PREFILLED, "generation prompt ends with '<think>'"),
        ("qwq", THINK_PREFILLED, "generation prompt ends with '<think>'"),
        ("deepseek-r1-distill-qwen", THINK_PREFILLED, "generation prompt ends with '<think>'"),
    ],
)
def test_profile_is_detected_from_the_chat_template(family, name, profile, why):
    lm = family(name)
    assert lm.profile == profile
    assert why in lm.detection.explain()


def test_gpt_oss_is_refused_with_exit_code_2(family_dir):
    with pytest.raises(UserError, match="harmony"):
        load_model(family_dir("gpt-oss"), device="cpu")
    result = CliRunner().invoke(app, ["generate", "Hi", "--model", family_dir("gpt-oss")])
    assert result.exit_code == 2 and "harmony" in result.output


def test_explain_format_prints_the_profile_and_why(family_dir):
    result = CliRunner().invoke(app, ["generate", "--model", family_dir("qwq"), "--explain-format"])
    assert result.exit_code == 0, result.output
    assert "reasoning profile: think-prefilled" in result.stdout
    assert "generation prompt opens the thinking: yes" in result.stdout
    overridden = CliRunner().invoke(app, ["generate", "--model", family_dir("qwq"), "--explain-format", "--reasoning-format", "s1"])
    assert "reasoning profile: s1" in overridden.stdout and "given explicitly" in overridden.stdout


def test_a_trained_model_records_its_profile(family_dir, tmp_path):
    from transformers import AutoTokenizer

    from t0s1.profiles import record_profile

    tokenizer = AutoTokenizer.from_pretrained(family_dir("qwen2.5-instruct"))
    assert detect_profile(tokenizer).profile == S1
    record_profile(tokenizer, THINK)
    tokenizer.save_pretrained(tmp_path)
    reloaded = detect_profile(AutoTokenizer.from_pretrained(tmp_path))
    assert reloaded.profile == THINK and "recorded by t0s1 train" in reloaded.reasons[0]


# ---- the rendered prompt and the injected ids ----------------------------------------------------

# The end of each family's rendered prompt for QUESTION, as written by its real template + the
# thinking start budget forcing appends (none where the template opened the thinking).
PROMPT_ENDS = {
    "qwen2.5-instruct": "<|im_end|>\n<|im_start|>assistant\n<|im_start|>think",
    "smollm2": "<|im_end|>\n<|im_start|>assistant\n<|im_start|>think",
    "qwen3": "<|im_end|>\n<|im_start|>assistant\n<think>",
    "qwen3-thinking-2507": "<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "qwq": "<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "deepseek-r1-distill-qwen": "<｜User｜>What is 12 + 35 * 2?<｜Assistant｜><think>\n",
}

# What budget forcing feeds after the thinking when the budget is spent (thinking that does not
# end with a newline), token by token, and the ignore string: s1 writes "\n<|im_start|>answer\nFinal
# Answer:", the <think> families "\n</think>\n\n".
# (The ids are those of each tiny test tokenizer: the same strings, split by its own small BPE.)
THINK_END = ["Ċ", "</think>", "Ċ", "Ċ"]
FORCED_END_TOKENS = {
    "qwen2.5-instruct": ["Ċ", "<|im_start|>", "a", "nswer", "Ċ", "F", "inal", "ĠAnswer", ":"],
    "smollm2": ["Ċ", "<|im_start|>", "a", "nswer", "Ċ", "F", "inal", "ĠA", "nswer", ":"],
    "qwen3": THINK_END,
    "qwen3-thinking-2507": THINK_END,
    "qwq": THINK_END,
    "deepseek-r1-distill-qwen": THINK_END,
}
WAIT_TOKENS = ["Wa", "it"]


@pytest.mark.parametrize("name", list(PROMPT_ENDS))
def test_rendered_prompt_forced_end_and_wait_per_family(family, monkeypatch, name):
    lm = family(name)
    prompt = render_prompt(lm, QUESTION)
    text = lm.tokenizer.decode(prompt.ids, skip_special_tokens=False)
    assert text.endswith(PROMPT_ENDS[name])
    assert text.count(lm.profile.thinking_start) == 1  # never a second start
    kind = "s1" if lm.profile == S1 else "think"

    [forced], [fed] = recorded_run(lm, monkeypatch, [QUESTION], BudgetForcing(max_thinking_tokens=6, max_answer_tokens=4))
    assert forced.hit_budget and forced.thinking_tokens == 6
    expected = FORCED_END_TOKENS[name]
    close = tokens(lm, fed[len(prompt.ids) + 6 :])
    if lm.tokenizer.decode(forced.thinking_token_ids[-1:]).endswith("\n"):
        close = ["Ċ", *close]  # no second newline after thinking that ends with one
    assert close[: len(expected)] == expected
    # The answer starts after the delimiter: s1's "Final Answer:" is part of it, "\n\n" is not text.
    assert forced.answer.startswith("Final Answer:") == (kind == "s1")
    assert lm.profile.thinking_end not in forced.thinking

    waited, fed = recorded_run(lm, monkeypatch, [QUESTION, "Hi"], BudgetForcing(max_thinking_tokens=300, num_ignore=1, max_answer_tokens=4))
    for result, ids in zip(waited, fed, strict=True):
        start = len(render_prompt(lm, QUESTION if result is waited[0] else "Hi").ids)
        thinking = ids[start : start + result.thinking_tokens]
        assert thinking == result.thinking_token_ids  # the thinking is what was fed, delimiters apart
        if result.num_ignored:
            assert tokens(lm, thinking).count(WAIT_TOKENS[1]) >= 1 and "Wait" in result.thinking
        assert lm.profile.thinking_end not in result.thinking  # the stop it replaced is gone
    assert any(r.num_ignored == 1 for r in waited), "want a natural stop that is ignored"


@pytest.mark.parametrize("name", ["qwen3", "qwq", "deepseek-r1-distill-qwen", "qwen2.5-instruct"])
@pytest.mark.parametrize("budget, num_ignore", [(8, 0), (300, 2)])
def test_engine_equals_the_slow_reference_per_family(family, name, budget, num_ignore):
    lm = family(name)
    settings = BudgetForcing(max_thinking_tokens=budget, num_ignore=num_ignore, max_answer_tokens=10)
    prompts = [QUESTION, "Hi", "Wait, let me count."]
    for prompt, result in zip(prompts, generate(lm, prompts, settings), strict=True):
        expected = reference_generate(lm, prompt, settings)
        assert result.thinking_token_ids == expected.thinking_token_ids, prompt
        if result.answer_token_ids != expected.answer_token_ids:
            _assert_diverged_at_a_tie(lm, prompt, result, expected)
            continue
        assert (result.num_ignored, result.hit_budget) == (expected.num_ignored, expected.hit_budget)


def _assert_diverged_at_a_tie(lm, prompt, result, expected, tolerance=1e-3):
    """A batched run may part from the one-sequence reference only where the random test model's
    two best logits tie within float error (batch shapes change the last bits): the answers agree up
    to a step whose two best tokens are the two written and lie within ``tolerance``."""
    ours, theirs = result.answer_token_ids, expected.answer_token_ids
    step = next(i for i, (a, b) in enumerate(zip(ours + [None], theirs + [None])) if a != b)
    ids = render_prompt(lm, prompt).ids + result.thinking_token_ids + lm.rules.end_delimiter + ours[:step]
    assert not result.hit_budget, f"{prompt}: the answers differ after a forced end"
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, -1].float()
    top = logits.topk(2)
    assert set(top.indices.tolist()) == {ours[step], theirs[step]}, f"{prompt}: answers differ at {step}, not at a tie"
    assert float(top.values[0] - top.values[1]) < tolerance, f"{prompt}: answers differ at {step}, margin {top.values.tolist()}"


def test_split_of_whole_turns_per_profile():
    assert THINK.split("<think>\nhmm\n</think>\n\n42") == ("hmm", "42")
    assert THINK_PREFILLED.split("hmm, 6 * 7\n</think>\n\n42") == ("hmm, 6 * 7", "42")  # the start was in the prompt
    assert S1.split("<|im_start|>think\nhmm\n<|im_start|>answer\nAnswer: 42") == ("hmm", "Answer: 42")
    assert THINK.split("just 42") == ("", "just 42")


def test_configurable_forced_end(family, monkeypatch):
    lm = family("qwen3")
    settings = BudgetForcing(max_thinking_tokens=5, max_answer_tokens=3, end_phrase="qwen", answer_prefix="The answer:")
    assert settings.end_phrase == QWEN_END_PHRASE
    [result], [fed] = recorded_run(lm, monkeypatch, [QUESTION], settings)
    start = len(render_prompt(lm, QUESTION).ids) + 5
    written = lm.tokenizer.decode(fed[start:], skip_special_tokens=False)
    assert QWEN_END_PHRASE + "\n</think>\n\nThe answer:" in written
    assert result.answer.startswith("The answer:") and QWEN_END_PHRASE not in result.thinking
    expected = reference_generate(lm, QUESTION, settings)
    assert result.answer_token_ids == expected.answer_token_ids
    s1 = BudgetForcing(max_thinking_tokens=5, max_answer_tokens=3)
    assert S1.forced_end("abc") == "\n<|im_start|>answer\nFinal Answer:"  # s1's default stays
    assert S1.forced_end("abc", answer_prefix="") == "\n<|im_start|>answer\n"
    assert s1.answer_prefix is None


def test_prefilled_template_with_zero_budget_closes_without_a_second_start(family, monkeypatch):
    lm = family("deepseek-r1-distill-qwen")
    [result], [fed] = recorded_run(lm, monkeypatch, [QUESTION], BudgetForcing(max_thinking_tokens=0, max_answer_tokens=3))
    written = lm.tokenizer.decode(fed, skip_special_tokens=False)
    assert written.count("<think>") == 1
    assert "<｜Assistant｜><think>\n</think>\n\n" in written
    assert result.hit_budget and result.thinking == "" and result.prompt_tokens == len(render_prompt(lm, QUESTION).ids)


# ---- thinking switched off ----------------------------------------------------------------------


def test_enable_thinking_false_gives_no_thinking_and_no_delimiters(family, family_dir, monkeypatch):
    lm = family("qwen3")
    off = {"enable_thinking": False}
    prompt = render_prompt(lm, QUESTION, off)
    assert not prompt.thinking
    assert lm.tokenizer.decode(prompt.ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    [result], [fed] = recorded_run(lm, monkeypatch, [QUESTION], BudgetForcing(max_thinking_tokens=50, num_ignore=2, max_answer_tokens=6),
                                   chat_template_kwargs=off)
    assert (result.thinking, result.thinking_tokens, result.num_ignored, result.hit_budget) == ("", 0, 0, False)
    assert fed == prompt.ids + result.answer_token_ids[: len(fed) - len(prompt.ids)]  # nothing injected
    assert result.answer_token_ids == reference_generate(lm, QUESTION, BudgetForcing(max_answer_tokens=6), off).answer_token_ids

    # The command line: --no-thinking (or --chat-template-kwargs) does the same.
    for flags in (["--no-thinking"], ["--chat-template-kwargs", json.dumps(off)]):
        cli = CliRunner().invoke(app, ["generate", QUESTION, "--model", family_dir("qwen3"), "--json", "--max-answer-tokens", "6", *flags])
        assert cli.exit_code == 0, cli.output
        data = json.loads(cli.stdout)
        assert data["thinking_tokens"] == 0 and data["thinking"] == "" and data["answer"] == result.answer
    # A prefilled template that cannot switch thinking off gets its thinking closed at once.
    qwq = family("qwq")
    closed = render_prompt(qwq, QUESTION, off)
    assert not closed.thinking and qwq.tokenizer.decode(closed.ids).endswith("<think>\n</think>\n\n")


@pytest.mark.parametrize("name", list(PROMPT_ENDS))
def test_server_separates_reasoning_per_family(family, name):
    lm = family(name)
    defaults = BudgetForcing(max_thinking_tokens=40, num_ignore=1, max_answer_tokens=6)
    messages = [{"role": "user", "content": QUESTION}]
    with serve_in_background(create_app(lm, defaults, ui=False)) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(model="m", messages=messages)
    [expected] = generate(lm, [QUESTION], defaults)
    message = reply.choices[0].message
    assert message.reasoning_content == expected.thinking and message.content == expected.answer
    assert lm.profile.thinking_end not in message.reasoning_content + message.content
    assert reply.usage.completion_tokens_details.reasoning_tokens == expected.thinking_tokens > 0


def test_server_honours_enable_thinking_and_earlier_reasoning(family):
    lm = family("qwen3")
    defaults = BudgetForcing(max_thinking_tokens=40, max_answer_tokens=6)
    messages = [{"role": "user", "content": QUESTION}]
    with serve_in_background(create_app(lm, defaults)) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
        off = client.chat.completions.create(model="m", messages=messages, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert off.usage.completion_tokens_details.reasoning_tokens == 0
        assert off.choices[0].message.reasoning_content == ""
        # Earlier reasoning in the history is accepted (reasoning_content or reasoning) and the template decides.
        history = [*messages, {"role": "assistant", "content": "82", "reasoning": "35 * 2 = 70"}, {"role": "user", "content": "And 3+3?"}]
        again = client.chat.completions.create(model="m", messages=history)
        [alone] = generate(lm, [[*messages, {"role": "assistant", "content": "82", "reasoning_content": "35 * 2 = 70"},
                                 {"role": "user", "content": "And 3+3?"}]], defaults)
        assert again.choices[0].message.content == alone.answer


def test_history_renders_as_the_family_template_does(family):
    lm = family("qwen3")
    history = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    text = lm.tokenizer.decode(render_prompt(lm, history).ids)
    assert "2+2=4" not in text  # Qwen3 drops the reasoning of turns before the last question
    assert "<|im_start|>assistant\n4<|im_end|>" in text
    with_reasoning_key = [{**history[0]}, {"role": "assistant", "content": "4", "reasoning": "2+2=4"}, history[2]]
    assert render_prompt(lm, with_reasoning_key).ids == render_prompt(lm, history).ids


# ---- a delimiter made of ordinary tokens ----------------------------------------------------------


@pytest.mark.parametrize("num_ignore", [0, 1, 2])
def test_written_end_delimiter_is_cut_ignored_and_never_streamed(family, num_ignore):
    lm = family("qwen3", drop_tokens={"</think>"})
    assert len(lm.tokenizer("</think>", add_special_tokens=False).input_ids) > 1
    assert lm.rules.written_end == "</think>"
    settings = BudgetForcing(max_thinking_tokens=150, num_ignore=num_ignore, max_answer_tokens=8)
    prompts = [QUESTION, "Hi", "Wait, let me count.", "How many r are in raspberry?"]
    streamed: dict[tuple[int, str], str] = {}

    def on_delta(index, channel, text):
        streamed[(index, channel)] = streamed.get((index, channel), "") + text

    results = generate(lm, prompts, settings, on_delta=on_delta)
    ended_by_writing = 0
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        assert "</think>" not in result.thinking and not result.thinking.endswith(("</", "</think"))
        assert streamed.get((i, "thinking"), "") == result.thinking
        assert streamed.get((i, "answer"), "") == result.answer
        expected = reference_generate(lm, prompt, settings)
        assert result.thinking_token_ids == expected.thinking_token_ids, prompt
        assert result.answer_token_ids == expected.answer_token_ids, prompt
        assert (result.num_ignored, result.hit_budget) == (expected.num_ignored, expected.hit_budget)
        ended_by_writing += not result.hit_budget
    assert ended_by_writing, "want thinking that the model ended by writing </think>"
    if num_ignore:
        assert any(r.num_ignored for r in results), "want a written end that is ignored"


def test_sweep_over_a_written_delimiter_equals_separate_runs(family):
    lm = family("qwen3", drop_tokens={"</think>"})
    settings = [BudgetForcing(max_thinking_tokens=b, num_ignore=k, max_answer_tokens=6) for b in (0, 10, 150) for k in (0, 2)]
    prompts = [QUESTION, "Hi"]
    swept = generate_sweep(lm, prompts, settings)
    for j, setting in enumerate(settings):
        for i, result in enumerate(generate(lm, prompts, setting)):
            assert swept[i][j].thinking_token_ids == result.thinking_token_ids
            assert swept[i][j].answer_token_ids == result.answer_token_ids


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reasoning-format", "nonsense"], "Unknown reasoning format"),
        (["--reasoning-format", "<r>,"], "both sides non-empty"),
        (["--chat-template-kwargs", "{oops"], "not valid JSON"),
        (["--chat-template-kwargs", "[1]"], "must be a JSON object"),
        (["--no-thinking", "--chat-template-kwargs", '{"enable_thinking": true}'], "disagree"),
    ],
)
def test_bad_profile_input_exits_2(family_dir, flags, message):
    result = CliRunner().invoke(app, ["generate", "Hi", "--model", family_dir("qwen3"), *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_template_that_cannot_render_exits_2_naming_it(family_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(family_dir("qwen3"), broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('Only user messages are supported') }}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja",):
        (broken / name).unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["generate", "Hi", "--model", str(broken), "--reasoning-format", "think"])
    assert result.exit_code == 2, result.output
    assert "chat template could not render" in result.output and "Only user messages are supported" in result.output


def test_profile_names_and_custom_pairs():
    assert profile_by_name("chatml") == S1 and profile_by_name("think-tags") == THINK  # round-1 names
    custom = profile_by_name("<reasoning>,</reasoning>")
    assert (custom.thinking_start, custom.thinking_end) == ("<reasoning>", "</reasoning>")
    assert custom.split("<reasoning>\nhmm\n</reasoning>\n42") == ("hmm", "42")
    with pytest.raises(UserError, match="both sides non-empty"):
        profile_by_name(" ,</r>")
