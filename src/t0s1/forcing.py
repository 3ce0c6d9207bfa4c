"""Budget forcing (s1: Simple test-time scaling), batched, continuing from the KV cache.

The algorithm, for each sequence (see docs/budget-forcing.md for the exact rules):

1. The prompt is the chat template with the generation prompt, then the thinking delimiter.
2. Think. When the model emits a stop token (the first token of the answer delimiter, the
   end-of-turn or eos token):
   - if ignores are left and the ignore string (``"Wait"``) still fits the budget, drop the stop
     token, append the ignore string and keep thinking; the next token may not be a stop token;
   - otherwise end naturally: drop the stop token and append the answer delimiter.
3. When the thinking reaches ``max_thinking_tokens`` (which counts every thinking token, injected
   ones included), append ``"\\n"`` if needed and the answer delimiter, then ``Final Answer:``.
4. Answer until the end-of-turn token or ``max_answer_tokens``.

Token ids are concatenated, never re-tokenised. All sequences of a batch advance one token per
step; a sequence that has tokens to inject feeds them one per step instead of sampling, so an
intervention in one sequence never disturbs another, and nothing already in the cache is encoded
again. Finished sequences leave the batch.

``generate_sweep`` runs several budgets (or numbers of ignores) at once under greedy decoding: one
thinking trace per prompt, and each setting forks off the trace, with a copy of its KV cache, at
the point where its own thinking ends. Each fork then only generates its answer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch

from t0s1.errors import UserError
from t0s1.models import LoadedModel
from t0s1.reasoning_format import ReasoningFormat

Prompt = str | list[dict]
"""A user message, or a whole conversation as chat messages (``{"role": ..., "content": ...}``)."""

AUTO_RESERVE_TOKENS = 100
"""``max_thinking_tokens="auto"`` leaves this many tokens of the context for the answer (s1)."""


@dataclass(frozen=True)
class BudgetForcing:
    """Settings of budget forcing. Greedy decoding unless ``temperature`` > 0.

    max_thinking_tokens: the thinking budget (every thinking token counts, injected ones too), or
        ``"auto"``: the model's context - the longest prompt - the delimiters - 100.
    num_ignore: how many times the end of thinking is ignored and ``ignore_str`` appended instead.
    ignore_str: the string appended when the end of thinking is ignored (s1: "Wait").
    max_answer_tokens: at most this many tokens are generated after the answer delimiter.
    temperature, top_p: sampling; temperature 0 is greedy.
    seed: seeds sampling. One setting for a whole call seeds its i-th prompt with ``seed + i``;
        settings given per prompt are used as they are. None: not reproducible.
    """

    max_thinking_tokens: int | Literal["auto"] = 1024
    num_ignore: int = 0
    ignore_str: str = "Wait"
    max_answer_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0

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
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise UserError(f"temperature must be a number >= 0, got {self.temperature!r}.")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if self.seed is not None and not _is_int(self.seed):
            raise UserError(f"seed must be an integer, got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def thinking_budget(self, *, prompt_length: int, context_length: int | None, forced_end_length: int) -> int:
        """The budget in tokens for prompts of up to ``prompt_length`` tokens: "auto" is the
        context - the prompt - the forced end - 100 (s1); a number must fit the context."""
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
    answer delimiter (a forced ``Final Answer:`` included, the end token not).

    thinking_tokens: thinking tokens, injected ones included (the budget counts these).
    answer_tokens: tokens the model generated after the answer delimiter.
    finish_reason: "stop" (end-of-turn token), "length" (max_answer_tokens or the context) or
        "cancelled".
    seconds: wall time from the start of the call until this sequence finished.
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

    @property
    def tokens_per_second(self) -> float:
        generated = self.thinking_tokens + self.answer_tokens
        return generated / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self, *, with_token_ids: bool = False) -> dict:
        data = asdict(self)
        if not with_token_ids:
            data.pop("thinking_token_ids")
            data.pop("answer_token_ids")
        return data


DeltaCallback = Callable[[int, str, str], None]
"""``on_delta(prompt_index, channel, text)``: new text of ``channel`` ("thinking" or "answer")."""


def render_prompt(lm: LoadedModel, prompt: Prompt) -> list[int]:
    """Prompt ids for budget forcing: chat template with generation prompt, then thinking start."""
    return render_prompt_ids(lm.tokenizer, lm.reasoning_format, prompt)


def render_prompt_ids(tokenizer, reasoning_format: ReasoningFormat, prompt: Prompt) -> list[int]:
    """``render_prompt`` for a tokenizer alone (backends that have no local model)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("The prompt is empty: give the question to answer.")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise UserError("A conversation must be a non-empty list of {'role': ..., 'content': str} messages.")
        if not any(m["content"].strip() for m in messages):
            raise UserError("Every message of the conversation is empty: give the question to answer.")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode(tokenizer, text + reasoning_format.thinking_start)


