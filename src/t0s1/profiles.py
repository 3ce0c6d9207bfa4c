"""Model profiles: how a model family writes its reasoning. The one definition of the delimiters.

A profile says how the thinking starts and ends, how budget forcing writes a forced end, whether
the chat template's generation prompt already opens the thinking, and how thinking is switched
off. prepare (training data), train (the saved template and the recorded profile), generate
(budget forcing), eval, serve and chat all read it from here.

| profile          | families                                         | thinking                                   |
| ---------------- | ------------------------------------------------ | ------------------------------------------ |
| `s1`             | s1, s1.1, t0-s1, any ChatML model t0s1 trains     | `<|im_start|>think` ... `<|im_start|>answer` |
| `think`          | DeepSeek-R1 (older templates), Gemma as t0 did, models without ChatML | `<think>` ... `</think>` |
| `think-hybrid`   | Qwen3 (`enable_thinking`)                         | `<think>` ... `</think>`, can be switched off |
| `think-prefilled`| QwQ, Qwen3-Thinking-2507, updated R1 distills     | the generation prompt ends with `<think>\\n` |

``detect_profile(tokenizer)`` picks one from the chat template and the special tokens and says why
(``t0s1 generate --explain-format`` prints it). A model written by ``t0s1 train`` records its
profile in ``tokenizer_config.json`` (``reasoning_profile``), so detection is exact for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from t0s1.errors import UserError

PROFILE_KEY = "reasoning_profile"
"""The ``tokenizer_config.json`` key in which ``t0s1 train`` records a model's profile."""

ANSWER_PREFIX = "Answer: "
"""What s1 puts before a training answer that does not already contain "Answer:"."""

THINKING_SWITCH = "enable_thinking"
"""The chat template variable that hybrid templates (Qwen3) read to switch thinking on or off."""


@dataclass(frozen=True)
class ModelProfile:
    """How one model family writes its reasoning.

    The assistant turn is ``thinking_start + "\\n" + thinking + "\\n" + thinking_end + after_end + answer``.

    thinking_start, thinking_end: the delimiters around the thinking.
    after_end: what follows ``thinking_end`` before the answer ("\\n" for s1, "\\n\\n" for ``<think>``).
    answer_prefix: written after a *forced* end (s1: "Final Answer:"); a setting can override it.
    end_phrase: written before ``thinking_end`` at a forced end (e.g. Qwen's "Considering the limited
        time by the user, ..."); a setting can override it.
    prefilled: the chat template's generation prompt already opens the thinking, so the engine never
        writes a second start and the model's output holds only the end of the thinking.
    thinking_switch: the chat template variable that turns thinking off (``enable_thinking``), if any.
    """

    name: str
    thinking_start: str
    thinking_end: str
    after_end: str = "\n"
    answer_prefix: str = ""
    end_phrase: str = ""
    prefilled: bool = False
    thinking_switch: str | None = None

    def assistant_content(self, thinking: str, answer: str, *, with_start: bool = True) -> str:
        """The assistant message as it is trained on (thinking stripped, answer verbatim).
        ``with_start=False`` when the prompt already ends with the thinking start (prefilled)."""
        start = f"{self.thinking_start}\n" if with_start else ""
        return f"{start}{thinking.strip()}\n{self.thinking_end}{self.after_end}{answer}"

    def forced_end(self, thinking_so_far: str, *, end_phrase: str | None = None, answer_prefix: str | None = None) -> str:
        """What budget forcing appends when the budget is spent: a newline unless the thinking
        already ends with one, the end phrase (if any) on its own line, the end delimiter and the
        answer prefix. ``None`` takes the profile's default; "" writes none."""
        phrase = self.end_phrase if end_phrase is None else end_phrase
        prefix = self.answer_prefix if answer_prefix is None else answer_prefix
        newline = "" if thinking_so_far.endswith("\n") or not thinking_so_far and self.prefilled else "\n"
        if phrase:
            phrase = f"{phrase}\n"
        return f"{newline}{phrase}{self.thinking_end}{self.after_end}{prefix}"

    def split(self, assistant_text: str) -> tuple[str, str]:
        """Split a whole assistant turn into (thinking, answer). Text with no delimiter at all is
        all answer; with only the end delimiter (a prefilled start) the thinking is what precedes it."""
        text = assistant_text
        if self.thinking_start in text:
            text = text.split(self.thinking_start, 1)[1]
        elif self.thinking_end not in text:
            return "", assistant_text.strip()
        thinking, _, answer = text.partition(self.thinking_end)
        return thinking.strip(), answer.strip()


S1 = ModelProfile("s1", "<|im_start|>think", "<|im_start|>answer", after_end="\n", answer_prefix="Final Answer:")
THINK = ModelProfile("think", "<think>", "</think>", after_end="\n\n")
THINK_HYBRID = replace(THINK, name="think-hybrid", thinking_switch=THINKING_SWITCH)
THINK_PREFILLED = replace(THINK, name="think-prefilled", prefilled=True)

PROFILES = {profile.name: profile for profile in (S1, THINK, THINK_HYBRID, THINK_PREFILLED)}
ALIASES = {"chatml": "s1", "think-tags": "think"}
"""Names of round 1 (``--reasoning-format chatml`` / ``think-tags``), still accepted."""

