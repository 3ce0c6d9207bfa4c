"""``export_gguf``: a model directory that ``t0s1 train`` wrote -> one GGUF file.

1. Check the input: a model directory (full weights, or a LoRA adapter), a known quant type, an
   output path that is free (or ``overwrite``).
2. A LoRA adapter directory is merged into its base model first (peft ``merge_and_unload``).
3. The converter (``t0s1.export.converter``) writes a GGUF at the weights' own precision: the
   tokenizer with its special tokens, the chat template, the generation config's end tokens.
4. llama.cpp's quantizer (``t0s1.export.quantize``) writes the quant type asked for and adds the
   reasoning profile ``t0s1 train`` recorded, if any (``t0s1.reasoning_profile``; the llama.cpp
   backend reads it back), so a custom pair of delimiters survives the export too. Without one,
   the profile is detected from the chat template in the file, as from the directory.
5. llama.cpp loads the result (vocabulary only) before it is renamed to OUT: a failure at any
   step leaves OUT as it was. Everything in between lives in a temporary folder beside OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from t0s1.backends.llamacpp import GGUF_PROFILE_KEY
from t0s1.errors import UserError
from t0s1.files import left_by_dead_processes, read_json_object, writing
from t0s1.export.converter import convert
from t0s1.export.quantize import check_quant, quantize, read_metadata

_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
"""The converter's output type for each weight dtype: the first GGUF keeps the weights exact."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    quant: str
    size_bytes: int
    seconds: float
    profile: str  # the reasoning profile of the model (its name, or START,END for a custom pair)
    recorded: bool  # written to the file (t0s1 train recorded it), else detected from the chat template
    merged_lora: bool  # the directory was a LoRA adapter, merged into its base model first
    modelfile: Path | None = None

    def summary(self) -> str:
        size = f"{self.size_bytes / 1e6:.0f} MB" if self.size_bytes < 1e9 else f"{self.size_bytes / 1e9:.2f} GB"
        origin = "recorded by t0s1 train" if self.recorded else "from the chat template"
        text = f"Wrote {self.path} ({self.quant}, {size}, reasoning profile {self.profile} {origin}) in {self.seconds:.0f} s"
        if self.modelfile:
            text += f"; Ollama: ollama create NAME -f {self.modelfile}"
        return text + "."


def default_gguf_path(model_dir: str | os.PathLike, quant: str) -> Path:
    """``<MODEL_DIR>.<quant>.gguf`` beside the directory (where ``t0s1 train --gguf`` writes). Not
    inside it: transformers, reading a GGUF's tokenizer, would mix in the directory's files."""
    model_dir = Path(os.path.abspath(Path(model_dir).expanduser()))  # beside the path given, a link not followed
    return model_dir.parent / f"{model_dir.name}.{check_quant(quant)}.gguf"


def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    quant: str = "q8_0",
    *,
    ollama: bool = False,
    overwrite: bool = False,
    base_model: str | None = None,
    threads: int | None = None,
    log=print,
) -> ExportResult:
    """Export ``model_dir`` (a model directory or a LoRA adapter directory) to the GGUF file
    ``out`` as ``quant`` (``QUANT_TYPES``). ``ollama``: write a Modelfile beside it.
    ``base_model``: the base of a LoRA adapter, when its adapter_config.json names one that is not
    here. A ``UserError`` says what was wrong; OUT is then untouched."""
    started = time.perf_counter()
    quant = check_quant(quant)
    out = Path(out).expanduser()
    model_dir = Path(model_dir).expanduser()
    _check_output(out, overwrite)
    if ollama:
        from t0s1.export.ollama import modelfile_path

        if modelfile_path(out).exists() and not overwrite:
            raise UserError(f"{str(modelfile_path(out))!r} exists: pass --overwrite to replace it (and the GGUF), or choose another path.")
    is_adapter = _check_model_dir(model_dir)
    if model_dir.resolve() in out.resolve().parents:
        raise UserError(
            f"Write the GGUF file outside the model directory {str(model_dir)!r} (e.g. {default_gguf_path(model_dir, quant)}): "
            "transformers, reading the file's tokenizer, would mix in the directory's tokenizer files."
        )
    tokenizer = _load_tokenizer(model_dir)
    profile, recorded = _profile(tokenizer)
    metadata = {GGUF_PROFILE_KEY: profile} if recorded else {}
    stop = _stop_tokens(model_dir, tokenizer) if ollama else []  # a bad generation_config.json fails now, not after
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"Cannot write {str(out)!r}: a part of its folder path is a file, not a folder.") from None
    except OSError as error:
        raise UserError(f"Cannot write {str(out)!r}: {error.strerror or error}.") from None
    _remove_abandoned_work(out)
    try:
        staging = tempfile.TemporaryDirectory(dir=out.parent, prefix=_work_prefix(out) + f"{os.getpid()}.")
    except OSError as error:
        raise UserError(f"Cannot write in {str(out.parent)!r} ({error.strerror or error}): choose another path.") from None
    with staging as work:
        work = Path(work)
        source = merge_adapter(model_dir, work / "merged", base_model, log) if is_adapter else model_dir
        config = _config(source)
        precision = _PRECISION.get(config.get("dtype") or config.get("torch_dtype"), "f32")
        log(f"Converting {model_dir} to GGUF ({precision})...")
        first = work / f"converted.{precision}.gguf"
        convert(source, first, precision, model_name=model_dir.resolve().name, log=log)
        log(f"Writing {quant} with llama.cpp's quantizer...")
        partial = work / f"quantized-{out.name}"  # never the converted file, whatever OUT is called
        quantize(first, partial, quant, metadata=metadata, threads=threads)
        if read_metadata(partial, GGUF_PROFILE_KEY) != metadata.get(GGUF_PROFILE_KEY):  # llama.cpp here loads it
            raise UserError(f"The GGUF written for {model_dir} lacks its reasoning profile: please report this.")
        os.replace(partial, out)  # atomic: OUT is either the old file or the whole new one
    modelfile = None
    if ollama:
        from t0s1.export.ollama import write_modelfile

        modelfile = write_modelfile(out, tokenizer, stop=stop, context_length=_context(config))
    return ExportResult(out, quant, out.stat().st_size, round(time.perf_counter() - started, 1), profile, recorded,
                        is_adapter, modelfile)


