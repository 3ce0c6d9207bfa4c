"""The s1 decisions of budget forcing, on token ids, for every engine and backend.

When to inject the ignore string, when to force the end of thinking, what to append (per model
profile), how a conversation becomes prompt ids, and how text is streamed: this module decides,
without tensors. The transformers engine (``t0s1.forcing``) and the llama.cpp backend drive a
``Sequence`` one sampled token at a time; the client-side backends (vLLM, OpenAI-compatible
servers) feed it the tokens of each continuation they get back. The rules (docs/budget-forcing.md):

1. The prompt is the chat template with the generation prompt, then the thinking start (unless the
   template already opened the thinking, or closed it: thinking off).
2. Think. When the model ends its thinking (a stop token, an end-of-turn token, or the end
   delimiter written out in ordinary tokens):
   - if ignores are left and the ignore string plus one more token still fit the budget, drop the
     end, append the ignore string and keep thinking; the next token may not be a stop token;
   - otherwise end naturally: append the end delimiter.
3. When the thinking reaches ``max_thinking_tokens`` (every thinking token counts, injected ones
   too), append the forced end: "\\n" if needed, the end phrase, the end delimiter, the answer prefix.
4. Answer until the end-of-turn token or ``max_answer_tokens``.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np

from t0s1.errors import UserError
from t0s1.profiles import THINKING_SWITCH, ModelProfile, resolve_end_phrase

Prompt = str | list[dict]
"""A user message, or a whole conversation as chat messages (``{"role": ..., "content": ...}``)."""

AUTO_RESERVE_TOKENS = 100
"""``max_thinking_tokens="auto"`` leaves this many tokens of the context for the answer (s1)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BudgetForcing:
    """Settings of budget forcing. Greedy decoding unless ``temperature`` > 0.

    max_thinking_tokens: the thinking budget (every thinking token counts, injected ones too), or
        ``"auto"``: the model's context - the prompt - the forced end - 100.
    num_ignore: how many times the end of thinking is ignored and ``ignore_str`` appended instead.
    ignore_str: the string appended when the end of thinking is ignored (s1: "Wait").
    max_answer_tokens: at most this many tokens are generated after the end of the thinking.
    temperature, top_p: sampling; temperature 0 is greedy.
    seed: seeds sampling. One setting for a whole call seeds its i-th prompt with ``seed + i``;
        settings given per prompt are used as they are. None: a fresh random seed.
    end_phrase: written before the end delimiter at a forced end (None: the profile's; "" none;
        "qwen": Qwen's recommended "Considering the limited time by the user, ...").
    answer_prefix: written after the end delimiter at a forced end (None: the profile's, s1's
        "Final Answer:"; "" none).
    """

    max_thinking_tokens: int | Literal["auto"] = 1024
    num_ignore: int = 0
    ignore_str: str = "Wait"
    max_answer_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    end_phrase: str | None = None
    answer_prefix: str | None = None

    def __post_init__(self) -> None:
        budget = self.max_thinking_tokens
        if budget != "auto" and (not _is_int(budget) or budget < 0):
            raise UserError(f"max_thinking_tokens must be a non-negative integer or 'auto', got {budget!r}.")
        if not _is_int(self.num_ignore) or self.num_ignore < 0:
            raise UserError(f"num_ignore must be a non-negative integer, got {self.num_ignore!r}.")
        if not _is_int(self.max_answer_tokens) or self.max_answer_tokens < 1:
            raise UserError(f"max_answer_tokens must be a positive integer, got {self.max_answer_tokens!r}.")
        if not isinstance(self.ignore_str, str):
            raise UserError(f"ignore_str must be a string, got {self.ignore_str!r}.")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float)
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature!r}.")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.seed is not None and not _is_int(self.seed):
            raise UserError(f"seed must be an integer, got {self.seed!r}.")
        for name in ("end_phrase", "answer_prefix"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UserError(f"{name} must be a string, got {value!r}.")
        if self.end_phrase is not None:
            object.__setattr__(self, "end_phrase", resolve_end_phrase(self.end_phrase))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def thinking_budget(self, *, prompt_length: int, context_length: int | None, forced_end_length: int) -> int:
        """The budget in tokens for a prompt of ``prompt_length`` tokens: "auto" is the context -
        the prompt - the forced end - 100 (s1); a number must fit the context."""
        if self.max_thinking_tokens == "auto":
            if not context_length:
                raise UserError("max_thinking_tokens='auto' needs the model's context length; give a number of tokens.")
            budget = context_length - prompt_length - forced_end_length - AUTO_RESERVE_TOKENS
            if budget < 1:
                raise UserError(
                    f"max_thinking_tokens='auto' leaves no room: the prompt has {prompt_length} tokens and the "
                    f"model's context is {context_length}. Shorten the prompt."
                )
            return budget
        budget = self.max_thinking_tokens
        if context_length and prompt_length + budget + forced_end_length + 1 > context_length:
            room = context_length - prompt_length - forced_end_length - 1
            if room < 0:
                raise UserError(
                    f"The prompt has {prompt_length} tokens and the model's context is {context_length}: it leaves no "
                    f"room to think or answer. Shorten the prompt."
                )
            raise UserError(
                f"max_thinking_tokens={budget} does not fit the model's context of {context_length} tokens with a "
                f"{prompt_length}-token prompt; use at most {room} or 'auto'."
            )
        return budget

    def may_ignore(self, *, thinking_tokens: int, num_ignored: int, ignore_length: int, max_thinking: int) -> bool:
        """Ignore this end of thinking? Only while ignores are left and the ignore string
        (``ignore_length`` tokens) plus one more thinking token still fit the budget."""
        return num_ignored < self.num_ignore and thinking_tokens + ignore_length < max_thinking


@dataclass
class Result:
    """One generation. ``thinking`` holds the injected ignore strings; ``answer`` the text after the
    end of the thinking (a forced answer prefix such as ``Final Answer:`` included, the end token not).

    thinking_tokens: thinking tokens, injected ones included (the budget counts these).
    answer_tokens: tokens the model generated after the end of the thinking.
    finish_reason: "stop" (end-of-turn token), "length" (max_answer_tokens or the context) or
        "cancelled".
    prompt_tokens: the ids fed before the first generated token (the thinking start included).
    seconds: wall time from the start of the call until this sequence finished.
    seed: the sampling seed used (None under greedy decoding).
    """

    thinking: str
    answer: str
    thinking_tokens: int
    answer_tokens: int
    num_ignored: int
    hit_budget: bool
    finish_reason: str
    prompt_tokens: int
    seconds: float
    thinking_token_ids: list[int] = field(repr=False)
    answer_token_ids: list[int] = field(repr=False)
    seed: int | None = None
    top_logprobs: np.ndarray | None = field(default=None, repr=False, compare=False)
    """With ``keep_logprobs`` (test-time policies): the top-k log-probabilities of every sampled
    token's step, largest first (thinking and answer, in order): float32, ``[tokens, k]``
    (``to_dict`` gives lists)."""

    @property
    def tokens_per_second(self) -> float:
        generated = self.thinking_tokens + self.answer_tokens
        return generated / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self, *, with_token_ids: bool = False) -> dict:
        data = asdict(self)
        if not with_token_ids:
            data.pop("thinking_token_ids")
            data.pop("answer_token_ids")
        if data.get("top_logprobs") is None:
            data.pop("top_logprobs")
        else:
            data["top_logprobs"] = self.top_logprobs.tolist()
        return data


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class RenderedPrompt:
    """Prompt ids for budget forcing. ``thinking``: False when thinking is off (the template closed
    it, or ``enable_thinking`` is false): the sequence starts with the answer."""

    ids: list[int]
    thinking: bool = True