@dataclass(frozen=True)
class StopRule:
    """Where thinking and answer stop, in token ids: the one rule for every backend.

    The thinking stops at the first token of the answer delimiter (s1 stops on ``<|im_start|>``)
    when that token is special or the whole delimiter, and at any end-of-turn token. A delimiter of
    ordinary tokens (e.g. "</think>" for a tokenizer without such a token) ends the thinking once
    the model has written all of it (``written_delimiter``).
    """

    end_of_turn: frozenset
    answer_delimiter: tuple
    stop_ids: frozenset
    written_delimiter: tuple | None

    @classmethod
    def for_tokenizer(cls, tokenizer, reasoning_format: ReasoningFormat, generation_config=None) -> StopRule:
        end_of_turn = frozenset(end_of_turn_ids(tokenizer, generation_config))
        delimiter = tuple(encode(tokenizer, reasoning_format.thinking_end))
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        if len(delimiter) == 1 or delimiter[0] in special:
            return cls(end_of_turn, delimiter, end_of_turn | {delimiter[0]}, None)
        return cls(end_of_turn, delimiter, end_of_turn, delimiter)


def generate(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    budget: BudgetForcing | Sequence[BudgetForcing] | None = None,
    *,
    on_delta: DeltaCallback | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
    progress: bool = False,
) -> list[Result]:
    """Generate with budget forcing for every prompt, batched. One result per prompt, in order.

    ``budget`` is one setting for all prompts (prompt i sampled with ``seed + i``), or one per
    prompt (each with its own seed). ``on_delta`` streams the text as
    it is generated; ``is_cancelled(i)`` stops prompt ``i`` early (finish_reason "cancelled").
    """
    if isinstance(prompts, str):
        raise UserError("generate takes a list of prompts; wrap a single prompt in a list.")
    prompt_ids = [_render_numbered(lm, prompt, i) for i, prompt in enumerate(prompts)]
    return generate_from_ids(lm, prompt_ids, budget, on_delta=on_delta, is_cancelled=is_cancelled, progress=progress)


def generate_from_ids(
    lm: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    budget: BudgetForcing | Sequence[BudgetForcing] | None = None,
    *,
    on_delta: DeltaCallback | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
    progress: bool = False,
) -> list[Result]:
    """``generate`` for prompts already rendered to ids (ending with the thinking delimiter)."""
    budgets = per_prompt_settings(budget, len(prompt_ids))
    engine = _Engine(lm, on_delta=on_delta, is_cancelled=is_cancelled)
    longest = max((len(ids) for ids in prompt_ids), default=0)
    rows = [engine.new_row(i, ids, settings, longest=longest) for i, (ids, settings) in enumerate(zip(prompt_ids, budgets, strict=True))]
    return engine.run(rows, len(prompt_ids), progress=progress)


