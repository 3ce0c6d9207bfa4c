"""The slow reference for budget forcing on llama.cpp: s1's loop (``forcing_reference``, one prompt at
a time, the whole id sequence evaluated again from scratch after every intervention), with the
greedy continuations computed by llama-cpp-python's own ``Llama`` instead of transformers.

Independent of the llama.cpp runner and of the engine: only the s1 loop of ``forcing_reference``
and the prompt rendering are shared, so comparing the backend with this checks its KV-cache
continuation, batching, forks and bookkeeping on llama.cpp.

"From scratch" evaluates the prompt as one block and the later ids one by one, as the engine feeds
them: llama.cpp's CPU kernels round a block of ids differently from single ids (logits up to about
1 apart on SmolLM2-135M Q4_1), so evaluating everything as one block would make the comparison
depend on near-ties rather than on the bookkeeping under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from forcing_reference import ReferenceResult
from forcing_reference import reference_generate as s1_loop
from llama_cpp import Llama
from llama_cpp import llama_cpp as bindings

from t0s1.forcing import BudgetForcing, render_prompt


def reference_llama(gguf_path, *, context_length: int, n_batch: int = 512, n_threads: int = 2) -> Llama:
    """llama-cpp-python's ``Llama`` with the runner's numerics: no flash attention, prompts
    evaluated in blocks of ``n_batch`` (pass the runner's), and the runner's weight buffers (no
    AMX kernels where the runner turns them off: ``amx_kernels_work``)."""
    from t0s1.backends.llamacpp import _bindings, amx_kernels_work

    defaults = bindings.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = amx_kernels_work(_bindings())
        return params

    bindings.llama_model_default_params = model_params  # Llama reads its model parameters from here
    try:
        return Llama(
            str(gguf_path),
            n_ctx=context_length,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            flash_attn=False,
            verbose=False,
        )
    finally:
        bindings.llama_model_default_params = defaults


class LlamaCppGreedy:
    """What ``forcing_reference`` asks of a model: greedy ``generate`` with HF's arguments, here on
    llama.cpp, every call from scratch."""

    def __init__(self, llama: Llama):
        self.llama = llama
        self.config = SimpleNamespace(vocab_size=llama.n_vocab())
        self.generation_config = SimpleNamespace(eos_token_id=llama.token_eos())
        self.prompt_length: int | None = None  # the block evaluated at once; None: all ids

    def evaluate(self, ids: list[int]) -> None:
        """Forget everything, then evaluate the prompt as one block and each later id alone."""
        llama = self.llama
        llama.reset()
        bindings.llama_memory_clear(bindings.llama_get_memory(llama.ctx), True)
        split = self.prompt_length or len(ids)
        llama.eval(ids[:split])
        for token in ids[split:]:
            llama.eval([token])

    def last_logits(self) -> torch.Tensor:
        """The logits after the last evaluated id."""
        pointer = bindings.llama_get_logits_ith(self.llama.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.config.vocab_size,)).copy())

    def generate(self, input_ids, *, max_new_tokens, min_new_tokens=0, do_sample=False, eos_token_id=(),
                 suppress_tokens=None, stopping_criteria=None, **_unused):
        """HF ``generate`` semantics: stop after an eos id (kept in the output), no eos id among the
        first ``min_new_tokens``, ``suppress_tokens`` never, stop when ``stopping_criteria`` say so."""
        assert not do_sample, "the reference is greedy"
        ids = [int(i) for i in input_ids[0]]
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        self.evaluate(ids)
        new: list[int] = []
        while len(new) < max_new_tokens:
            logits = self.last_logits()
            logits[list(suppress_tokens or [])] = -torch.inf
            if len(new) < min_new_tokens:
                logits[sorted(eos)] = -torch.inf
            token = int(logits.argmax())
            new.append(token)
            if token in eos:
                break
            if stopping_criteria is not None and bool(stopping_criteria(torch.tensor([ids + new]), None).all()):
                break
            self.llama.eval([token])
        return torch.tensor([ids + new])


@dataclass
class ReferenceLM:
    """The parts of a ``LoadedModel`` that ``forcing_reference`` and ``render_prompt`` read."""

    model: LlamaCppGreedy
    tokenizer: object
    profile: object


def reference_generate(
    lm: ReferenceLM, prompt, settings: BudgetForcing, chat_template_kwargs: dict | None = None
) -> ReferenceResult:
    """s1's budget forcing for one prompt, greedy, every continuation re-evaluated by llama.cpp."""
    lm.model.prompt_length = len(render_prompt(lm, prompt, chat_template_kwargs).ids)
    return s1_loop(lm, prompt, settings, chat_template_kwargs)
