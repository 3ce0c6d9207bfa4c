"""llama.cpp's own quantizer (``llama_model_quantize``, reached through llama-cpp-python's bindings):
a GGUF at the weights' precision -> the quant type asked for, with extra metadata keys.

Every export passes through it, the float types included, so that one code path writes the
metadata t0s1 adds (``llama_model_quantize_params.kv_overrides``) and every file is written by the
llama.cpp that will read it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from t0s1.errors import UserError

QUANT_TYPES = {
    # name: (llama_ftype constant, what it is)
    "f32": ("LLAMA_FTYPE_ALL_F32", "32-bit floats: exact, 4 bytes per weight"),
    "f16": ("LLAMA_FTYPE_MOSTLY_F16", "16-bit floats, 2 bytes per weight"),
    "bf16": ("LLAMA_FTYPE_MOSTLY_BF16", "bfloat16, 2 bytes per weight (the precision most models train in)"),
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", "8-bit, about 1.06 bytes per weight: close to f16"),
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", "6-bit k-quant"),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", "5-bit k-quant, some tensors at 6 bits"),
    "q5_k_s": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", "5-bit k-quant"),
    "q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", "5-bit, legacy"),
    "q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", "5-bit, legacy"),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", "4-bit k-quant, some tensors at 6 bits: the usual laptop choice"),
    "q4_k_s": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", "4-bit k-quant"),
    "q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", "4-bit, legacy"),
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", "4-bit, legacy"),
    "iq4_nl": ("LLAMA_FTYPE_MOSTLY_IQ4_NL", "4-bit non-linear"),
    "iq4_xs": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", "4.25-bit non-linear"),
    "q3_k_l": ("LLAMA_FTYPE_MOSTLY_Q3_K_L", "3-bit k-quant, some tensors at 5 bits"),
    "q3_k_m": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", "3-bit k-quant, some tensors at 4-5 bits"),
    "q3_k_s": ("LLAMA_FTYPE_MOSTLY_Q3_K_S", "3-bit k-quant"),
    "q2_k": ("LLAMA_FTYPE_MOSTLY_Q2_K", "2-bit k-quant: large quality loss"),
}
"""The quant types ``t0s1 export --quant`` writes (llama.cpp's ``llama-quantize`` names, lower
case). The 1- to 3-bit i-quants are left out: llama.cpp needs an importance matrix for them."""


def check_quant(quant: str) -> str:
    """``quant`` in lower case if t0s1 can write it; a ``UserError`` listing the types otherwise."""
    name = str(quant).strip().lower()
    if name not in QUANT_TYPES:
        raise UserError(f"Unknown quant type {quant!r}: use one of {', '.join(QUANT_TYPES)}.")
    return name


def quantize(source: Path, out: Path, quant: str, *, metadata: dict[str, str] | None = None,
             threads: int | None = None) -> None:
    """Write ``source`` (a GGUF at the weights' precision) to ``out`` as ``quant`` with the string
    ``metadata`` keys added; every other key, the tokenizer and chat template included, is copied."""
    from t0s1.backends.llamacpp import _bindings, default_threads

    ll = _bindings()
    params = ll.llama_model_quantize_default_params()
    params.ftype = getattr(ll, QUANT_TYPES[check_quant(quant)][0])
    params.nthread = threads or default_threads()
    items = list((metadata or {}).items())
    overrides = (ll.llama_model_kv_override * (len(items) + 1))()  # the last one, empty, ends the list
    for override, (key, value) in zip(overrides, items):
        key_bytes, value_bytes = key.encode(), value.encode()
        if len(key_bytes) >= 128 or len(value_bytes) >= 128:
            raise UserError(f"GGUF metadata {key}={value!r} is too long for llama.cpp's quantizer (127 bytes each).")
        override.tag = ll.LLAMA_KV_OVERRIDE_TYPE_STR
        override.key = key_bytes
        override.value.val_str = value_bytes
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(ll.llama_model_kv_override))
    code = ll.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise UserError(f"llama.cpp's quantizer could not write {quant} from {source.name} (code {code}; its log says why).")


def read_metadata(path: Path, key: str) -> str | None:
    """A string metadata value of a GGUF file, read by llama.cpp (vocabulary only: no weights are
    loaded); None if the key is absent. A ``UserError`` if llama.cpp cannot load the file."""
    from t0s1.backends.llamacpp import _bindings

    ll = _bindings()
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise UserError(f"llama.cpp cannot load {str(path)!r} (its log says why).")
    try:
        buffer = ctypes.create_string_buffer(4096)
        length = ll.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
        return buffer.value.decode() if length >= 0 else None
    finally:
        ll.llama_model_free(model)