QWEN_END_PHRASE = (
    "Considering the limited time by the user, I have to give the solution based on the thinking directly now."
)
"""Qwen's recommended end phrase for a forced end of thinking (``--end-phrase qwen``)."""
END_PHRASES = {"qwen": QWEN_END_PHRASE}


@dataclass(frozen=True)
class Detection:
    """A profile and why it was chosen (``t0s1 generate --explain-format``)."""

    profile: ModelProfile
    reasons: tuple[str, ...]

    def explain(self) -> str:
        p = self.profile
        lines = [
            f"reasoning profile: {p.name}",
            f"  thinking: {p.thinking_start!r} ... {p.thinking_end!r}",
            f"  forced end: {p.forced_end('x')!r} (after the thinking)",
            f"  generation prompt opens the thinking: {'yes' if p.prefilled else 'no'}",
            f"  thinking switch: {p.thinking_switch or 'none'}",
            "why:",
            *(f"  - {reason}" for reason in self.reasons),
        ]
        return "\n".join(lines)


def resolve_end_phrase(value: str | None) -> str | None:
    """A named end phrase (``qwen``) or the text itself; None keeps the profile's."""
    if value is None:
        return None
    return END_PHRASES.get(value.strip().lower(), value)


def profile_by_name(name: str | ModelProfile) -> ModelProfile:
    """A profile from a name (``s1``, ``think``, ...) or a custom pair written ``"START,END"``."""
    if isinstance(name, ModelProfile):
        return name
    key = ALIASES.get(name.strip(), name.strip())
    if key in PROFILES:
        return PROFILES[key]
    start, sep, end = name.partition(",")
    if not sep or not start.strip() or not end.strip():
        raise UserError(
            f"Unknown reasoning format {name!r}: use one of {', '.join(PROFILES)} "
            "or a custom pair written 'START,END' with both sides non-empty (e.g. '<reasoning>,</reasoning>')."
        )
    return ModelProfile("custom", start.strip(), end.strip())


def detect_profile(tokenizer, override: str | ModelProfile | None = None) -> Detection:
    """The profile of the model whose tokenizer this is, and why.

    In order: an explicit override; the profile ``t0s1 train`` recorded; a harmony template
    (gpt-oss, not supported); a generation prompt that ends with ``<think>`` (prefilled); a
    template that writes ``<think>`` (hybrid when it reads ``enable_thinking``) or a vocabulary
    with a ``</think>`` token; ChatML (the s1 format, what ``t0s1 train`` teaches); else ``<think>``.
    """
    if override:
        profile = profile_by_name(override)
        return Detection(profile, (f"given explicitly ({override if isinstance(override, str) else profile.name!r})",))
    recorded = _recorded_profile(tokenizer)
    if recorded:
        return Detection(profile_by_name(recorded), (f"recorded by t0s1 train in tokenizer_config.json ({PROFILE_KEY}: {recorded!r})",))
    template = chat_template_text(tokenizer)
    vocab = tokenizer.get_vocab()
    if "<|channel|>" in template or "<|channel|>" in vocab:
        raise UserError(
            "This model uses the harmony format (gpt-oss: reasoning in an 'analysis' channel), which t0s1's "
            "budget forcing does not support. Use a model with <think> or s1 delimiters, or give "
            "--reasoning-format explicitly if you know the model thinks between two delimiters."
        )
    if template:
        prompt = _generation_prompt(tokenizer)
        if prompt is not None and re.search(r"<think>\s*$", prompt):
            return Detection(THINK_PREFILLED, ("the chat template's generation prompt ends with '<think>': the thinking is already open",))
    writes_think = "<think>" in template or "</think>" in template
    if writes_think and THINKING_SWITCH in template:
        return Detection(THINK_HYBRID, (f"the chat template writes <think> and reads '{THINKING_SWITCH}' (a hybrid, Qwen3-style template)",))
    if writes_think:
        return Detection(THINK, ("the chat template writes <think> / </think>",))
    if "</think>" in vocab and _is_added_token(tokenizer, "</think>"):
        return Detection(THINK, ("the vocabulary has a </think> token (its template does not mention it)",))
    if "<|im_start|>" in template:
        return Detection(S1, ("the chat template is ChatML (<|im_start|>) and writes no <think>: the s1 format",))
    if not template and "<|im_start|>" in vocab:
        return Detection(S1, ("no chat template, but the vocabulary has <|im_start|>: the s1 format",))
    return Detection(THINK, ("no ChatML and no <think> in the template: <think> / </think> as ordinary text (as t0 did for Gemma)",))


def chat_template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()), "")
    return template


def _recorded_profile(tokenizer) -> str | None:
    value = getattr(tokenizer, "init_kwargs", {}).get(PROFILE_KEY)
    return value if isinstance(value, str) and value else None


def profile_spec(profile: ModelProfile) -> str:
    """What ``profile_by_name`` reads back as ``profile``: its name, or a custom pair's "START,END"."""
    return f"{profile.thinking_start},{profile.thinking_end}" if profile.name == "custom" else profile.name


def record_profile(tokenizer, profile: ModelProfile) -> None:
    """Make ``tokenizer.save_pretrained`` write the profile (``t0s1 train`` does this)."""
    tokenizer.init_kwargs[PROFILE_KEY] = profile_spec(profile)


def _generation_prompt(tokenizer) -> str | None:
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot render a plain user turn: decide from its text
        return None


def _is_added_token(tokenizer, token: str) -> bool:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return any(str(added) == token for added in decoder.values())