def _work_prefix(out: Path) -> str:
    """The name start of an export's working folder beside ``out`` (then the process id)."""
    return f".{out.name}.t0s1-export."


def _remove_abandoned_work(out: Path) -> None:
    """Working folders beside ``out`` left by exports that were killed (their process is gone):
    they hold converted weights, gigabytes for a large model."""
    for entry in left_by_dead_processes(out.parent, _work_prefix(out)):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def merge_adapter(adapter_dir: Path, target: Path, base_model: str | None = None, log=print) -> Path:
    """The base model with the LoRA adapter of ``adapter_dir`` merged in, saved (safetensors,
    tokenizer, generation config) to ``target``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from t0s1.models import clear_quantization_flags, resolve_model_source

    base = base_model or _adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{str(adapter_dir)!r} is a LoRA adapter whose adapter_config.json names no base model: give --base-model.")
    log(f"Merging the LoRA adapter {adapter_dir} into {base}...")
    try:
        source, gguf_file = resolve_model_source(str(base))
    except UserError as error:
        raise UserError(f"The base model of the LoRA adapter {str(adapter_dir)!r} is not available ({error}) Give --base-model.") from None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto" if not gguf_file else torch.float32, **kwargs)
    if gguf_file:
        clear_quantization_flags(model)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    with writing(target, "Nothing was exported."):
        merged.save_pretrained(target)
        _load_tokenizer(adapter_dir).save_pretrained(target)
    if (adapter_dir / "generation_config.json").exists():
        shutil.copy(adapter_dir / "generation_config.json", target / "generation_config.json")
    return target


def _check_output(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise UserError(f"The output {str(out)!r} should end in .gguf (llama.cpp, LM Studio and Ollama look for it).")
    if out.is_dir():
        raise UserError(f"The output {str(out)!r} is a directory: give the path of the .gguf file to write.")
    if out.exists() and not overwrite:
        raise UserError(f"{str(out)!r} exists: pass --overwrite to replace it, or choose another path.")


def _adapter_config(adapter_dir: Path) -> dict:
    """The LoRA adapter's adapter_config.json; a ``UserError`` if it is not a JSON object."""
    config = read_json_object(adapter_dir / "adapter_config.json")
    if config is None:
        raise UserError(f"{str(adapter_dir / 'adapter_config.json')!r} is not a readable JSON object; it is not the "
                        "configuration of a LoRA adapter that t0s1 train (or peft) wrote.")
    return config


def _check_model_dir(model_dir: Path) -> bool:
    """Whether ``model_dir`` is a LoRA adapter (else full weights); a ``UserError`` if it is no model."""
    if not model_dir.exists():
        raise UserError(f"No model directory at {str(model_dir)!r}.")
    if model_dir.is_file():
        kind = "already a GGUF file" if model_dir.suffix == ".gguf" else "a file"
        raise UserError(f"{str(model_dir)!r} is {kind}: t0s1 export takes a model directory that t0s1 train wrote.")
    if (model_dir / "adapter_config.json").is_file():
        if not any(model_dir.glob("adapter_model.*")):
            raise UserError(f"{str(model_dir)!r} has adapter_config.json but no adapter weights (adapter_model.safetensors).")
        _adapter_config(model_dir)
        return True
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"{str(model_dir)!r} is not a model directory (no config.json or adapter_config.json): give the output_dir "
            "of t0s1 train, or a Hugging Face model directory."
        )
    _config(model_dir)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise UserError(f"{str(model_dir)!r} has a config.json but no weights (*.safetensors): not a complete model directory.")
    return False


def _config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"Cannot read {str(model_dir / 'config.json')!r}: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"{str(model_dir / 'config.json')!r} is not a JSON object: not a model configuration.")
    return config


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"{str(model_dir)!r} has no tokenizer that transformers can load ({error}): the GGUF needs it.") from None


def _profile(tokenizer) -> tuple[str, bool]:
    """(the reasoning profile as ``t0s1 train`` records it: a name, or ``START,END`` for a custom
    pair; whether ``t0s1 train`` recorded it)."""
    from t0s1.profiles import PROFILE_KEY, detect_profile

    recorded = tokenizer.init_kwargs.get(PROFILE_KEY)
    profile = detect_profile(tokenizer).profile
    name = f"{profile.thinking_start},{profile.thinking_end}" if profile.name == "custom" else profile.name
    return name, isinstance(recorded, str) and bool(recorded)


def _stop_tokens(model_dir: Path, tokenizer) -> list[str]:
    """The texts of the end-of-turn / end-of-sequence ids generation stops at."""
    ids = []
    path = model_dir / "generation_config.json"
    if path.is_file():
        config = read_json_object(path)
        if config is None:
            raise UserError(f"{str(path)!r} is not a generation config (a JSON object): fix or remove it.")
        eos = config.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    if tokenizer.eos_token:
        tokens.append(tokenizer.eos_token)
    return [token for token in dict.fromkeys(tokens) if token]


def _context(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