def generate_sweep(
    lm: LoadedModel,
    prompts: Sequence[Prompt],
    settings: Sequence[BudgetForcing],
    *,
    progress: bool = False,
) -> list[list[Result]]:
    """Results for every prompt under every setting: ``results[prompt][setting]``.

    Greedy only. The settings may differ in ``max_thinking_tokens`` and ``num_ignore``; each prompt
    is thought through once with the largest of both, and every setting's answer is generated from
    the point where its thinking ends. The results equal separate ``generate`` calls per setting.
    """
    settings = list(settings)
    if not settings:
        raise UserError("generate_sweep needs at least one setting.")
    first = settings[0]
    for setting in settings:
        if not setting.greedy:
            raise UserError("A prefix-sharing sweep needs greedy decoding (temperature 0); run settings separately to sample.")
        if replace(setting, max_thinking_tokens=0, num_ignore=0) != replace(first, max_thinking_tokens=0, num_ignore=0):
            raise UserError("Sweep settings may differ only in max_thinking_tokens and num_ignore.")
    prompt_ids = [_render_numbered(lm, prompt, i) for i, prompt in enumerate(prompts)]
    engine = _Engine(lm)
    longest = max((len(ids) for ids in prompt_ids), default=0)
    limits = [engine.resolve_budget(s, longest) for s in settings]
    widest = replace(first, max_thinking_tokens=max(limits), num_ignore=max(s.num_ignore for s in settings))
    rows = []
    for i, ids in enumerate(prompt_ids):
        riders = [_Rider(i * len(settings) + j, s, limits[j]) for j, s in enumerate(settings)]
        rows.append(engine.new_row(None, ids, widest, riders=riders, longest=longest))
    flat = engine.run(rows, len(prompt_ids) * len(settings), progress=progress)
    return [flat[i * len(settings) : (i + 1) * len(settings)] for i in range(len(prompt_ids))]


def resolve_budget(lm: LoadedModel, settings: BudgetForcing, prompt_length: int) -> int:
    """The thinking budget in tokens for a prompt of ``prompt_length`` tokens ("auto" resolved);
    a ``UserError`` if it does not fit the model's context."""
    return _Engine(lm).resolve_budget(settings, prompt_length)


# --------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Rider:
    """A sweep setting that follows a wider setting's thinking trace until its own thinking ends."""

    index: int
    settings: BudgetForcing
    max_thinking: int


@dataclass
class _Row:
    """The state of one sequence in the batch."""

    index: int | None  # which result this row produces; None: a sweep trace that only carries riders
    settings: BudgetForcing
    max_thinking: int
    prompt_ids: list[int]
    ids_fed: int  # ids in the KV cache for this row (prompt included)
    thinking: bool = True
    thinking_ids: list[int] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)
    answer_generated: int = 0
    num_ignored: int = 0
    hit_budget: bool = False
    queue: deque = field(default_factory=deque)  # ids to feed before sampling again
    ban_stop: bool = False  # the next sampled token may not be a stop token (after an ignore string)
    riders: list[_Rider] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    streamed: dict = field(default_factory=lambda: {"thinking": 0, "answer": 0})


