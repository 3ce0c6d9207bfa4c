"""llama.cpp as a model runner for the budget forcing engine: GGUF files at llama.cpp speed on a CPU.

The engine (``t0s1.forcing.Engine``) decides what every sequence feeds next and samples from the
logits; the runner only holds the model side. Each sequence lives in a *slot*, which the runner
keeps in a llama.cpp sequence id with its own KV cache stream (the streams in use are kept
contiguous: llama.cpp makes one pass over the weights per run of consecutive streams). The engine prefills new prompts while others decode,
advances several sequences in one ``llama_decode`` batch, forks a sequence (a copy of its cache:
sweeps share the thinking), drops its last tokens, and frees it. Logits come back as float32 torch
tensors so the engine's sampling and masking serve every runner.

Built on the low-level ctypes API of ``llama-cpp-python`` (``llama_cpp.llama_cpp``:
``llama_batch_init``, ``llama_decode``, ``llama_get_logits``, ``llama_memory_seq_rm``,
``llama_state_seq_get_data`` / ``_set_data``).

Numerics. llama.cpp's CPU kernels round differently for different batch shapes: a prompt
evaluated as one block and the same ids fed one by one give logits up to about 1 apart on
SmolLM2-135M Q4_1, and with flash attention the single-sequence decode path changes once the cache
passes 256 tokens. So: flash attention is off (as in llama-cpp-python's ``Llama``), and each
prompt is prefilled in a ``llama_decode`` call of its own. Then, on the embedded Q4_1 model, a
token's logits do not depend on which other sequences share its batch, and a from-scratch run that
evaluates the prompt as one block and then feeds the later ids one by one gives the same logits,
bit for bit. (K-quant models, Q4_K and the like, switch to a tiled matrix kernel at 8 or more
sequences per batch: their logits then differ from batch 1 by up to about 1.4.)
"""

from __future__ import annotations

import ctypes
import functools
import heapq
import logging
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import torch

from t0s1.errors import UserError

GGUF_MAGIC = b"GGUF"

GGUF_PROFILE_KEY = "t0s1.reasoning_profile"
"""GGUF metadata key of the reasoning profile ``t0s1 train`` recorded (``t0s1 export`` writes it)."""


def require_gguf(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a GGUF file; a ``UserError`` naming the problem otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"No GGUF file at {str(path)!r}: the llama.cpp backend takes the path of a .gguf model file.")
    with path.open("rb") as file:
        magic = file.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(
            f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes). The llama.cpp "
            "backend runs .gguf model files; use --backend transformers for a model directory."
        )
    return path


