"""The vLLM logits processor that runs s1 budget forcing inside ``vllm serve``.

Installed with t0s1 under the ``vllm.logits_processors`` entry point, so every vLLM in the
environment loads it; it acts only on requests that ask for budget forcing (``fields``). It is a
thin adapter: one ``ForcedRow`` (a t0s1 ``Sequence``, where the s1 rules live) per batch row, kept
in step with vLLM's batch, and a mask that leaves vLLM one id to sample for each of those rows.

One class serves both of vLLM's model runners: the V1 runner (vLLM's CPU build, and GPUs with
``VLLM_USE_V2_MODEL_RUNNER=0``) calls ``update_state`` with each ``BatchUpdate`` (removed, added,
moved, in that order) and ``apply(logits)``; the V2 runner (GPUs by default) calls ``add_request``
per slot and ``apply(logits, ctx)``. vLLM's V2 loader refuses a plugin that is not a V2 processor,
so a V1-only class would stop every ``vllm serve`` on a GPU.
"""

from __future__ import annotations

import logging
import random

import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from t0s1.errors import UserError
from t0s1.forcing import draw_token
from t0s1.vllm_plugin import fields
from t0s1.vllm_plugin.rows import ForcedRow
from t0s1.vllm_plugin.served_model import served_model_for

logger = logging.getLogger(__name__)

from t0s1.vllm_plugin import PARSER_NAME

_GREEDY_EPSILON = 1e-5  # vLLM's: a temperature below it is greedy decoding
_RETIRED_ROWS = 1024  # rows kept after they leave the batch, for a request that comes back (preemption)


def t0s1_serves_thinking_token_budget() -> bool:
    """Whether this API server runs t0s1's reasoning parser (then t0s1 serves vLLM's own
    ``thinking_token_budget`` field; otherwise vLLM does)."""
    from t0s1.vllm_plugin import reasoning

    return reasoning.ACTIVE


class BudgetForcingLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """s1 budget forcing per request: ``max_thinking_tokens`` / ``thinking_token_budget``,
    ``num_ignore``, ``ignore_str``, ``max_answer_tokens`` (``vllm_xargs``)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse (400) a request whose budget fields are unknown, invalid or disagree. Runs in the
        API server before the request reaches the engine; a top-level ``thinking_token_budget`` that
        t0s1 serves is moved into ``extra_args`` here, so vLLM's own budget does not act on it too."""
        budget = sampling_params.thinking_token_budget
        extra = sampling_params.extra_args
        if fields.request_budget(extra, budget if t0s1_serves_thinking_token_budget() else None) is not None:
            fields.check_sampling(sampling_params)
        if budget is not None and t0s1_serves_thinking_token_budget():
            sampling_params.extra_args = {**(extra or {}), fields.MOVED_BUDGET: budget}
            sampling_params.thinking_token_budget = None

    def __init__(self, vllm_config, *args):
        # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, req_states).
        self.model = None
        model_config = vllm_config.model_config
        parser = getattr(vllm_config.structured_outputs_config, "reasoning_parser", "") or ""
        try:
            self.model = served_model_for(model_config)
        except UserError as error:
            if parser == PARSER_NAME:
                raise
            logger.warning("t0s1 budget forcing is off for this model: %s", error)
        self.context_length = model_config.max_model_len
        self.vocab_size = len(self.model.tokenizer) if self.model else None
        self.rows: dict[int, ForcedRow] = {}  # V1: batch index -> row; V2: request slot -> row
        self.retired: dict[int, ForcedRow] = {}  # id(output list) -> row that left the batch
        self.generators: dict[int, torch.Generator] = {}
        if len(args) == 1:  # the V2 runner
            self.req_states = args[0]
            self.device = self.req_states.device
            self.v2_params: dict[int, object] = {}
        else:
            self.req_states = None
            self.device = args[0]

    # ---- both runners ------------------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        return False  # it decides which token greedy decoding takes

    def _new_row(self, params, prompt_ids, output) -> ForcedRow | None:
        if self.model is None or prompt_ids is None:
            return None
        try:
            budget = fields.request_budget(params.extra_args, None)
        except fields.FieldError as error:  # validate_params refused it already; never reached through the API
            logger.warning("t0s1 budget forcing ignores a request: %s", error)
            return None
        if budget is None:
            return None
        rules = self.model.rules
        stops = set(getattr(params, "all_stop_token_ids", ()) or ())
        end_ids = sorted(rules.end_of_turn & stops) or sorted(rules.end_of_turn)
        row = ForcedRow.start(rules, budget.settings, list(prompt_ids), output, end_ids=end_ids,
                              max_thinking_for=self._max_thinking)
        row.greedy = params.temperature < _GREEDY_EPSILON
        row.params = params
        if not row.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
            row.generator = generator
        return row

    def _max_thinking(self, settings, prompt_length: int) -> int:
        if settings.max_thinking_tokens != "auto":
            return settings.max_thinking_tokens  # vLLM's max_tokens and context end the request if it does not fit
        try:
            return self.model.rules.thinking_budget(settings, prompt_length)
        except UserError as error:
            logger.warning("t0s1: %s", error)
            return 0

    def _force(self, logits: torch.Tensor, rows: list[tuple[int, ForcedRow]]) -> torch.Tensor:
        """Decide the next id of every forced row (``(logits row, row)``) and mask the others."""
        greedy = self._greedy_choices(logits, rows)
        chosen_rows, chosen_ids = [], []
        for index, row in rows:
            def choose(banned, index=index, row=row):
                known = greedy.get(index)
                if known is not None and known[0] == banned:
                    return known[1]
                return self._choose(logits[index], row, banned)

            token = row.decide(choose)
            if token is not None:
                chosen_rows.append(index)
                chosen_ids.append(token)
        if chosen_rows:
            where = torch.tensor(chosen_rows, device=logits.device)
            logits[where] = float("-inf")
            logits[where, torch.tensor(chosen_ids, device=logits.device)] = 0.0
        return logits

    def _greedy_choices(self, logits: torch.Tensor, rows: list[tuple[int, ForcedRow]]) -> dict[int, tuple[frozenset, int]]:
        """The argmax of every greedy row at once (one device round trip): {logits row: (banned ids, argmax)}."""
        wanted = [(index, row.sequence.banned_ids()) for index, row in rows if row.greedy and not row.detached]
        if not wanted:
            return {}
        scores = logits[torch.tensor([index for index, _ in wanted], device=logits.device)]
        scores[:, self.vocab_size :] = float("-inf")
        for position, (_, banned) in enumerate(wanted):
            if banned:
                scores[position, torch.tensor(sorted(banned), device=scores.device)] = float("-inf")
        best = scores.argmax(dim=-1).tolist()
        return {index: (banned, token) for (index, banned), token in zip(wanted, best, strict=True)}

    def _choose(self, row_logits: torch.Tensor, row: ForcedRow, banned: frozenset) -> int:
        """The model's next token as t0s1's engine takes it: never an id past the tokenizer's
        vocabulary nor a banned one; the argmax, or a draw from softmax(logits / T) within top-k / top-p."""
        scores = row_logits.clone()
        scores[self.vocab_size :] = float("-inf")
        if banned:
            scores[torch.tensor(sorted(banned), device=scores.device)] = float("-inf")
        if row.greedy:
            return int(torch.argmax(scores))
        params = row.params
        scores = scores / params.temperature
        if params.top_k and 0 < params.top_k < scores.numel():
            kth = torch.topk(scores, params.top_k).values[-1]
            scores[scores < kth] = float("-inf")
        return draw_token(torch.softmax(scores, dim=-1), params.top_p, row.generator)

    # ---- the V1 runner ------------------------------------------------------------------------

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._retire(index)
        for index, params, prompt_ids, output in batch_update.added:
            self._retire(index)
            row = self.retired.pop(id(output), None)
            if row is None or row.output is not output:
                row = self._new_row(params, prompt_ids, output)
            if row is not None:
                self.rows[index] = row
        for source, target, direction in batch_update.moved:
            moving, displaced = self.rows.pop(source, None), self.rows.pop(target, None)
            if moving is not None:
                self.rows[target] = moving
            if displaced is not None and direction == MoveDirectionality.SWAP:
                self.rows[source] = displaced

    def _retire(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None and not row.sequence.done:
            self.retired[id(row.output)] = row
            while len(self.retired) > _RETIRED_ROWS:
                self.retired.pop(next(iter(self.retired)))

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is not None:
            return self._apply_v2(logits, ctx)
        if not self.rows:
            return logits
        for row in self.rows.values():
            row.sync()
        return self._force(logits, [(index, row) for index, row in self.rows.items() if index < logits.shape[0]])

    # ---- the V2 runner ------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self.rows.pop(req_idx, None)
        self.v2_params.pop(req_idx, None)
        if self.model is None:
            return False
        try:
            wanted = fields.request_budget(sampling_params.extra_args, None) is not None
        except fields.FieldError:
            wanted = False
        if wanted:
            self.v2_params[req_idx] = sampling_params  # the row starts once the prompt is on the device
        return wanted

    def _apply_v2(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        if not self.v2_params:
            return logits
        states = self.req_states
        rows = []
        for position, slot in enumerate(ctx.idx_mapping_np.tolist()):
            if slot not in self.v2_params:
                continue
            prompt_length = int(states.prompt_len.np[slot])
            generated = int(ctx.seq_lens_upper_bound_np[position]) - prompt_length
            if generated < 0:
                continue  # a chunk of the prompt: the token sampled here is dropped
            row = self.rows.get(slot)
            if row is None:
                known = states.all_token_ids.gpu[slot, : prompt_length + generated].tolist()
                row = self._new_row(self.v2_params[slot], known[:prompt_length], known[prompt_length:])
                if row is None:
                    self.v2_params.pop(slot)
                    continue
                self.rows[slot] = row
            # The ids are on the device; the row only needs how many there are (it decided them).
            row.output.extend([-1] * (generated - len(row.output)))
            row.sync()
            rows.append((position, row))
        return self._force(logits, rows)
