"""Budget forcing (s1: Simple test-time scaling), batched, continuing from the KV cache.

The decisions (when to inject "Wait", when to force the end of the thinking, what to append, per
model profile) live in ``t0s1.forcing_rules``; this module is the engine that drives them on a
model: every sequence of a batch advances one token per step, and a sequence with ids to inject
(an ignore string, a delimiter) feeds them one per step instead of sampling, so an intervention in
one sequence never disturbs another and nothing already in the cache is encoded again. Finished
sequences leave the batch; new ones can join it (``Engine.add``), which is how the server batches
continuously.

The model side is a *runner*: a KV cache that holds one sequence per slot (``TorchRunner`` for
transformers models here; ``t0s1.backends.llamacpp`` for llama.cpp). Sampling (greedy, or seeded
softmax sampling with top-p) and the vocabulary guard are done here on the runner's logits, the
same for every runner.

``generate_sweep`` runs several budgets (or numbers of ignores) at once under greedy decoding: one
thinking trace per prompt, and each setting forks off the trace, with a copy of its KV cache, at
the point where its own thinking ends. Each fork then only generates its answer; settings that
leave at the same point the same way share one fork. Prompts start as others finish, within the
number of sequences a model holds at once (``_run_admitting``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from t0s1.errors import UserError
from t0s1.forcing_rules import (
    AUTO_RESERVE_TOKENS,
    BudgetForcing,
    Prompt,
    RenderedPrompt,
    Result,
    Rider,
    per_prompt_settings,
    render_prompt_ids,
)
from t0s1.forcing_rules import Sequence as ForcedSequence
from t0s1.transformers_compat import cache_argument

__all__ = [
    "AUTO_RESERVE_TOKENS",
    "BudgetForcing",
    "Engine",
    "ForwardPassError",
    "Prompt",
    "RenderedPrompt",
    "Result",
    "TorchRunner",
    "generate",
    "generate_from_ids",
    "generate_sweep",
    "render_prompt",
    "resolve_budget",
]

LARGEST_TEMPERATURE = 1e30
"""Sampling divides the logits by at most this: any larger temperature samples as it does (every
allowed id alike, within float32's precision)."""

DeltaCallback = Callable[[int, str, str], None]
"""``on_delta(prompt_index, channel, text)``: new text of ``channel`` ("thinking" or "answer")."""


def render_prompt(lm, prompt: Prompt, chat_template_kwargs: dict | None = None) -> RenderedPrompt:
    """Prompt ids for budget forcing: the chat template with the generation prompt, then the
    thinking start (unless the template opened or closed the thinking itself)."""
    return render_prompt_ids(lm.tokenizer, lm.profile, prompt, chat_template_kwargs)


def generate(
    lm,
    prompts: Sequence[Prompt],
    budget: BudgetForcing | Sequence[BudgetForcing] | None = None,
    *,
    chat_template_kwargs: dict | None = None,
    on_delta: DeltaCallback | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
    progress: bool = False,
) -> list[Result]:
    """Generate with budget forcing for every prompt, batched. One result per prompt, in order.

    ``budget`` is one setting for all prompts (prompt i sampled with ``seed + i``), or one per
    prompt (each with its own seed). ``chat_template_kwargs`` go to the chat template (e.g.
    ``{"enable_thinking": False}`` for Qwen3). ``on_delta`` streams the text as it is generated;
    ``is_cancelled(i)`` stops prompt ``i`` early (finish_reason "cancelled").
    ``t0s1.generate`` is this function, with a test-time ``policy`` on top (``t0s1.generation``).
    """
    if isinstance(prompts, str):
        raise UserError("generate takes a list of prompts; wrap a single prompt in a list.")
    rendered = [_render_numbered(lm, prompt, i, chat_template_kwargs) for i, prompt in enumerate(prompts)]
    return generate_from_ids(lm, rendered, budget, on_delta=on_delta, is_cancelled=is_cancelled, progress=progress)


def generate_from_ids(
    lm,
    prompt_ids: Sequence[RenderedPrompt | Sequence[int]],
    budget: BudgetForcing | Sequence[BudgetForcing] | None = None,
    *,
    on_delta: DeltaCallback | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
    progress: bool = False,
) -> list[Result]:
    """``generate`` for prompts already rendered (``render_prompt``; a plain list of ids is a
    prompt that ends with the thinking start)."""
    prompts = [p if isinstance(p, RenderedPrompt) else RenderedPrompt(list(p)) for p in prompt_ids]
    budgets = per_prompt_settings(budget, len(prompts))
    rules = lm.rules
    sequences = []
    for i, (prompt, settings) in enumerate(zip(prompts, budgets, strict=True)):
        try:
            sequences.append(rules.sequence(i, prompt, settings, on_text=on_delta))
        except UserError as error:
            raise UserError(f"Prompt {i}: {error}") from None
    return _run_admitting(lm, [[sequence] for sequence in sequences], len(prompts), is_cancelled=is_cancelled, progress=progress)


def generate_sweep(lm, prompts: Sequence[Prompt], settings: Sequence[BudgetForcing], *, chat_template_kwargs: dict | None = None,
                   progress: bool = False) -> list[list[Result]]:
    """Results for every prompt under every setting: ``results[prompt][setting]``.

    Greedy only. The settings may differ in ``max_thinking_tokens`` and ``num_ignore``; each prompt
    is thought through once with the largest of both, and every setting's answer is generated from
    the point where its thinking ends. The results equal separate ``generate`` calls per setting.
    A model that holds a limited number of sequences at once (llama.cpp: 256) starts a prompt as
    soon as its rows fit within the limit even if every setting forks at once (``_run_admitting``).
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
    rules = lm.rules
    groups = []  # the sequences of each prompt
    for i, prompt in enumerate(prompts):
        rendered = _render_numbered(lm, prompt, i, chat_template_kwargs)
        limits = [_budget_numbered(rules, s, rendered, i) for s in settings]
        widest = replace(first, max_thinking_tokens=max(limits), num_ignore=max(s.num_ignore for s in settings))
        riders = [Rider(i * len(settings) + j, s, limits[j]) for j, s in enumerate(settings) if limits[j] > 0]
        group = [rules.sequence(None, rendered, widest, riders=riders)] if riders else []
        # Settings with a zero budget never share any thinking: sequences of their own.
        group += [rules.sequence(i * len(settings) + j, rendered, s) for j, s in enumerate(settings) if limits[j] == 0]
        groups.append(group)
    flat = _run_admitting(lm, groups, len(prompts) * len(settings), progress=progress)
    return [flat[i * len(settings) : (i + 1) * len(settings)] for i in range(len(prompts))]


def resolve_budget(lm, settings: BudgetForcing, prompt_length: int) -> int:
    """The thinking budget in tokens for a prompt of ``prompt_length`` tokens ("auto" resolved);
    a ``UserError`` if it does not fit the model's context."""
    return lm.rules.thinking_budget(settings, prompt_length)


# --------------------------------------------------------------------------------------------
# The engine


class ForwardPassError(RuntimeError):
    """The batched forward pass of ``Engine.step`` failed (``error``, also the cause): every sequence
    still running is lost; ``finished`` holds those that finished in that step, whose results are
    whole and should be delivered."""

    def __init__(self, error: Exception, finished: list[ForcedSequence]):
        super().__init__(f"The batched forward pass failed: {type(error).__name__}: {error}")
        self.error = error
        self.finished = finished


@dataclass
class _Row:
    """A sequence in the runner: its slot, how many of its ids are in the cache, its sampler."""

    sequence: ForcedSequence
    slot: int
    fed: int
    generator: torch.Generator | None = None


class Engine:
    """Advances sequences one token per step on a runner; sequences may join at any step.

    ``run`` generates a fixed set to the end; the server calls ``add`` and ``step`` itself.
    """

    def __init__(self, lm, *, is_cancelled: Callable[[int], bool] | None = None, runner=None,
                 on_error: Callable[[ForcedSequence, Exception], None] | None = None):
        """``on_error(sequence, error)``: a sequence whose own step raised (its sampling, its
        decisions, its text callback) leaves the batch and is handed over here while the others go
        on; without it the error propagates. A failure of the batched forward pass is no one
        sequence's: ``step`` raises ``ForwardPassError``, which holds the sequences that finished
        in that step (whole) while every running one is lost."""
        self.lm = lm
        self.runner = runner or lm.new_runner()
        self.is_cancelled = is_cancelled
        self.on_error = on_error
        self.context_length = lm.context_length
        self.vocab_size = lm.vocab_size
        self.rows: list[_Row] = []
        self.logits: torch.Tensor | None = None  # one row of logits per row of self.rows
        self.keeps: dict[tuple[int, ...], int] = {}  # prompt ids -> how many asked to keep its prefill
        self.kept: dict[tuple[int, ...], tuple[object, torch.Tensor]] = {}  # prompt ids -> (runner's copy, logits)

    @property
    def active(self) -> int:
        return len(self.rows)

    def keep_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Keep the prefilled cache of this prompt after its sequences leave: sequences of it added
        later fork that copy instead of prefilling the prompt again (DeepConf online's later
        traces). One ``release_prompt`` for each call lets it go. On a runner that cannot keep a
        copy (no ``keep``), the prompt is prefilled again."""
        key = tuple(prompt_ids)
        self.keeps[key] = self.keeps.get(key, 0) + 1

    def release_prompt(self, prompt_ids: Sequence[int]) -> None:
        key = tuple(prompt_ids)
        self.keeps[key] -= 1
        if not self.keeps[key]:
            del self.keeps[key]
            kept = self.kept.pop(key, None)
            if kept is not None:
                self.runner.drop_kept(kept[0])

    def add(self, sequences: list[ForcedSequence]) -> None:
        """Prefill the prompts of new sequences; they take part from the next ``step``. All or
        nothing: if any part fails, the engine is as it was (the slots taken are released) and the
        error is raised, so the running sequences go on and the caller may add the sequences again."""
        if not sequences:
            return
        # One prefill per distinct prompt: the other sequences of that prompt (a policy's n samples)
        # fork its KV cache, or the copy kept of it (keep_prompt).
        keys = [tuple(sequence.prompt_ids) for sequence in sequences]
        first: dict[tuple[int, ...], int] = {}
        for key in keys:
            if key not in self.kept:
                first.setdefault(key, len(first))
        prefilled, logits = self.runner.add([list(ids) for ids in first]) if first else ([], None)
        slots, kept_now = list(prefilled), []
        try:
            for key, owner in first.items():
                copy_of_prompt = self.runner.keep(prefilled[owner]) if key in self.keeps and hasattr(self.runner, "keep") else None
                if copy_of_prompt is not None:
                    self.kept[key] = (copy_of_prompt, logits[owner].clone())
                    kept_now.append(key)
            rows, rows_logits, taken = [], [], set()
            for sequence, key in zip(sequences, keys, strict=True):
                if key in first:
                    owner = first[key]
                    slot = prefilled[owner] if owner not in taken else self.runner.fork(prefilled[owner])
                    rows_logits.append(logits[owner])
                    taken.add(owner)
                else:
                    copy_of_prompt, prompt_logits = self.kept[key]
                    slot = self.runner.fork_kept(copy_of_prompt)
                    rows_logits.append(prompt_logits)
                if slot not in slots:
                    slots.append(slot)
                row = _Row(sequence, slot, fed=len(sequence.prompt_ids))
                if not sequence.settings.greedy:
                    row.generator = torch.Generator(device="cpu")
                    row.generator.manual_seed(sequence.settings.seed)
                rows.append(row)
            logits = (torch.stack(rows_logits) if len(first) < len(sequences) else logits).float()
            joined = logits if self.logits is None else torch.cat([self.logits, logits.to(self.logits.device)])
        except BaseException:
            self._undo_add(slots, kept_now)
            raise
        self.rows.extend(rows)
        self.logits = joined

    def _undo_add(self, slots: list[int], kept: list[tuple[int, ...]]) -> None:
        """Release what a failed ``add`` took: its slots and the prompt copies it kept. A release
        that fails too (the device is gone) leaves the first error to be reported."""
        for slot in slots:
            with contextlib.suppress(Exception):
                self.runner.release(slot)
        for key in kept:
            copy_of_prompt, _ = self.kept.pop(key)
            with contextlib.suppress(Exception):
                self.runner.drop_kept(copy_of_prompt)

    def step(self) -> list[ForcedSequence]:
        """One token for every sequence (sampled, or the next id it has to feed). Returns the
        sequences that finished in this step. If the forward pass that follows fails, raises
        ``ForwardPassError`` with those sequences (their results are whole); the running ones leave
        the engine, their cache is lost: close the runner."""
        if not self.rows:
            return []
        logits = self._mask_logits(self.logits)
        argmax = logits.argmax(dim=-1).tolist()  # one call for every greedy row
        finished, kept, feeds = [], [], []
        # Sequences ended between steps (a policy dropped them) free their slots before any row
        # forks: a policy's rows at once stay within what it counted.
        ended = {b for b, row in enumerate(self.rows) if row.sequence.done}
        for b in sorted(ended):
            self.runner.release(self.rows[b].slot)
            finished.append(self.rows[b].sequence)
        for b, row in enumerate(self.rows):
            if b in ended:
                continue
            try:
                rows = self._advance(row, logits[b], argmax[b])
            except Exception as error:
                if self.on_error is None:
                    raise
                self.runner.release(row.slot)
                self.on_error(row.sequence, error)
                continue
            for current in rows:
                sequence = current.sequence
                if not sequence.done and sequence.index is None and not sequence.riders:
                    sequence.finish_reason = "trace"  # a sweep trace whose riders have all left
                if not sequence.done and current.fed + 1 > self.context_length:
                    sequence.finish_reason = "length"
                if sequence.done:
                    self.runner.release(current.slot)
                    finished.append(sequence)
                    continue
                feeds.append(sequence.ids[current.fed])
                current.fed += 1
                kept.append(current)
        self.rows = kept
        try:
            self.logits = self.runner.step([row.slot for row in kept], feeds) if kept else None
        except Exception as error:
            self.rows, self.logits = [], None
            raise ForwardPassError(error, finished) from error
        return finished

    def run(self, sequences: list[ForcedSequence], num_results: int, *, progress: bool = False,
            admit: Callable[[list[ForcedSequence]], list[ForcedSequence]] | None = None, planned: int | None = None) -> list[Result]:
        """Generate ``sequences`` to the end; ``results[sequence.index]`` for each (and for each of
        its ``twins``). ``admit(finished)`` is called after every step with the sequences that
        finished in it and returns more sequences to start (continuous batching); ``planned``: the
        tokens the progress bar counts to (default: those of ``sequences``)."""
        started = time.perf_counter()
        results: list[Result | None] = [None] * num_results
        bar = _Progress(progress, total=planned if planned is not None else _planned_tokens(sequences))
        try:
            with torch.inference_mode():
                self.add(sequences)
                while self.rows:
                    try:
                        finished = self.step()
                    except ForwardPassError as failure:
                        for sequence in failure.finished:  # their streamed text ends before the error
                            if sequence.index is not None:
                                sequence.result(time.perf_counter() - started)
                        raise failure.error from None
                    for sequence in finished:
                        if sequence.index is not None:
                            results[sequence.index] = sequence.result(time.perf_counter() - started)
                            for twin in sequence.twins:  # sweep settings that answered as one
                                results[twin] = copy.deepcopy(results[sequence.index])
                    bar.advance(len(self.rows))
                    if admit is not None:
                        sequences = admit(finished)
                        self.add(sequences)
        finally:
            bar.close()
            self.runner.close()
        return results

    def _advance(self, row: _Row, logits: torch.Tensor, argmax: int) -> list[_Row]:
        """Decide ``row``'s next token (sample it if nothing is left to feed): the row and the sweep
        settings that forked off it."""
        sequence = row.sequence
        if self.is_cancelled is not None and sequence.index is not None and self.is_cancelled(sequence.index):
            sequence.cancel()
        forks = []
        while not sequence.done and row.fed >= len(sequence.ids):  # nothing left to feed: sample
            if sequence.keep_logprobs:  # a test-time policy reads the model's confidence
                top = torch.log_softmax(logits.float(), dim=-1).topk(sequence.keep_logprobs)
                sequence.note_logprobs(top.values.cpu().numpy())
            forks += sequence.accept(self._sample(row, logits, argmax))
            self._rewind(row)
        return self._forks(row, forks)

    def _rewind(self, row: _Row) -> None:
        """Cut the cache back where the sequence cut its ids (a written end delimiter)."""
        rewound = row.sequence.take_rewind()
        if rewound is None or rewound >= row.fed:
            return
        drop = row.fed - rewound
        if rewound >= len(row.sequence.ids):  # nothing new to feed: re-feed the last id for fresh logits
            drop += 1
        self.runner.rollback(row.slot, drop)
        row.fed -= drop

    def _forks(self, row: _Row, forks: list[ForcedSequence]) -> list[_Row]:
        """``row`` and a row for each sweep setting that forked off it. A trace whose last
        settings leave now (it may still be thinking: it thinks under the largest budget and the
        most ignores, which no setting left may have) hands its slot (its cache) to the last of
        them instead of copying it, and ends."""
        sequence = row.sequence
        if forks and sequence.index is None and not sequence.riders and not sequence.done:
            *copied, last = forks
            rows = [self._fork(row, fork) for fork in copied]
            heir = _Row(last, row.slot, row.fed)
            self._rewind(heir)
            return [*rows, heir]
        return [row, *(self._fork(row, fork) for fork in forks)]

    def _fork(self, row: _Row, sequence: ForcedSequence) -> _Row:
        fork = _Row(sequence, self.runner.fork(row.slot), row.fed)
        self._rewind(fork)
        return fork

    def _mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Never sample an id the tokenizer cannot decode (the embedding matrix is often larger)."""
        if logits.shape[-1] > self.vocab_size:
            logits[:, self.vocab_size :] = float("-inf")
        return logits

    def _sample(self, row: _Row, logits: torch.Tensor, argmax: int) -> int:
        banned = row.sequence.banned_ids()
        if banned:
            logits = logits.clone()
            logits[list(banned)] = float("-inf")
            argmax = int(torch.argmax(logits))
        settings = row.sequence.settings
        if settings.greedy:
            return argmax
        # A temperature past float32's range would divide the banned ids' -inf by inf (NaN); long
        # before it the distribution is uniform over the allowed ids, which this bound gives.
        probs = torch.softmax(logits.cpu() / min(settings.temperature, LARGEST_TEMPERATURE), dim=-1)
        # A temperature so small that the scaled logits overflow makes every probability NaN (the
        # softmax subtracts an infinite maximum): its limit, greedy. One entry tells (a whole-row
        # check cost 0.1 ms a token).
        if not math.isfinite(probs[argmax]):
            return argmax
        return draw_token(probs, settings.top_p, row.generator)


def draw_token(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> int:
    """A token id drawn from ``probs`` (a softmax of the scaled logits) within the top-p nucleus:
    how the engine samples, and the vLLM plugin for the rows it decides."""
    if top_p < 1:
        kept, ids = _nucleus(probs, top_p)
        return int(ids[_draw(kept, generator)])
    return _draw(probs, generator)


def _nucleus(probs: torch.Tensor, top_p: float, first: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus: the most probable ids whose mass before them is at most ``top_p``, as
    (their probabilities, largest first; their ids). It is looked for among the ``first`` most
    probable ids (a partial sort), and the whole vocabulary is sorted only when it reaches past
    them: sorting 50,000 probabilities for every sampled token cost more than the model's step."""
    for k in (min(first, probs.numel()), probs.numel()):
        top, order = torch.topk(probs, k) if k < probs.numel() else torch.sort(probs, descending=True)
        outside = top.cumsum(-1) - top > top_p
        if k == probs.numel() or bool(outside[-1]):  # the nucleus ends within these k
            kept = int((~outside).sum())  # a prefix: the mass before an id only grows
            return top[:kept], order[:kept]
    raise AssertionError("unreachable")


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index drawn with probability ``probs[i] / probs.sum()``: one uniform number against the
    cumulative sum (in float64). ``torch.multinomial`` draws one exponential per entry, about 1 ms
    for a 50,000-token vocabulary: as much as a llama.cpp step's row."""
    cumulative = probs.double().cumsum(0)
    point = torch.rand((), generator=generator, dtype=torch.float64, device=probs.device) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, point, right=True))  # never an id of probability 0
    if index >= probs.numel():  # the product rounded up to the total: the last possible id
        index = int(probs.nonzero()[-1])
    return index


# --------------------------------------------------------------------------------------------
# The transformers runner


class TorchRunner:
    """A transformers model's KV cache (``DynamicCache``) with one row per slot.

    All rows advance in lockstep: every ``step`` feeds one token to every active slot and the cache
    grows by one column. Rows are left-padded (attention mask 0) so that prompts of different
    lengths line up; a new prompt joins by being prefilled on its own and padded to the batch's
    width. A fork aliases its parent's row until the next step copies it; a rollback masks the
    row's last columns out (their positions are reused by the next tokens).
    """

    def __init__(self, model, *, pad_token_id: int = 0):
        self.model = model
        self.pad = pad_token_id
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask: torch.Tensor | None = None  # [rows, width], 1 where the cache holds a token
        self.order: list[int] = []  # the slot of each cache row
        self.lengths: dict[int, int] = {}  # tokens in the cache per slot (its next position)
        self.rollbacks: dict[int, int] = {}  # columns to mask out at the next step, per slot
        self.row_of: dict[int, int] = {}  # slot -> cache row it reads (a fork reads its parent's)
        self.next_slot = 0
        self.kept: dict[int, tuple[list[tuple[torch.Tensor, torch.Tensor]], int]] = {}  # keep(): (keys, values) per layer, length

    def add(self, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        from transformers import DynamicCache

        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, ids in enumerate(prompts):
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            mask[b, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, start=0)
        return self._attach(cache, mask, [len(ids) for ids in prompts]), logits

    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        self._arrange(slots)
        for b, slot in enumerate(slots):
            count = self.rollbacks.pop(slot, 0)
            if count:
                columns = self.mask[b].nonzero().flatten()[-count:]
                self.mask[b, columns] = 0
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(slots), 1))], dim=1)
        positions = torch.tensor([[self.lengths[slot]] for slot in slots], device=self.device)
        for slot in slots:
            self.lengths[slot] += 1
        step = torch.tensor(tokens, device=self.device).unsqueeze(1)
        return self._forward(step, self.mask, positions, self.cache, start=self.mask.shape[1] - 1)

    def fork(self, slot: int) -> int:
        new = self.next_slot
        self.next_slot += 1
        self.row_of[new] = self.row_of[slot]
        self.lengths[new] = self.lengths[slot]
        if slot in self.rollbacks:
            self.rollbacks[new] = self.rollbacks[slot]
        return new

    def rollback(self, slot: int, count: int) -> None:
        self.rollbacks[slot] = self.rollbacks.get(slot, 0) + count
        self.lengths[slot] -= count

    def keep(self, slot: int) -> int | None:
        """A copy of a slot just added (its tokens are its row's last columns), held apart from the
        batch until ``drop_kept``: ``fork_kept`` starts new slots from it. None where the cache is
        not a plain one (a sliding window drops columns)."""
        if not self._plain_cache():
            return None
        row, length = self.row_of[slot], self.lengths[slot]
        layers = [(layer.keys[row : row + 1, :, -length:].clone(), layer.values[row : row + 1, :, -length:].clone())
                  for layer in self.cache.layers]
        handle = self.next_slot  # numbered with the slots, never reused
        self.next_slot += 1
        self.kept[handle] = (layers, length)
        return handle

    def fork_kept(self, handle: int) -> int:
        """A new slot holding the kept copy ``handle`` (as ``add`` would after prefilling it)."""
        from transformers import DynamicCache

        layers, length = self.kept[handle]
        cache = DynamicCache(config=self.model.config)
        for index, (keys, values) in enumerate(layers):
            cache.update(keys.clone(), values.clone(), index)
        [slot] = self._attach(cache, torch.ones((1, length), dtype=torch.long, device=self.device), [length])
        return slot

    def _attach(self, cache, mask: torch.Tensor, lengths: list[int]) -> list[int]:
        """New slots for the rows of a prefilled ``cache`` (``mask``: 1 where it holds a token; the
        slots' token counts): the batch's cache, or joined to the running one."""
        slots = list(range(self.next_slot, self.next_slot + len(lengths)))
        self.next_slot += len(lengths)
        if self.cache is None or not self.lengths:  # no sequence left in the cache: start afresh
            self.cache, self.mask, self.order = cache, mask, list(slots)
        else:
            self._join(cache, mask, slots)
        for slot, length in zip(slots, lengths, strict=True):
            self.lengths[slot] = length
            self.row_of[slot] = self.order.index(slot)
        return slots

    def drop_kept(self, handle: int | None) -> None:
        self.kept.pop(handle, None)

    def release(self, slot: int) -> None:
        self.lengths.pop(slot, None)
        self.rollbacks.pop(slot, None)
        if not self.lengths:  # every sequence has left (a server between requests): free the cache
            self._free_rows()

    def close(self) -> None:
        self._free_rows()
        self.kept.clear()

    def _free_rows(self) -> None:
        self.cache = self.mask = None
        self.order, self.row_of = [], {}

    def _arrange(self, slots: list[int]) -> None:
        """Make the cache rows the given slots, in order: drop finished rows, copy forked ones, and
        drop the columns no row uses any more."""
        rows = [self.row_of[slot] for slot in slots]
        if rows != list(range(len(self.order))):
            index = torch.tensor(rows, device=self.device)
            self.cache.reorder_cache(index)
            self.mask = self.mask.index_select(0, index)
            used = self.mask.any(dim=0).nonzero()
            first = int(used[0]) if len(used) else self.mask.shape[1]
            if first > 0 and self._plain_cache():  # left columns that are padding for every row left
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self.order = list(slots)
        self.row_of = {slot: b for b, slot in enumerate(slots)}

    def _plain_cache(self, *caches) -> bool:
        """Whether every cache layer is a plain growing one (no sliding window, no quantization):
        only those can be padded, trimmed and joined column by column."""
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for cache in (self.cache, *caches) for layer in cache.layers)

    @property
    def can_join(self) -> bool:
        """Whether new sequences can join while others run (``add`` during generation)."""
        return self.cache is None or not self.lengths or self._plain_cache()

    def _join(self, cache, mask: torch.Tensor, slots: list[int]) -> None:
        """Append newly prefilled rows to the batch, left-padding whichever side is narrower."""
        if not self._plain_cache(cache):
            raise RuntimeError("Joining a running batch needs a model with a plain (non-sliding) KV cache.")
        width = max(self.mask.shape[1], mask.shape[1])

        def pad_left(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([pad_left(mine.keys, 2), pad_left(new.keys, 2)])
            mine.values = torch.cat([pad_left(mine.values, 2), pad_left(new.values, 2)])
        self.mask = torch.cat([pad_left(self.mask, 1), pad_left(mask, 1)])
        self.order = self.order + slots

    def _forward(self, input_ids, attention_mask, position_ids, cache, *, start: int) -> torch.Tensor:
        """Logits of the last position. Every row writes the same cache slots (the batch advances
        in lockstep), ``start`` onwards; saying so spares the model deriving it (~15% at batch 8)."""
        cache_position = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache_position=cache_position,
            **{cache_argument(self.model): cache},  # `cache` from transformers 5.24, `past_key_values` before
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()


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


def _runner_for(lm, sequences: list[ForcedSequence], *, later: Sequence[ForcedSequence] = ()):
    """A runner sized for ``sequences``, as long as the longest of them and of the ``later`` ones
    may grow (a fork is never longer than its trace): a row for each, and one for a trace with two
    or more sweep settings (when its thinking ends, the last setting to leave takes over its row;
    another one forks off it, earlier or at the same token). A llama.cpp runner allocates its KV
    cache by rows: more forks at once take theirs when they exist (the runner grows)."""
    rows = sum(1 + (len(sequence.riders) >= 2) for sequence in sequences)
    length = max((sequence.max_length for sequence in [*sequences, *later]), default=1)
    return lm.new_runner(rows=max(rows, 1), length=length)


def _planned_tokens(sequences: Sequence[ForcedSequence]) -> int:
    return sum(s.max_thinking + s.settings.max_answer_tokens for s in sequences)


def _rows_needed(group: list[ForcedSequence]) -> int:
    """The most rows a prompt's sequences hold at once: each its own, and every sweep setting may
    fork off its trace while the trace still holds its row."""
    return sum(1 + len(sequence.riders) for sequence in group)


def _result_indices(group: list[ForcedSequence]) -> set[int]:
    return {i for sequence in group for i in [sequence.index, *(rider.index for rider in sequence.riders)] if i is not None}


class Admission:
    """Continuous batching within a model's limit of sequences at once (llama.cpp: 256; none: all
    start together): which waiting items (prompts) start now. An item starts as soon as the rows it
    may hold at once (``need``, taken when it starts: a sweep's trace has fewer settings left as they
    fork, but the forks still hold rows) fit beside those of the running items that are not
    ``done``; an item that alone needs more starts when nothing else runs. Items start in order."""

    def __init__(self, items: Sequence, limit: int | None, need: Callable[[object], int], done: Callable[[object], bool]):
        self.waiting = list(reversed(items))  # the next item last
        self.running: dict = {}  # item -> the rows it may hold at once, in the order they started
        self.limit, self.need, self.done = limit, need, done

    def next(self, engine: Engine | None = None) -> list:
        """The items that start now, beside ``engine``'s running rows (call it after the step's
        own additions): none while a runner that cannot take new rows runs some."""
        if engine is not None and not engine.active:  # nothing runs, so nothing still needs rows
            self.running = {}
        self.running = {item: need for item, need in self.running.items() if not self.done(item)}
        reserved = sum(self.running.values())
        started = []
        while self.waiting:
            need = self.need(self.waiting[-1])
            if reserved and self.limit is not None and reserved + need > self.limit:
                break
            if engine is not None and engine.active and not getattr(engine.runner, "can_join", True):
                break
            item = self.waiting.pop()
            self.running[item] = need
            reserved += need
            started.append(item)
        return started


def _run_admitting(lm, groups: list[list[ForcedSequence]], num_results: int, *,
                   is_cancelled: Callable[[int], bool] | None = None, progress: bool = False) -> list[Result | None]:
    """Run ``groups`` (the sequences of one prompt each) on one engine: ``results[index]``. The
    prompts start as ``Admission`` lets them: each may hold a row per sequence and one per sweep
    setting at once (``_rows_needed``), and counts until all its results are in."""
    if not groups:
        return [None] * num_results
    indices = [_result_indices(group) for group in groups]
    arrived: set[int] = set()
    admission = Admission(range(len(groups)), getattr(lm, "max_sequences", None),
                          need=lambda k: _rows_needed(groups[k]), done=lambda k: indices[k] <= arrived)
    engine: Engine | None = None

    def admit(finished: list[ForcedSequence]) -> list[ForcedSequence]:
        for sequence in finished:
            if sequence.index is not None:
                arrived.update([sequence.index, *sequence.twins])
        return [sequence for k in admission.next(engine) for sequence in groups[k]]

    everything = [sequence for group in groups for sequence in group]
    first = admit([])
    engine = Engine(lm, is_cancelled=is_cancelled, runner=_runner_for(lm, first, later=everything))
    return engine.run(first, num_results, progress=progress, admit=admit, planned=_planned_tokens(everything))


def _render_numbered(lm, prompt: Prompt, index: int, chat_template_kwargs: dict | None = None) -> RenderedPrompt:
    try:
        return render_prompt(lm, prompt, chat_template_kwargs)
    except UserError as error:
        raise UserError(f"Prompt {index}: {error}") from None


def _budget_numbered(rules, settings: BudgetForcing, prompt: RenderedPrompt, index: int) -> int:
    if not prompt.thinking:
        return 0
    try:
        return rules.thinking_budget(settings, len(prompt.ids))
    except UserError as error:
        raise UserError(f"Prompt {index}: {error}") from None