def _bindings():
    """llama-cpp-python's ctypes bindings, imported on first use (that loads the shared libraries)."""
    try:
        from llama_cpp import llama_cpp as bindings
    except ImportError:
        raise UserError("The llama.cpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
    # llama-cpp-python prints every llama.cpp log line (model metadata, timings) unless its logger
    # says otherwise; keep the errors, as its own Llama(verbose=False) does.
    logger = logging.getLogger("llama-cpp-python")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    bindings.llama_backend_init()
    return bindings


AMX_SETTING = "T0S1_LLAMACPP_AMX"
"""Environment variable: ``1`` loads models with llama.cpp's AMX kernels, ``0`` without them; unset,
they are used where a check of this llama.cpp build (``amx_kernels_work``) passes."""

_AMX_CHECK = r"""
import sys
from llama_cpp import llama_cpp as ll
ll.llama_backend_init()
params = ll.llama_model_default_params()
params.n_gpu_layers = 0
model = ll.llama_model_load_from_file(sys.argv[1].encode(), params)
if not model:
    sys.exit(3)
context_params = ll.llama_context_default_params()
context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = 64
context_params.n_threads = context_params.n_threads_batch = 2
context = ll.llama_init_from_model(model, context_params)
tokens = (ll.llama_token * 16)(*range(100, 116))
sys.exit(0 if context and ll.llama_decode(context, ll.llama_batch_get_one(tokens, 16)) == 0 else 3)
"""
"""A child process's check: the embedded model (Q4_1, a type with AMX kernels) loaded with the
extra buffer types, one batch of 16 tokens on 2 threads (the AMX matrix path, in worker threads)."""

log = logging.getLogger(__name__)


def _library_fingerprint(bindings) -> str:
    """Names, sizes and times of llama-cpp-python's shared libraries, and the CPU features llama.cpp
    reports: a check's result holds for this build on this kind of CPU."""
    import hashlib
    import importlib.util

    package = Path(importlib.util.find_spec("llama_cpp").origin).parent
    parts = [bindings.llama_print_system_info().decode(errors="replace")]
    for library in sorted((package / "lib").glob("*.so*")):
        status = library.stat()
        parts.append(f"{library.name}:{status.st_size}:{status.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


@functools.cache
def amx_kernels_work(bindings) -> bool:
    """Whether llama.cpp's Intel AMX kernels (reached through its extra weight buffer types) run in
    this build. Where the CPU has no AMX, or llama.cpp was built without it, there is nothing to
    check: True. Builds compiled by GCC 12 crash in them (a general protection fault in
    ``ggml_backend_amx_mul_mat``: GCC 12's ``_tile_loadconfig`` tells the optimizer it reads 8 of the
    tile configuration's 64 bytes, so the stores to the rest are dropped; ``make install`` builds
    llama-cpp-python with flags that keep them, docs/llamacpp.md). So the first model loaded where
    AMX is reported runs ``_AMX_CHECK`` in a child process, once per build of the libraries (the
    result is kept in the cache directory); ``T0S1_LLAMACPP_AMX`` = 1 or 0 decides instead."""
    setting = os.environ.get(AMX_SETTING, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise UserError(f"{AMX_SETTING} must be 1 (use llama.cpp's AMX kernels) or 0 (do not), got {setting!r}.")
    if b"AMX_INT8 = 1" not in bindings.llama_print_system_info():
        return True
    import json
    import subprocess
    import sys

    from t0s1.embedded import cache_dir, embedded_gguf_path
    from t0s1.files import write_text_atomic

    record = cache_dir() / "llamacpp-amx.json"
    key = _library_fingerprint(bindings)
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), bool):
        works = known[key]
    else:
        try:
            child = subprocess.run([sys.executable, "-c", _AMX_CHECK, str(embedded_gguf_path())],
                                   capture_output=True, timeout=300, check=False)
            works = child.returncode == 0
        except (OSError, subprocess.TimeoutExpired, UserError):
            works = False
        known[key] = works
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, json.dumps(known, indent=1))
        except (OSError, UserError):  # UserError: a full disk
            pass  # checked again next time
    if not works:
        log.warning(
            "llama.cpp's AMX kernels crash in this build of llama-cpp-python (compiled by GCC 12?), so models "
            "load without them: batched steps take about twice as long. Rebuild it with `make install` or: "
            "CMAKE_ARGS=\"-DCMAKE_CXX_FLAGS='-fno-tree-dse -fno-dse'\" pip install --force-reinstall --no-deps "
            "--no-cache-dir llama-cpp-python (docs/llamacpp.md). Set %s=0 to silence this.", AMX_SETTING,
        )
    return works


def default_threads() -> int:
    """As many threads as PyTorch uses (the cores, unless set otherwise, e.g. by ``t0s1 quickstart
    --threads``): llama.cpp's threads spin while they wait, so two thread pools that oversubscribe
    the cores slow each other down several times over."""
    return max(1, torch.get_num_threads())