class _Engine:
    def __init__(self, lm: LoadedModel, *, on_delta=None, is_cancelled=None):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.on_delta = on_delta
        self.is_cancelled = is_cancelled
        fmt = lm.reasoning_format
        rule = StopRule.for_tokenizer(lm.tokenizer, fmt, getattr(lm.model, "generation_config", None))
        self.end_ids = rule.end_of_turn
        self.answer_delimiter = list(rule.answer_delimiter)
        self.stop_ids = rule.stop_ids
        self.written_delimiter = list(rule.written_delimiter) if rule.written_delimiter else None
        self.forced_end_ids = {nl: _encode(lm, fmt.forced_end("\n" if nl else "")) for nl in (False, True)}
        self.ignore_cache: dict[str, list[int]] = {}
        self.started = time.perf_counter()
        self.results: list[Result | None] = []

    # ---- settings -------------------------------------------------------------------------

    def resolve_budget(self, settings: BudgetForcing, prompt_length: int) -> int:
        return settings.thinking_budget(
            prompt_length=prompt_length,
            context_length=self.lm.context_length,
            forced_end_length=max(len(ids) for ids in self.forced_end_ids.values()),
        )

    def ignore_ids(self, settings: BudgetForcing) -> list[int]:
        if settings.ignore_str not in self.ignore_cache:
            self.ignore_cache[settings.ignore_str] = _encode(self.lm, settings.ignore_str) if settings.ignore_str else []
        return self.ignore_cache[settings.ignore_str]

    def may_ignore(self, settings: BudgetForcing, max_thinking: int, thinking_tokens: int, num_ignored: int) -> bool:
        return settings.may_ignore(
            thinking_tokens=thinking_tokens,
            num_ignored=num_ignored,
            ignore_length=len(self.ignore_ids(settings)),
            max_thinking=max_thinking,
        )

    def new_row(self, index, prompt_ids, settings: BudgetForcing, *, riders=(), longest: int = 0) -> _Row:
        """A row for one prompt; its budget is resolved for the call's ``longest`` prompt (s1)."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise UserError(f"Prompt {index or 0} is empty.")
        row = _Row(
            index=index,
            settings=settings,
            max_thinking=self.resolve_budget(settings, max(longest, len(prompt_ids))),
            prompt_ids=prompt_ids,
            ids_fed=0,
            riders=list(riders),
        )
        if not settings.greedy:
            row.generator = torch.Generator(device="cpu")
            row.generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
        return row

    # ---- the loop -------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, rows: list[_Row], num_results: int, *, progress: bool = False) -> list[Result]:
        self.results = [None] * num_results
        self.started = time.perf_counter()
        rows = self._split_zero_budget_riders(rows)
        if not rows:
            return []
        device = self.lm.device
        width = max(len(row.prompt_ids) for row in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            attention_mask[b, width - len(row.prompt_ids) :] = 1
            row.ids_fed = len(row.prompt_ids)
            if row.max_thinking == 0:
                self._force_answer(row, None)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(input_ids, attention_mask, position_ids, cache, start=0)
        bar = _Progress(progress, total=sum(r.max_thinking + r.settings.max_answer_tokens for r in rows))
        try:
            while rows:
                feeds, keep = [], []
                next_rows = []
                step_logits = self._mask_logits(logits)
                argmax = step_logits.argmax(dim=-1).tolist()  # one call for every greedy row
                for b, row in enumerate(rows):
                    forks = self._advance(row, step_logits[b], argmax[b])
                    for fork in [row, *forks]:
                        if fork.finish_reason is None and fork.index is None and not fork.thinking:
                            fork.finish_reason = "trace"  # a sweep trace whose riders have all left
                        if fork.finish_reason is None and fork.ids_fed + 1 > self.lm.context_length:
                            fork.finish_reason = "length"
                        if fork.finish_reason is not None:
                            self._finish(fork)
                            continue
                        feeds.append(fork.queue.popleft())
                        fork.ids_fed += 1
                        keep.append(b)
                        next_rows.append(fork)
                bar.advance(len(next_rows))
                if not next_rows:
                    break
                if keep != list(range(len(rows))):
                    index = torch.tensor(keep, device=device)
                    cache.reorder_cache(index)
                    attention_mask = attention_mask.index_select(0, index)
                rows = next_rows
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
                position_ids = torch.tensor([[row.ids_fed - 1] for row in rows], device=device)
                step = torch.tensor(feeds, device=device).unsqueeze(1)
                logits = self._forward(step, attention_mask, position_ids, cache, start=attention_mask.shape[1] - 1)
        finally:
            bar.close()
        return self.results

    def _forward(self, input_ids, attention_mask, position_ids, cache, *, start: int) -> torch.Tensor:
        """Logits of the last position. Every row writes the same cache slots (the batch advances
        in lockstep), ``start`` onwards; saying so spares the model deriving it (~15% at batch 8)."""
        cache_position = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache_position=cache_position,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Never sample an id the tokenizer cannot decode (the embedding matrix is often larger)."""
        if logits.shape[-1] > self.lm.vocab_size:
            logits[:, self.lm.vocab_size :] = float("-inf")
        return logits

    # ---- one sequence, one step ----------------------------------------------------------

    def _advance(self, row: _Row, logits: torch.Tensor, argmax: int) -> list[_Row]:
        """Decide what ``row`` feeds next (into ``row.queue``); return rows forked off it."""
        if self.is_cancelled is not None and row.index is not None and self.is_cancelled(row.index):
            row.finish_reason = "cancelled"
            return []
        forks: list[_Row] = []
        while not row.queue and row.finish_reason is None:
            token = self._sample(row, logits, argmax)
            if row.thinking:
                forks += self._think(row, token)
            else:
                self._answer(row, token)
        return forks

    def _think(self, row: _Row, token: int) -> list[_Row]:
        forks = []
        if token in self.stop_ids:
            for rider in list(row.riders):  # sweep settings whose thinking ends here
                if not self.may_ignore(rider.settings, rider.max_thinking, len(row.thinking_ids), row.num_ignored):
                    forks.append(self._fork(row, rider, budget_reached=False))
            if self.may_ignore(row.settings, row.max_thinking, len(row.thinking_ids), row.num_ignored):
                ignore = self.ignore_ids(row.settings)
                row.num_ignored += 1
                row.queue.extend(ignore)
                self._extend_thinking(row, ignore)
                row.ban_stop = True
            else:
                self._end_thinking(row)
            return forks
        row.queue.append(token)
        self._extend_thinking(row, [token])
        written = self.written_delimiter
        if written and row.thinking_ids[-len(written) :] == written:
            # The model wrote the delimiter itself: it is in the cache already, the thinking ends.
            del row.thinking_ids[-len(written) :]
            forks = [self._fork(row, rider, budget_reached=False, delimiter_written=True) for rider in list(row.riders)]
            row.thinking = False
            self._stream(row, "thinking", final=True)
            return forks
        thinking_tokens = len(row.thinking_ids)
        for rider in list(row.riders):
            if rider.max_thinking == thinking_tokens:
                forks.append(self._fork(row, rider, budget_reached=True))
        if thinking_tokens >= row.max_thinking:
            self._force_answer(row, token)
        return forks

    def _answer(self, row: _Row, token: int) -> None:
        if token in self.end_ids:
            row.finish_reason = "stop"
            return
        row.answer_ids.append(token)
        row.answer_generated += 1
        self._stream(row, "answer")
        if row.answer_generated >= row.settings.max_answer_tokens:
            row.finish_reason = "length"
        else:
            row.queue.append(token)

    def _end_thinking(self, row: _Row) -> None:
        """Natural end: drop the stop token, append the answer delimiter."""
        row.thinking = False
        row.queue.extend(self.answer_delimiter)
        self._stream(row, "thinking", final=True)

    def _force_answer(self, row: _Row, last_token: int | None) -> None:
        """The budget is spent: append "\\n" if needed, the answer delimiter and "Final Answer:"."""
        if last_token is None:
            ends_with_newline = False  # the prompt ends with the thinking delimiter
        else:
            ends_with_newline = self.tokenizer.decode([last_token]).endswith("\n")
        forced = self.forced_end_ids[ends_with_newline]
        row.thinking = False
        row.hit_budget = True
        row.queue.extend(forced)
        self._stream(row, "thinking", final=True)
        row.answer_ids.extend(ids_after(forced, self.answer_delimiter))
        self._stream(row, "answer")

    def _fork(self, row: _Row, rider: _Rider, *, budget_reached: bool, delimiter_written: bool = False) -> _Row:
        """A copy of ``row`` that stops thinking here and answers under ``rider``'s settings."""
        row.riders.remove(rider)
        fork = _Row(
            index=rider.index,
            settings=rider.settings,
            max_thinking=rider.max_thinking,
            prompt_ids=row.prompt_ids,
            ids_fed=row.ids_fed,
            thinking_ids=list(row.thinking_ids),
            num_ignored=row.num_ignored,
        )
        if budget_reached:
            fork.queue.append(row.thinking_ids[-1])
            self._force_answer(fork, row.thinking_ids[-1])
        elif delimiter_written:
            fork.queue.append(self.written_delimiter[-1])
            fork.thinking = False
        else:
            self._end_thinking(fork)
        return fork

    def _split_zero_budget_riders(self, rows: list[_Row]) -> list[_Row]:
        """Sweep settings with a zero budget never share any thinking: give them rows of their own."""
        out = []
        for row in rows:
            for rider in [r for r in row.riders if r.max_thinking == 0]:
                row.riders.remove(rider)
                out.append(self.new_row(rider.index, row.prompt_ids, rider.settings, longest=len(row.prompt_ids)))
            out.append(row)
        return out

    def _extend_thinking(self, row: _Row, ids: list[int]) -> None:
        row.thinking_ids.extend(ids)
        self._stream(row, "thinking")

    def _sample(self, row: _Row, logits: torch.Tensor, argmax: int) -> int:
        if row.ban_stop:
            logits = logits.clone()
            logits[list(self.stop_ids)] = float("-inf")
            row.ban_stop = False
            argmax = int(torch.argmax(logits))
        if row.settings.greedy:
            return argmax
        probs = torch.softmax(logits / row.settings.temperature, dim=-1)
        if row.settings.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > row.settings.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))

    # ---- results and streaming ------------------------------------------------------------

    def _stream(self, row: _Row, channel: str, *, final: bool = False) -> None:
        """Send the new text of ``channel``: the stripped text grows by exactly what is sent."""
        if self.on_delta is None or row.index is None:
            return
        ids = row.thinking_ids if channel == "thinking" else row.answer_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=False).strip()
        if text.endswith("\ufffd") and not final:  # an incomplete UTF-8 character: wait for the rest
            return
        sent = row.streamed[channel]
        if len(text) > sent:
            self.on_delta(row.index, channel, text[sent:])
            row.streamed[channel] = len(text)

    def _finish(self, row: _Row) -> None:
        if row.index is None:
            return
        self._stream(row, "thinking", final=True)
        self._stream(row, "answer", final=True)
        decode = self.tokenizer.decode
        self.results[row.index] = Result(
            thinking=decode(row.thinking_ids, skip_special_tokens=False).strip(),
            answer=decode(row.answer_ids, skip_special_tokens=False).strip(),
            thinking_tokens=len(row.thinking_ids),
            answer_tokens=row.answer_generated,
            num_ignored=row.num_ignored,
            hit_budget=row.hit_budget,
            finish_reason=row.finish_reason,
            prompt_tokens=len(row.prompt_ids),
            seconds=time.perf_counter() - self.started,
            thinking_token_ids=list(row.thinking_ids),
            answer_token_ids=list(row.answer_ids),
        )