def normalize_messages(prompt: Prompt) -> list[dict]:
    """Chat messages for the template: a string is one user message; ``reasoning`` on an assistant
    message is passed as ``reasoning_content`` (what Qwen3 / R1 templates read)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("The prompt is empty: give the question to answer.")
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise UserError("A conversation must be a non-empty list of {'role': ..., 'content': str} messages.")
    if not any(m["content"].strip() for m in messages):
        raise UserError("Every message of the conversation is empty: give the question to answer.")
    out = []
    for message in messages:
        message = dict(message)
        reasoning = message.pop("reasoning", None)
        if reasoning and not message.get("reasoning_content"):
            message["reasoning_content"] = reasoning
        out.append(message)
    return out


def render_prompt_ids(tokenizer, profile: ModelProfile, prompt: Prompt, chat_template_kwargs: dict | None = None) -> RenderedPrompt:
    """The chat template with the generation prompt (``chat_template_kwargs`` passed to it), then
    the thinking start unless the template opened the thinking already or closed it."""
    if not isinstance(chat_template_kwargs or {}, dict):
        raise UserError(f"chat_template_kwargs must be an object, got {chat_template_kwargs!r}.")
    kwargs = dict(chat_template_kwargs or {})
    messages = normalize_messages(prompt)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as error:  # jinja errors, a template that raises on this conversation
        raise UserError(f"The model's chat template could not render this conversation: {type(error).__name__}: {error}") from None
    thinking_off = kwargs.get(THINKING_SWITCH) is False
    if _ends_with(text, profile.thinking_end):
        return RenderedPrompt(encode(tokenizer, text), thinking=False)  # the template closed the thinking
    if _ends_with(text, profile.thinking_start):  # the template opened the thinking: never a second start
        if thinking_off:  # ... and cannot close it: close it right away
            closed = encode(tokenizer, profile.thinking_end) + encode(tokenizer, profile.after_end)
            return RenderedPrompt(encode(tokenizer, text) + closed, thinking=False)
        return RenderedPrompt(encode(tokenizer, text))
    if thinking_off:
        return RenderedPrompt(encode(tokenizer, text), thinking=False)
    return RenderedPrompt(encode(tokenizer, text) + encode(tokenizer, profile.thinking_start))


def _ends_with(text: str, delimiter: str) -> bool:
    return re.search(re.escape(delimiter) + r"\s*$", text) is not None


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone (no special tokens added): delimiters are concatenated as ids."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def longest_token_chars(tokenizer) -> int:
    """The characters of the vocabulary's longest entry: no token decodes to more text (a
    byte-level entry is at least as long as what it decodes to), so ``n`` tokens are at most ``n``
    times this many characters."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """Ids that end the assistant's turn: eos ids of the tokenizer and generation config, and
    ``<|im_end|>`` for ChatML models."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(generation_config, "eos_token_id", None)
    if _is_int(config_eos):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if _is_int(im_end) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def per_prompt_settings(budget, count: int) -> list[BudgetForcing]:
    """One setting per prompt: a single setting is repeated, prompt i sampled with seed + i."""
    if budget is None:
        return [BudgetForcing()] * count
    if isinstance(budget, BudgetForcing):
        if budget.seed is None or budget.greedy:
            return [budget] * count
        return [replace(budget, seed=budget.seed + i) for i in range(count)]  # prompt i: seed + i
    budgets = list(budget)
    if len(budgets) != count:
        raise UserError(f"Got {len(budgets)} budget settings for {count} prompts: give one, or one per prompt.")
    return budgets