class LlamaCppModel:
    """The weights of a GGUF file, loaded (memory-mapped) once by llama.cpp; runners share them."""

    def __init__(self, gguf_path: str | os.PathLike):
        self._model = None
        self._spare = None  # a closed runner's context, for the next runner of its shape
        self._spare_lock = threading.Lock()
        self.path = require_gguf(gguf_path)
        self._ll = ll = _bindings()
        params = ll.llama_model_default_params()
        params.n_gpu_layers = 0  # a CPU runner: on a GPU the transformers and vLLM backends serve
        params.use_extra_bufts = amx_kernels_work(ll)
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise UserError(
                f"llama.cpp could not load {str(self.path)!r} (its error is printed above): a damaged file, "
                "or an architecture this llama.cpp does not support."
            )
        self.trained_context_length = int(ll.llama_model_n_ctx_train(self._model))
        self.vocab_size = int(ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self._model)))

    def eos_token_ids(self) -> list[int]:
        """The end-of-sequence and end-of-turn ids the GGUF declares."""
        ll = self._ll
        vocab = ll.llama_model_get_vocab(self.pointer)
        ids = [int(ll.llama_vocab_eos(vocab)), int(ll.llama_vocab_eot(vocab))]
        return sorted({token for token in ids if token >= 0})

    def metadata(self, key: str) -> str | None:
        """A metadata value of the GGUF file, as text; None if the file has no such key."""
        buffer = ctypes.create_string_buffer(4096)
        length = self._ll.llama_model_meta_val_str(self.pointer, key.encode(), buffer, len(buffer))
        return buffer.value.decode() if length >= 0 else None

    @property
    def pointer(self):
        if not self._model:
            raise RuntimeError(f"The llama.cpp model {self.path.name} was closed.")
        return self._model

    def keep_context(self, shape: tuple, context, slots: int) -> None:
        """Keep a closed runner's llama.cpp context for the next runner of the same ``shape``
        (``take_context``). A new context costs about a second per 64 sequences of 512 tokens
        (llama.cpp allocates and clears its cache memory), which an eval would pay for every batch;
        one context is kept at a time (the older one is freed), until the model is closed."""
        kept = (shape, context, slots)
        with self._spare_lock:
            older, self._spare = self._spare, kept
        if older is not None:
            self._ll.llama_free(older[1])

    def take_context(self, shape: tuple, slots: int):
        """The kept context and its number of slots if it has ``shape`` and at least ``slots``
        slots (its cache emptied), else None."""
        with self._spare_lock:
            spare = self._spare
            if spare is None or spare[0] != shape or spare[2] < slots:
                return None
            self._spare = None
        context = spare[1]
        self._ll.llama_memory_clear(self._ll.llama_get_memory(context), False)  # cells beyond the new sequences are never read
        return context, spare[2]

    def close(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            self._ll.llama_free(spare[1])
        if self._model:
            self._ll.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the bindings may be gone already
            pass


class LlamaCppRunner:
    """A llama.cpp context over a GGUF model: up to ``max_slots`` sequences of ``context_length``
    tokens each, driven by the engine through ``add`` / ``step`` / ``fork`` / ``rollback`` /
    ``release``.

    ``model``: a ``LlamaCppModel`` (shared; left open by ``close``) or the path of a GGUF file
    (loaded for this runner alone). ``context_length``: tokens one sequence may hold, prompt
    included; None: the model's training context. Each slot has a KV cache stream of its own
    (llama.cpp's non-unified cache): a sequence attends over its own tokens only, so a batch of
    long unrelated sequences costs no more attention than each alone, and a fork copies the
    cells its parent holds. ``max_slots``: the slots the context starts with; when a fork or a new
    prompt finds none free, the context grows (twice the slots, up to llama.cpp's limit of
    ``slot_limit`` sequences, 256): a new context takes over the sequences' cells, so cache is
    taken for the sequences that exist, not for every one that might. Memory: ``max_slots x
    context_length`` cache cells. A closed runner's context is kept by the model for the next
    runner of the same context length (with as many slots or more), which then starts without the
    cost of a new one. ``n_threads``: CPU threads (default: the cores available).
    ``n_batch``: tokens per ``llama_decode`` call (longer prefills are split). There is no seed:
    the engine samples from the logits.
    """

    def __init__(
        self,
        model: LlamaCppModel | str | os.PathLike,
        *,
        context_length: int | None = None,
        max_slots: int = 1,
        n_threads: int | None = None,
        n_batch: int = 512,
    ):
        self._context = self._batch = None
        self._owns_model = not isinstance(model, LlamaCppModel)
        self.model = LlamaCppModel(model) if self._owns_model else model
        self._ll = ll = self.model._ll
        try:
            self._open(ll, context_length, max_slots, n_threads, n_batch)
        except BaseException:
            self.close()
            raise

    def _open(self, ll, context_length, max_slots, n_threads, n_batch) -> None:
        trained = self.model.trained_context_length
        if context_length is None:
            context_length = trained
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
            raise UserError(f"context_length must be a positive number of tokens, got {context_length!r}.")
        if context_length > trained:
            raise UserError(
                f"context_length={context_length} is longer than the {trained} tokens {self.model.path.name} "
                f"was trained on; use at most {trained}."
            )
        most = ll.llama_max_parallel_sequences()
        if isinstance(max_slots, bool) or not isinstance(max_slots, int) or not 1 <= max_slots <= most:
            raise UserError(f"The number of concurrent sequences must be between 1 and {most}, got {max_slots!r}.")
        self.context_length = context_length
        self.slot_limit = most
        self.vocab_size = self.model.vocab_size
        self.n_threads = n_threads or default_threads()
        self.n_batch = max(1, min(n_batch, context_length * max_slots))
        self._shape = (context_length, self.n_threads, self.n_batch)
        kept = None if self._owns_model else self.model.take_context(self._shape, max_slots)
        if kept is not None:
            self._context, max_slots = kept
            self._memory = ll.llama_get_memory(self._context)
        else:
            self._context, self._memory = self._new_context(max_slots)
        self.max_slots = max_slots
        # A batch of single tokens, each in exactly one sequence; numpy views fill it without a
        # Python loop per field.
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._positions = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._wants_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))[:] = 1
        self._lengths: dict[int, int] = {}  # tokens in the cache of each slot in use
        self._free = list(range(max_slots))  # a heap of the slots not in use, the lowest first
        # The engine's slots are names; each lives in a KV cache stream (a llama.cpp sequence id).
        # llama.cpp decodes a batch of a non-unified cache in runs of consecutive streams, one pass
        # over the weights per run: the streams in use are kept to 0..n-1 (a freed stream takes the
        # last one's cells), so a step is one pass however sequences end and fork.
        self._stream: dict[int, int] = {}  # slot -> its stream
        self._slot_in: list[int] = []  # stream -> the slot living in it
        self._state = bytearray()  # a sequence's cells in transit (forks, growth)

    def _new_context(self, slots: int):
        """A llama.cpp context of ``slots`` KV cache streams of ``context_length`` cells each."""
        ll = self._ll
        params = ll.llama_context_default_params()
        params.n_ctx = self.context_length * slots  # llama.cpp splits it evenly between the streams
        params.n_seq_max = slots
        params.kv_unified = False
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.n_threads
        params.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED  # see the module docstring
        params.no_perf = True
        context = ll.llama_init_from_model(self.model.pointer, params)
        if not context:
            raise UserError(
                f"llama.cpp could not create a context of {slots} x {self.context_length} tokens for "
                f"{self.model.path.name} (out of memory?): lower the context length or the number of "
                "concurrent sequences."
            )
        return context, ll.llama_get_memory(context)

    # ---- the interface the engine drives ------------------------------------------------

    def add(self, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        """Prefill new sequences (others may be mid-generation): their slots, and the logits of
        each prompt's last position, ``[len(prompts), vocab_size]``."""
        prompts = [[int(token) for token in ids] for ids in prompts]
        for ids in prompts:
            if not ids:
                raise UserError("Cannot start a sequence from an empty prompt.")
            if len(ids) > self.context_length:
                raise UserError(
                    f"The prompt has {len(ids)} tokens but the llama.cpp context holds {self.context_length} per "
                    "sequence: shorten the prompt or raise the context length."
                )
        slots = self._take(len(prompts))
        logits = []
        try:
            for slot, ids in zip(slots, prompts, strict=True):  # one call per prompt: see the module docstring
                last = len(ids) - 1
                stream = self._stream[slot]
                logits.append(self._decode([(stream, position, token, position == last) for position, token in enumerate(ids)]))
                self._lengths[slot] = len(ids)
        except BaseException:
            for slot in slots:
                self._drop(slot)
            raise
        return slots, torch.cat(logits) if logits else torch.empty((0, self.vocab_size))

    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each slot, all in one batch: the logits after each, ``[len(slots), vocab_size]``."""
        if len(slots) != len(tokens):
            raise ValueError(f"step got {len(slots)} slots and {len(tokens)} tokens.")
        if len(set(slots)) != len(slots):
            raise ValueError(f"step got a slot twice: {slots}.")
        for slot in slots:
            if self._length(slot) >= self.context_length:
                raise UserError(
                    f"A sequence filled the llama.cpp context of {self.context_length} tokens: raise the context "
                    "length or lower the thinking and answer budgets."
                )
        # llama.cpp decodes the tokens of a non-unified cache in runs of consecutive streams (one
        # pass over the weights per run): feed them in stream order, hand the logits back in the
        # caller's.
        streams = [self._stream[slot] for slot in slots]
        order = sorted(range(len(slots)), key=streams.__getitem__)
        logits = self._decode([(streams[i], self._lengths[slots[i]], int(tokens[i]), True) for i in order])
        for slot in slots:
            self._lengths[slot] += 1
        if any(i != b for b, i in enumerate(order)):
            back = torch.empty(len(order), dtype=torch.long)
            back[order] = torch.arange(len(order))
            logits = logits[back]
        return logits

    def fork(self, slot: int) -> int:
        """A new slot whose cache is a copy of ``slot``'s; the two then continue independently."""
        length = self._length(slot)
        (new,) = self._take(1)
        # llama_memory_seq_cp between streams would copy the whole stream buffer (and re-plan the
        # compute graph at the next decode); the sequence's state copies the cells it holds.
        try:
            self._copy_state(self._context, self._stream[slot], self._context, self._stream[new])
        except BaseException:  # the slot taken goes back, as with fork_kept
            self._drop(new)
            raise
        self._lengths[new] = length
        return new

    def keep(self, slot: int) -> tuple:
        """A copy of ``slot``'s cache held apart from the context (the saved cells: no slot, no
        stream, so the streams in use stay consecutive), until dropped: ``fork_kept`` starts new
        slots from it."""
        length, stream = self._length(slot), self._stream[slot]
        return bytes(self._saved_state(self._context, stream)), stream, self.max_slots, length

    def fork_kept(self, kept: tuple) -> int:
        """A new slot holding the copy ``kept`` (``keep``), as if its prompt had just been prefilled."""
        data, stream, streams, length = kept
        (new,) = self._take(1)  # first: the context may grow
        try:
            if streams != self.max_slots:  # the context has grown since the copy was saved
                data = _restream(data, stream, streams, self.max_slots)
            self._restore_state(self._context, data, self._stream[new])
        except BaseException:
            self._drop(new)
            raise
        self._lengths[new] = length
        return new

    def drop_kept(self, kept: tuple) -> None:
        """Nothing to free in llama.cpp: the copy is Python bytes."""

    def rollback(self, slot: int, count: int) -> None:
        """Drop the last ``count`` tokens of ``slot``'s cache. Feed a token next: the logits after
        the kept tokens are not stored."""
        length = self._length(slot)
        if not 0 <= count <= length:
            raise ValueError(f"Cannot roll back {count} tokens of a sequence of {length}.")
        if count and not self._ll.llama_memory_seq_rm(self._memory, self._stream[slot], length - count, -1):
            raise RuntimeError(f"llama.cpp cannot cut a sequence of {self.model.path.name} short (a recurrent model?).")
        self._lengths[slot] = length - count

    def release(self, slot: int) -> None:
        """``slot``'s sequence is done: free its cache cells and the slot."""
        self._length(slot)
        self._drop(slot)

    def length(self, slot: int) -> int:
        """Tokens in ``slot``'s cache."""
        return self._length(slot)

    @property
    def free_slots(self) -> int:
        """Slots free without growing the context."""
        return len(self._free)

    def close(self) -> None:
        """End the runner: its context goes to the model for the next runner of the same shape
        (``LlamaCppModel.keep_context``), or is freed if the runner loaded the model (the model
        too). A runner garbage collected unclosed frees its context."""
        self._end(keep_context=True)

    def _end(self, *, keep_context: bool) -> None:
        ll = getattr(self, "_ll", None)
        if ll is not None:
            if self._batch is not None:
                ll.llama_batch_free(self._batch)
                self._batch = None
            if self._context:
                if not keep_context or self._owns_model or not self.model._model:
                    ll.llama_free(self._context)
                else:
                    self.model.keep_context(self._shape, self._context, self.max_slots)
                self._context = self._memory = None
        if getattr(self, "_owns_model", False) and getattr(self, "model", None) is not None:
            self.model.close()

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            # Not kept: a finalizer may run while this thread holds the model's lock of kept contexts.
            self._end(keep_context=False)
        except Exception:  # interpreter shutdown: the bindings may be gone already
            pass

    # ---- internals ----------------------------------------------------------------------

    def _length(self, slot: int) -> int:
        if not self._context:  # every slot operation starts here: none touches freed memory
            raise RuntimeError("The llama.cpp runner was closed.")
        try:
            return self._lengths[slot]
        except KeyError:
            raise ValueError(f"Slot {slot} holds no sequence.") from None

    def _drop(self, slot: int) -> None:
        """Free ``slot`` and its stream; the last stream in use moves into it (its cells copied),
        so the streams in use stay 0..n-1."""
        self._lengths.pop(slot, None)
        stream = self._stream.pop(slot, None)
        if stream is not None:
            self._ll.llama_memory_seq_rm(self._memory, stream, -1, -1)
            last = len(self._slot_in) - 1
            moved = self._slot_in.pop()
            if stream != last:
                if moved in self._lengths:  # else taken but not yet filled
                    self._copy_state(self._context, last, self._context, stream)
                    self._ll.llama_memory_seq_rm(self._memory, last, -1, -1)
                self._slot_in[stream], self._stream[moved] = moved, stream
        if slot not in self._free:
            heapq.heappush(self._free, slot)

    def _take(self, count: int) -> list[int]:
        """``count`` free slots, the lowest first, each in the next free stream; the context grows
        if too few are free."""
        if count > len(self._free):
            self._grow(count - len(self._free))
        slots = [heapq.heappop(self._free) for _ in range(count)]
        for slot in slots:
            self._stream[slot] = len(self._slot_in)
            self._slot_in.append(slot)
        return slots

    def _grow(self, missing: int) -> None:
        """Move every sequence to a context with more slots (twice as many, or as many more as
        are missing), up to llama.cpp's limit."""
        slots = min(self.slot_limit, max(2 * self.max_slots, self.max_slots + missing))
        if slots - self.max_slots < missing:
            raise RuntimeError(
                f"{missing} more sequences than the {self.max_slots} slots in use; llama.cpp holds at most "
                f"{self.slot_limit} at once (run them in waves)."
            )
        context, memory = self._new_context(slots)
        try:
            for stream, slot in enumerate(self._slot_in):
                if slot in self._lengths:
                    self._copy_state(self._context, stream, context, stream, streams=(self.max_slots, slots))
        except BaseException:
            self._ll.llama_free(context)
            raise
        self._ll.llama_free(self._context)
        self._context, self._memory = context, memory
        for slot in range(self.max_slots, slots):
            heapq.heappush(self._free, slot)
        self.max_slots = slots

    def _copy_state(self, source, stream: int, target, new: int, *, streams: tuple[int, int] | None = None) -> None:
        """Copy ``stream``'s cells (positions, keys, values: the bytes, so the copy computes what the
        original would) from context ``source`` to stream ``new`` of context ``target``.
        ``streams``: the two contexts' numbers of streams, where they differ."""
        data = self._saved_state(source, stream)
        if streams is not None and streams[0] != streams[1]:
            data = _restream(bytes(data), stream, *streams)
        self._restore_state(target, data, new)

    def _saved_state(self, context, stream: int):
        """``stream``'s cells as llama.cpp saves them, in the runner's reused buffer (copy to keep)."""
        ll = self._ll
        size = ll.llama_state_seq_get_size(context, stream)
        if len(self._state) < size:
            self._state = bytearray(size)
        buffer = (ctypes.c_uint8 * size).from_buffer(self._state)
        if ll.llama_state_seq_get_data(context, buffer, size, stream) != size:
            raise RuntimeError("llama.cpp could not save a sequence's cache.")
        return buffer

    def _restore_state(self, context, data, stream: int) -> None:
        """Restore saved cells (``_saved_state``, or bytes) into ``stream`` of ``context``."""
        size = len(data)
        if isinstance(data, bytes | bytearray):
            data = (ctypes.c_uint8 * size).from_buffer_copy(data)
        if self._ll.llama_state_seq_set_data(context, data, size, stream) != size:
            raise RuntimeError("llama.cpp could not restore a sequence's cache.")

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Decode ``(slot, position, token, wants_logits)`` rows, ``n_batch`` per call: the logits
        of the rows that want them, in order."""
        if not self._context:
            raise RuntimeError("The llama.cpp runner was closed.")
        out = []
        for start in range(0, len(rows), self.n_batch):
            chunk = rows[start : start + self.n_batch]
            n = len(chunk)
            slots, positions, tokens, wants = zip(*chunk, strict=True)
            self._tokens[:n] = tokens
            self._positions[:n] = positions
            self._wants_logits[:n] = wants
            seq_ids = self._batch.seq_id
            for i, slot in enumerate(slots):
                seq_ids[i][0] = slot
            self._batch.n_tokens = n
            code = self._ll.llama_decode(self._context, self._batch)
            if code != 0:
                raise RuntimeError(f"llama_decode failed (code {code}) on a batch of {n} tokens.")
            outputs = sum(wants)
            if outputs:  # the rows that asked for logits, contiguous, in batch order
                logits = np.ctypeslib.as_array(self._ll.llama_get_logits(self._context), shape=(outputs, self.vocab_size))
                out.append(torch.from_numpy(logits.copy()))
        if not out:
            return torch.empty((0, self.vocab_size))
        return out[0] if len(out) == 1 else torch.cat(out)


def _restream(state: bytes, stream: int, streams: int, new_streams: int) -> bytes:
    """A sequence's saved cache (``llama_state_seq_get_data`` of a non-unified cache) for a
    context with ``new_streams`` streams instead of ``streams``. The saved form: a magic number and
    the sequence id, the number of streams, then per stream a cell count and, when not zero, those
    cells. A sequence's cells are all in its own stream and llama.cpp restores them into the
    target sequence's stream, so they go first and the other streams say zero cells."""
    word = struct.calcsize("<I")
    head, before, after = 2 * word, word * stream, word * (streams - 1 - stream)
    cells = state[head + word + before : len(state) - after]
    if struct.unpack_from("<I", state, head)[0] != streams or any(state[head + word : head + word + before]) \
            or any(state[len(state) - after :]) or len(cells) < word:
        raise RuntimeError("Unexpected layout of a llama.cpp sequence state: this llama-cpp-python is not supported.")
    return state[:head] + struct.pack("<I", new_streams) + cells + bytes(word * (new_streams - 1))


# --------------------------------------------------------------------------------------------
# The model as the engine sees it


class LlamaCppLoadedModel:
    """A GGUF model on llama.cpp, ready for budget forcing: what ``load_model(..., backend="llamacpp")``
    returns. It has what the engine reads from a transformers ``LoadedModel`` (tokenizer, profile,
    rules, context length, vocabulary size, ``new_runner``), so ``t0s1.generate``,
    ``generate_sweep``, eval and the server run on it unchanged, with the same decision code.

    ``weights``: the llama.cpp model (``LlamaCppModel``). The tokenizer is the GGUF's own, as
    transformers reads it (the same ids as llama.cpp's tokenizer; prompts are rendered with its
    chat template and fed to llama.cpp as ids). ``context_length``: tokens one sequence may hold
    (default: the model's training context). ``n_threads``: CPU threads (default: all cores).
    """

    backend = "llamacpp"

    def __init__(self, weights: LlamaCppModel, tokenizer, detection, name: str, *, context_length: int | None = None,
                 n_threads: int | None = None):
        self.weights = weights
        self.tokenizer = tokenizer
        self.detection = detection
        self.profile = detection.profile
        self.name = name
        self.context_length = context_length or weights.trained_context_length
        self.n_threads = n_threads
        self.device = torch.device("cpu")
        self.vocab_size = len(tokenizer)
        self._rules = None

    @property
    def model(self) -> LlamaCppModel:
        return self.weights

    @property
    def rules(self):
        """The budget forcing decisions for this tokenizer and profile (``t0s1.forcing_rules``)."""
        if self._rules is None:
            from transformers import GenerationConfig

            from t0s1.forcing_rules import ForcingRules

            eos = self.weights.eos_token_ids()
            self._rules = ForcingRules(self.tokenizer, self.profile, GenerationConfig(eos_token_id=eos),
                                       context_length=self.context_length)
        return self._rules

    @property
    def max_sequences(self) -> int:
        """The most sequences a runner holds at once (llama.cpp's limit); sweeps run in waves."""
        return int(self.weights._ll.llama_max_parallel_sequences())

    def new_runner(self, rows: int | None = None, length: int | None = None) -> LlamaCppRunner:
        """A llama.cpp context for ``rows`` sequences of up to ``length`` tokens each, to start with
        (it grows when more exist at once; default: 8 rows of the whole context)."""
        # llama.cpp gives each stream a multiple of 256 cells: ask for that, not less.
        length = min(-(-(length or self.context_length) // 256) * 256, self.context_length)
        return LlamaCppRunner(self.weights, context_length=length, max_slots=rows or 8, n_threads=self.n_threads)


#: Converted GGUF tokenizers kept at most (one per GGUF path; the least recently used go first).
MAX_KEPT_TOKENIZERS = 16


def gguf_tokenizer(path: Path, *, trust_remote_code: bool = False):
    """The GGUF file's tokenizer as transformers reads it. Reading it from the GGUF takes about 6 s
    for a 49,000-token vocabulary (every entry goes through gguf-py), so it is kept, converted, in
    the cache directory, and later loads read that copy (a tenth of the time).

    One copy per GGUF path (as given: a link is a path of its own), with the file it came from (size, modification time) and the
    transformers release that wrote it: a new file at that path (a re-export) replaces it, and so
    does a copy that no longer loads. At most ``MAX_KEPT_TOKENIZERS`` copies are kept; the least
    recently used go. A cache that cannot be written only costs the time."""
    import hashlib
    import json

    import transformers
    from transformers import AutoTokenizer

    from t0s1.embedded import cache_dir
    from t0s1.files import atomic_directory, read_json_object

    stat = path.stat()
    source = {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "transformers": transformers.__version__}
    kept_dir = cache_dir() / "gguf-tokenizers"
    kept = kept_dir / hashlib.sha256(source["path"].encode()).hexdigest()[:24]
    record = kept / "t0s1-source.json"
    if read_json_object(record) == source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(kept))
            os.utime(kept)  # recently used
            return tokenizer
        except (OSError, ValueError) as error:  # a damaged copy: read the GGUF again and replace it
            log.info("Replacing the kept tokenizer %s (%s)", kept, error)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code)
    try:
        shutil.rmtree(kept, ignore_errors=True)  # an older file's copy, or a damaged one
        with atomic_directory(kept) as staging:
            tokenizer.save_pretrained(staging)
            (staging / record.name).write_text(json.dumps(source))
        _forget_least_used(kept_dir, MAX_KEPT_TOKENIZERS)
    except (OSError, UserError) as error:
        log.info("Could not keep the tokenizer of %s in %s (%s)", path, kept, error)
    return tokenizer


def _forget_least_used(directory: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently used entries of ``directory`` (staging
    directories of writers still at work, hidden, are left alone)."""
    entries = [entry for entry in directory.iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    entries.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
    for entry in entries[keep:]:
        shutil.rmtree(entry, ignore_errors=True)


def load_llamacpp(name_or_path: str, *, trust_remote_code: bool = False, reasoning_format=None,
                  context_length: int | None = None, n_threads: int | None = None) -> LlamaCppLoadedModel:
    """A GGUF file (or the embedded default) on llama.cpp, with its tokenizer and model profile."""
    from transformers import AutoTokenizer

    from t0s1.embedded import EMBEDDED_MODEL, embedded_cache_path, embedded_gguf_path
    from t0s1.profiles import PROFILE_KEY, detect_profile

    path = embedded_gguf_path() if name_or_path == EMBEDDED_MODEL else Path(name_or_path).expanduser()
    if path.is_dir() or not path.exists() and not path.name.endswith(".gguf"):
        raise UserError(
            f"--backend llamacpp runs a .gguf model file, not {name_or_path!r}; use --backend transformers for a "
            "model directory or a hub id."
        )
    weights = LlamaCppModel(path)  # checks the file is GGUF first
    try:
        if name_or_path == EMBEDDED_MODEL and (embedded_cache_path() / "tokenizer.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(str(embedded_cache_path()))  # its converted copy
        else:
            tokenizer = gguf_tokenizer(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        weights.close()
        raise UserError(f"Could not read the tokenizer of {str(path)!r}: {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > weights.vocab_size:
        weights.close()
        raise UserError(f"The tokenizer of {path.name} has {len(tokenizer)} tokens but llama.cpp's vocabulary has {weights.vocab_size}.")
    recorded = weights.metadata(GGUF_PROFILE_KEY)  # the profile t0s1 train recorded, carried by t0s1 export
    if recorded and PROFILE_KEY not in tokenizer.init_kwargs:
        tokenizer.init_kwargs[PROFILE_KEY] = recorded
    detection = detect_profile(tokenizer, reasoning_format)
    return LlamaCppLoadedModel(weights, tokenizer, detection, name_or_path, context_length=context_length, n_threads=n_threads)