# --------------------------------------------------------------------------------------------
# Helpers


class _Progress:
    """A rich progress bar over generated tokens, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("generating"), BarColumn(), TextColumn("{task.completed} tokens"), TimeElapsedColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("generate", total=total)

    def advance(self, n: int) -> None:
        if self.bar:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone (no special tokens added): delimiters are concatenated as ids."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _encode(lm: LoadedModel, text: str) -> list[int]:
    return encode(lm.tokenizer, text)


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """Ids that end the assistant's turn: eos ids of the tokenizer and generation config, and
    ``<|im_end|>`` for ChatML models."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def find_ids(ids: list[int], pattern: list[int]) -> int | None:
    """Where ``pattern`` first occurs in ``ids``, or None."""
    pattern = list(pattern)
    for start in range(len(ids) - len(pattern) + 1):
        if ids[start : start + len(pattern)] == pattern:
            return start
    return None


def ids_after(ids: list[int], delimiter: list[int]) -> list[int]:
    """The ids after the first occurrence of ``delimiter`` in ``ids`` (the answer part)."""
    start = find_ids(ids, delimiter)
    return [] if start is None else ids[start + len(delimiter) :]


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


def _render_numbered(lm: LoadedModel, prompt: Prompt, index: int) -> list[int]:
    try:
        return render_prompt(lm, prompt)
    except UserError as error:
        raise UserError(f"Prompt {index}: {error}") from None