# --------------------------------------------------------------------------------------------
# The ids the rules write and watch for

ENCODED_CACHE_SIZE, ENCODED_CACHE_CHARS = 256, 256
"""``ForcingRules.ids`` keeps the ids of the last 256 texts of up to 256 characters."""


class ForcingRules:
    """The delimiters of one tokenizer and profile as ids, and the s1 decisions over them.

    The thinking stops at the first token of the end delimiter when that token is special or the
    whole delimiter (s1 stops on ``<|im_start|>``; Qwen3 on ``</think>``), and at any end-of-turn
    token. An end delimiter made of ordinary tokens (``</think>`` for a tokenizer without such a
    token) is found in the text once the model has written it all (``written_end``).
    """

    def __init__(self, tokenizer, profile: ModelProfile, generation_config=None, *, context_length: int | None = None):
        self.tokenizer = tokenizer
        self.profile = profile
        self.context_length = context_length
        self.end_of_turn = frozenset(end_of_turn_ids(tokenizer, generation_config))
        self.end_delimiter = encode(tokenizer, profile.thinking_end)
        if not self.end_delimiter:
            raise UserError(f"The end of thinking {profile.thinking_end!r} encodes to no tokens.")
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        if len(self.end_delimiter) == 1 or self.end_delimiter[0] in special:
            self.stop_ids = self.end_of_turn | {self.end_delimiter[0]}
            self.written_end = None
        else:
            self.stop_ids = self.end_of_turn
            self.written_end = profile.thinking_end
        # Texts come from requests too (ignore_str, end_phrase, ...): a bounded cache, of short texts only.
        self._encoded = functools.lru_cache(maxsize=ENCODED_CACHE_SIZE)(functools.partial(encode, tokenizer))

    def ids(self, text: str) -> list[int]:
        """The ids of ``text`` (shared: not to be changed by the caller)."""
        return self._encoded(text) if len(text) <= ENCODED_CACHE_CHARS else encode(self.tokenizer, text)

    def ignore_ids(self, settings: BudgetForcing) -> list[int]:
        return self.ids(settings.ignore_str)

    def forced_end(self, settings: BudgetForcing, thinking_text: str) -> tuple[list[int], list[int]]:
        """(ids that close the thinking, ids that open the answer) at a forced end: the newline and
        end phrase, the end delimiter; then ``after_end`` and the answer prefix. Each part is
        tokenised on its own, so the delimiter's ids are always the same."""
        text = self.profile.forced_end(thinking_text, end_phrase=settings.end_phrase, answer_prefix=settings.answer_prefix)
        before, _, after = text.partition(self.profile.thinking_end)
        return self.ids(before) + self.end_delimiter, self.ids(after)

    def forced_end_length(self, settings: BudgetForcing) -> int:
        """Tokens of the longest forced end (the one with a leading newline)."""
        close, answer = self.forced_end(settings, "x")
        return len(close) + len(answer)

    def thinking_budget(self, settings: BudgetForcing, prompt_length: int) -> int:
        return settings.thinking_budget(
            prompt_length=prompt_length, context_length=self.context_length, forced_end_length=self.forced_end_length(settings)
        )

    def may_ignore(self, settings: BudgetForcing, max_thinking: int, thinking_tokens: int, num_ignored: int) -> bool:
        return settings.may_ignore(
            thinking_tokens=thinking_tokens, num_ignored=num_ignored,
            ignore_length=len(self.ignore_ids(settings)), max_thinking=max_thinking,
        )

    def sequence(self, index: int | None, prompt: RenderedPrompt, settings: BudgetForcing, *,
                 riders: list[Rider] | None = None, on_text: Callable | None = None) -> Sequence:
        """A new sequence. Its budget is resolved for its own prompt ("auto" does not depend on
        other prompts of a batch); a sampled setting without a seed draws a fresh one."""
        if not prompt.ids:
            raise UserError(f"Prompt {index or 0} is empty.")
        if prompt.thinking:
            max_thinking = self.thinking_budget(settings, len(prompt.ids))
        else:
            self.thinking_budget(replace(settings, max_thinking_tokens=0), len(prompt.ids))  # the answer must fit
            max_thinking = 0
        if not settings.greedy and settings.seed is None:
            settings = replace(settings, seed=secrets.randbits(63))
        return Sequence(self, index, settings, max_thinking, prompt, riders=list(riders or []), on_text=on_text)

    def written_end_at(self, thinking_ids: list[int]) -> tuple[int, str] | None:
        """Whether the thinking now ends with the end delimiter written in ordinary tokens:
        (how many trailing ids hold it, the text before it in those ids), else None."""
        # Written one byte a token at worst, the delimiter spans this many ids (plus slack).
        window = len(self.written_end.encode("utf-8")) + 4
        tail = self.tokenizer.decode(thinking_ids[-window:], skip_special_tokens=False)
        if self.written_end not in tail:
            return None
        for count in range(1, min(window, len(thinking_ids)) + 1):
            text = self.tokenizer.decode(thinking_ids[-count:], skip_special_tokens=False)
            if self.written_end in text:
                return count, text[: text.index(self.written_end)]
        return None


# --------------------------------------------------------------------------------------------
# One sequence


def _answer_key(settings: BudgetForcing) -> BudgetForcing:
    """What decides a setting's answer once its thinking has ended: all but the budget and the
    number of ignores."""
    return replace(settings, max_thinking_tokens=0, num_ignore=0)


@dataclass
class Rider:
    """A sweep setting that follows a wider setting's thinking until its own thinking ends."""

    index: int
    settings: BudgetForcing
    max_thinking: int


class LogprobSteps:
    """The top-k log-probabilities of each sampled step, largest first: k float32 numbers a row in
    one growing array. DeepConf keeps k = 20 a token for every trace; as lists of Python floats that
    took about 700 bytes a token, here 4 x k. Indexing gives rows (``steps[i]``) and slices
    (``steps[a:]``, a ``[rows, k]`` view), as a list of rows would."""

    def __init__(self):
        self._rows: np.ndarray | None = None
        self._count = 0

    def append(self, values) -> None:
        row = np.asarray(values, dtype=np.float32)
        if self._rows is None:
            self._rows = np.empty((64, row.shape[0]), dtype=np.float32)
        elif self._count == len(self._rows):
            grown = np.empty((2 * len(self._rows), self._rows.shape[1]), dtype=np.float32)
            grown[: self._count] = self._rows
            self._rows = grown
        self._rows[self._count] = row
        self._count += 1

    def array(self) -> np.ndarray:
        """A copy of the steps, ``[steps, k]`` (``[0, 0]`` when there are none)."""
        return self._view().copy()

    def _view(self) -> np.ndarray:
        return self._rows[: self._count] if self._rows is not None else np.empty((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self._view()[index]

    def __iter__(self):
        return iter(self._view())


class Sequence:
    """The state of one generation and the s1 decisions for it, on token ids.

    ``ids`` is the whole sequence as it will be once everything decided is fed: the prompt, the
    thinking (generated and injected), the delimiters and the answer. An engine keeps its cache in
    step with ``ids``: it feeds ``ids[fed:]`` one token at a time and samples the next token (then
    calls ``accept``) only when nothing is left to feed. A written end delimiter that is ignored or
    replaced shortens ``ids``; ``rewound_to`` then says where the cache must be cut back to.
    """

    def __init__(self, rules: ForcingRules, index: int | None, settings: BudgetForcing, max_thinking: int,
                 prompt: RenderedPrompt, *, riders: list[Rider] | None = None, on_text: Callable | None = None):
        self.rules = rules
        self.index = index  # which result this produces; None: a sweep trace that only carries riders
        self.settings = settings
        self.max_thinking = max_thinking
        self.prompt_ids = list(prompt.ids)
        self.ids = list(prompt.ids)
        self.thinking_ids: list[int] = []
        self.answer_ids: list[int] = []  # a forced answer prefix and the generated answer
        self.answer_generated = 0
        self.num_ignored = 0
        self.hit_budget = False
        self.ban_stop = False  # the next sampled token may not be a stop token (after an ignore string)
        self.riders = riders or []
        self.twins: list[int] = []  # sweep settings that share this sequence's result (``_forks``)
        self.finish_reason: str | None = None
        self.rewound_to: int | None = None
        self.on_text = on_text
        # Test-time policies (t0s1.policies): the top-k log-probabilities of each sampled token when
        # ``keep_logprobs`` = k > 0, how many tokens this sequence sampled, and a watcher of its
        # thinking that may branch it (``on_thinking(sequence, event, written) -> branches``).
        self.keep_logprobs = 0
        self.top_logprobs = LogprobSteps()
        self.sampled = 0
        self.on_thinking: Callable | None = None
        self.streams = None
        if on_text is not None and index is not None:
            self.streams = {
                "thinking": TextStream(rules.tokenizer, hold=rules.written_end),
                "answer": TextStream(rules.tokenizer),
            }
        self.thinking = prompt.thinking
        if not prompt.thinking:
            self._stream("thinking", final=True)
        elif max_thinking == 0:
            self._force_end()

    # ---- what the engine asks ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def banned_ids(self) -> frozenset[int]:
        """Ids the next sampled token may not be (s1's min_tokens=1 after an ignore string)."""
        return self.rules.stop_ids if self.ban_stop else frozenset()

    def stop_ids(self) -> frozenset[int]:
        """Ids that end the current phase (for backends that generate until a stop)."""
        return self.rules.stop_ids if self.thinking else self.rules.end_of_turn

    @property
    def max_length(self) -> int:
        """The most ids this sequence can come to hold: its prompt, its whole budget, the longest
        end of thinking and its answer."""
        settings = self.settings
        return len(self.prompt_ids) + self.max_thinking + self.rules.forced_end_length(settings) + settings.max_answer_tokens + 1

    def tokens_left(self) -> int:
        """How many tokens the model may still generate in the current phase."""
        if self.thinking:
            return self.max_thinking - len(self.thinking_ids)
        return self.settings.max_answer_tokens - self.answer_generated

    def cancel(self) -> None:
        """Stop the sequence where it is (a finished one keeps how it finished)."""
        if not self.done:
            self.finish_reason = "cancelled"

    def take_rewind(self) -> int | None:
        """Where the cache must be cut back to before feeding (then forgotten), or None."""
        rewound, self.rewound_to = self.rewound_to, None
        return rewound

    # ---- one sampled token --------------------------------------------------------------------

    def accept(self, token: int) -> list[Sequence]:
        """The model produced ``token``: decide. Returns sweep settings (and policy branches)
        forked off here."""
        self.ban_stop = False
        self.sampled += 1
        if self.thinking:
            return self._think(token)
        self._answer(token)
        return []

    def accept_stop(self) -> list[Sequence]:
        """The backend stopped at a stop id it did not return (the OpenAI API drops it)."""
        return self.accept(next(iter(sorted(self.stop_ids()))))

    def _think(self, token: int) -> list[Sequence]:
        forks: list[Sequence] = []
        if token in self.rules.stop_ids:
            return self._end_of_thinking()
        self._append_thinking([token], stream=False)  # sent once it is known not to end the thinking
        if self.rules.written_end is not None:
            written = self.rules.written_end_at(self.thinking_ids)
            if written is not None:
                count, before = written
                # Cut the written delimiter from the thinking (and the cache); keep the text before it.
                # What followed it in its last token (the "." of ">.") goes with it.
                self._truncate_thinking(len(self.thinking_ids) - count)
                self._append_thinking(self.rules.ids(before) if before else [])
                return self._end_of_thinking()
        self._stream("thinking")
        thinking_tokens = len(self.thinking_ids)
        forks += self._forks([rider for rider in self.riders if rider.max_thinking == thinking_tokens], forced=True)
        if self.on_thinking is not None and thinking_tokens < self.max_thinking:
            written = self._written_ignore()
            forks += self.on_thinking(self, "ignore" if written else "token", written)
        if thinking_tokens >= self.max_thinking:
            self._force_end()
        return forks

    def _end_of_thinking(self) -> list[Sequence]:
        """The model ended its thinking: fork the sweep settings that stop here, then ignore the
        end (append the ignore string) or end naturally (append the end delimiter)."""
        thinking_tokens = len(self.thinking_ids)
        forks = self._forks([rider for rider in self.riders
                             if not self.rules.may_ignore(rider.settings, rider.max_thinking, thinking_tokens, self.num_ignored)],
                            forced=False)
        if self.rules.may_ignore(self.settings, self.max_thinking, len(self.thinking_ids), self.num_ignored):
            if self.on_thinking is not None:
                forks += self.on_thinking(self, "end", 0)
            self.num_ignored += 1
            self._append_thinking(self.rules.ignore_ids(self.settings))
            self.ban_stop = True
        else:
            self._end_naturally()
        return forks

    def _end_naturally(self) -> None:
        self.thinking = False
        self.ids += self.rules.end_delimiter
        self._stream("thinking", final=True)

    def _force_end(self) -> None:
        last = self.rules.tokenizer.decode(self.thinking_ids[-1:]) if self.thinking_ids else ""
        close, answer = self.rules.forced_end(self.settings, last)
        self.thinking = False
        self.hit_budget = True
        self.ids += close + answer
        self._stream("thinking", final=True)
        self.answer_ids += answer
        self._stream("answer")

    def _answer(self, token: int) -> None:
        if token in self.rules.end_of_turn:
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        self.answer_ids.append(token)
        self.answer_generated += 1
        self._stream("answer")
        if self.answer_generated >= self.settings.max_answer_tokens:
            self.finish_reason = "length"

    def _append_thinking(self, ids: list[int], *, stream: bool = True) -> None:
        self.thinking_ids += ids
        self.ids += ids
        if stream:
            self._stream("thinking")

    def _truncate_thinking(self, keep: int) -> None:
        drop = len(self.thinking_ids) - keep
        if drop <= 0:
            return
        del self.thinking_ids[keep:]
        del self.ids[len(self.ids) - drop :]
        self.rewound_to = len(self.ids) if self.rewound_to is None else min(self.rewound_to, len(self.ids))
        if self.streams:
            self.streams["thinking"].rewind()

    def note_logprobs(self, top_logprobs) -> None:
        """The top-k log-probabilities (largest first) of the step whose token comes next."""
        self.top_logprobs.append(top_logprobs)

    def _written_ignore(self) -> int:
        """How many trailing thinking ids hold the ignore string the model just wrote itself (a
        re-check such as "Wait", as a word of its own), else 0."""
        ignore = self.settings.ignore_str.strip()
        if not ignore or not self.thinking_ids:
            return 0
        decode = self.rules.tokenizer.decode
        if ignore[-1] not in decode(self.thinking_ids[-1:], skip_special_tokens=False):
            return 0  # the last token did not complete it (e.g. a space after an injected "Wait")
        window = self.thinking_ids[-(len(ignore) + 2):]
        if re.search(r"(?:^|\W)" + re.escape(ignore) + r"\s*$", decode(window, skip_special_tokens=False)) is None:
            return 0
        for count in range(1, len(window) + 1):
            if ignore in decode(self.thinking_ids[-count:], skip_special_tokens=False):
                return count
        return 0

    def branch(self, settings: BudgetForcing, *, drop_last: int = 0) -> Sequence:
        """A copy of this sequence whose thinking stops here (less its last ``drop_last`` ids) with
        the forced end, answering under ``settings``: a policy's trial answer or probe. The copy
        neither changes this sequence nor counts its tokens (``sampled`` starts at 0)."""
        fork = Sequence.__new__(Sequence)
        fork.__dict__.update(self.__dict__)
        fork.settings, fork.riders, fork.twins, fork.streams, fork.ban_stop = settings, [], [], None, False
        fork.ids, fork.thinking_ids, fork.answer_ids = list(self.ids), list(self.thinking_ids), []
        fork.on_thinking, fork.top_logprobs, fork.sampled = None, LogprobSteps(), 0
        if drop_last:
            fork._truncate_thinking(len(fork.thinking_ids) - drop_last)
        fork._force_end()
        fork.hit_budget = False  # the policy ended this thinking, not the budget
        return fork

    def _forks(self, riders: list[Rider], *, forced: bool) -> list[Sequence]:
        """The sweep settings ``riders`` leave the trace here: one fork per distinct answer. Riders
        whose settings differ only in the budget and the number of ignores would answer the same
        ids from the same point (greedy), so they share one fork and its result (``twins``)."""
        groups: list[list[Rider]] = []
        for rider in riders:
            key = _answer_key(rider.settings)
            same = next((group for group in groups if _answer_key(group[0].settings) == key), None)
            if same is None:
                groups.append([rider])
            else:
                same.append(rider)
        return [self._fork(group, forced=forced) for group in groups]

    def _fork(self, riders: list[Rider], *, forced: bool) -> Sequence:
        """A copy of this sequence that stops thinking here and answers under the first rider's
        settings; the others (``twins``) get the same result."""
        first, *twins = riders
        for rider in riders:
            self.riders.remove(rider)
        fork = Sequence.__new__(Sequence)
        fork.__dict__.update(self.__dict__)
        fork.index, fork.settings, fork.max_thinking, fork.riders = first.index, first.settings, first.max_thinking, []
        fork.twins = [rider.index for rider in twins]
        fork.ids, fork.thinking_ids, fork.answer_ids = list(self.ids), list(self.thinking_ids), []
        fork.streams = None
        fork.ban_stop = False
        fork.on_thinking, fork.top_logprobs, fork.sampled = None, LogprobSteps(), 0
        if forced:
            fork._force_end()
        else:
            fork._end_naturally()
        return fork

    # ---- results and streaming ------------------------------------------------------------

    def _stream(self, channel: str, *, final: bool = False) -> None:
        if self.streams is None:
            return
        ids = self.thinking_ids if channel == "thinking" else self.answer_ids
        text = self.streams[channel].update(ids, final=final)
        if text:
            self.on_text(self.index, channel, text)

    def result(self, seconds: float) -> Result:
        """The result; a streamed sequence sends what it held back first. The text is the decoded
        ids either way: streaming never changes a result (the streamed pieces add up to it)."""
        if self.streams is not None:
            self._stream("thinking", final=True)
            self._stream("answer", final=True)
            thinking, answer = self.streams["thinking"].final, self.streams["answer"].final
        else:
            decode = self.rules.tokenizer.decode
            thinking = decode(self.thinking_ids, skip_special_tokens=False).strip()
            answer = decode(self.answer_ids, skip_special_tokens=False).strip()
        return Result(
            thinking=thinking,
            answer=answer,
            thinking_tokens=len(self.thinking_ids),
            answer_tokens=self.answer_generated,
            num_ignored=self.num_ignored,
            hit_budget=self.hit_budget,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids),
            seconds=seconds,
            thinking_token_ids=list(self.thinking_ids),
            answer_token_ids=list(self.answer_ids),
            seed=None if self.settings.greedy else self.settings.seed,
            top_logprobs=self.top_logprobs.array() if self.keep_logprobs else None,
        )


# --------------------------------------------------------------------------------------------
# Streaming text


class TextStream:
    """The text of a growing list of ids, sent in pieces whose concatenation is exactly the final
    ``decode(ids).strip()``: leading whitespace is skipped, trailing whitespace waits until more
    text shows what it is. With ``hold`` (an end delimiter written in ordinary tokens, which the
    owner cuts out of the ids once it is whole), ``hold`` and what follows it are never sent, and
    an end that more text could still make into ``hold`` (``</thi``) waits. Decoding
    is incremental (the tokenizers library's ``DecodeStream``): the cost per token does not grow
    with the text.
    """

    def __init__(self, tokenizer, *, hold: str | None = None):
        self.tokenizer = tokenizer
        self.hold = hold
        self.decoded = 0  # ids decoded so far
        self.sent: list[str] = []
        self.pending = ""  # decoded text not sent yet
        self.final: str | None = None  # decode(ids).strip() once the ids are complete
        self.stale = False  # the ids were shortened since the last update
        self.started = False  # non-whitespace text seen (leading whitespace is dropped)
        self._decoder = _IncrementalDecoder(tokenizer)

    @property
    def text(self) -> str:
        return "".join(self.sent)

    def update(self, ids: list[int], *, final: bool = False) -> str:
        """New text to send for ``ids`` (which extend the ids seen before). ``final``: the ids are
        complete; what is left is sent so that the pieces add up to ``decode(ids).strip()`` (half a
        UTF-8 character at the very end included, as the decoder writes it)."""
        if final:
            return self._finish(ids)
        if self.stale:
            self._resync(ids)
        for token in ids[self.decoded :]:
            self.pending += self._decoder.step(token)
        self.decoded = len(ids)
        if not self.started:
            self.pending = self.pending.lstrip()
            self.started = bool(self.pending)
        end = _sendable(self.pending, self.hold) if self.hold else len(self.pending)
        cut = len(self.pending[:end].rstrip())
        piece, self.pending = self.pending[:cut], self.pending[cut:]
        if piece:
            self.sent.append(piece)
        return piece

    def _finish(self, ids: list[int]) -> str:
        if self.final is not None and self.decoded == len(ids):
            return ""  # finished already
        self.final = self.tokenizer.decode(ids, skip_special_tokens=False).strip()
        self.stale = False
        sent = self.text
        piece = self.final[len(sent) :] if self.final.startswith(sent) else ""
        self.decoded, self.pending = len(ids), ""
        if piece:
            self.sent.append(piece)
        return piece

    def rewind(self) -> None:
        """The ids were shortened (a written delimiter cut out, the text before it in its tokens
        to be encoded again): the next ``update`` derives the text not sent yet from its ids."""
        self.stale = True

    def _resync(self, ids: list[int]) -> None:
        """After a rewind: the text not sent yet, decoded from ``ids`` again (the text sent may
        reach into the ids that were cut and encoded again). Half a character left at the end stays
        half (what follows a cut is injected text), as the final decode writes it."""
        self.stale = False
        text, sent = self.tokenizer.decode(ids, skip_special_tokens=False).lstrip(), self.text
        self.pending = text[len(sent) :] if text.startswith(sent) else ""
        self.started = bool(sent or self.pending)  # what was cut may have been all the text so far
        self.decoded = len(ids)
        # The decoder continues after a few ids of context; not after half a character, which it
        # would take for text still to come.
        context = ids[-4:]
        while context and self.tokenizer.decode(context, skip_special_tokens=False).endswith("\ufffd"):
            context = context[:-1]
        self._decoder = _IncrementalDecoder(self.tokenizer, context)


def _sendable(text: str, hold: str) -> int:
    """How much of ``text`` may be sent: the text before ``hold`` if it is written in it, else the
    text before the longest suffix that more text could still make into ``hold``."""
    found = text.find(hold)
    if found >= 0:
        return found
    for size in range(min(len(hold) - 1, len(text)), 0, -1):
        if text.endswith(hold[:size]):
            return len(text) - size
    return len(text)


class _IncrementalDecoder:
    """One token at a time to text: ``tokenizers``' ``DecodeStream`` for fast tokenizers, else the
    same technique by hand (decode a short window of recent ids with and without the new ones)."""

    def __init__(self, tokenizer, prefix: list[int] | None = None):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = None
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self.backend = backend
            self.stream = DecodeStream(ids=list(prefix or []), skip_special_tokens=False)
        else:
            self.window = list(prefix or [])
            self.read = len(self.window)  # ids of the window already turned into text

    def step(self, token: int) -> str:
        if self.stream is not None:
            return self.stream.step(self.backend, token) or ""  # None: half a UTF-8 character so far
        self.window.append(token)
        decode = self.tokenizer.decode
        before = decode(self.window[: self.read], skip_special_tokens=False)
        after = decode(self.window, skip_special_tokens=False)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # half a UTF-8 character: wait for the rest
        self.window, self.read = self.window[self.read :], len(self.window) - self.read
        return after[len(before) :]
