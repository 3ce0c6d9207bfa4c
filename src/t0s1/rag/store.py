"""The index folder: built once, memory-mapped on every use, refused when it does not match.

Layout of an index folder::

    manifest.json        what the index holds: corpus SHA-256, chunker, bm25 analysis, embedder
                         (name, weights SHA-256, dimension) and where the vectors are
    documents.arrow      the parent documents (id, title, text), Arrow IPC, memory-mapped
    chunks.npy           int64 [chunk, (document, start, end)]: chunk spans in the document text
    doc_offsets.npy      document i owns chunks doc_offsets[i] .. doc_offsets[i+1]-1
    bm25/                the bm25s index of the chunks (always built: cheap, and hybrid needs it)
    dense/embeddings.npy float32 unit vectors of the chunks (dense / hybrid, embedded store)

With a Qdrant target the vectors go to a Qdrant collection instead of ``dense/`` and the rest
stays in the folder. A build writes a temporary folder beside ``--out`` and renames it into place
when everything is written, so a failed build leaves nothing behind; rebuilding the same corpus
with the same settings reuses the index without embedding anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from t0s1.errors import UserError
from t0s1.rag.chunking import ChunkerSettings, Chunks, WORDS, chunk_documents, indexed_text, tokenizer_spans, word_spans
from t0s1.rag.corpus import Document, FieldMap, check_documents, corpus_sha256, load_corpus
from t0s1.rag.embedders import EMBEDDED_EMBEDDER, Embedder, load_embedder
from t0s1.rag.retrievers import (
    BM25_ANALYSIS,
    RETRIEVERS,
    Bm25Retriever,
    ChunkMatch,
    DenseRetriever,
    Hit,
    HybridRetriever,
    QdrantRetriever,
    Retriever,
    bm25_terms,
)

MANIFEST_FILE = "manifest.json"
INDEX_FORMAT = "t0s1-rag-index"
INDEX_VERSION = 1
BM25_PARAMETERS = {"method": "lucene", "k1": 1.5, "b": 0.75}


@dataclass(frozen=True)
class QdrantTarget:
    """Where dense vectors live when not in the folder: a Qdrant server (``url``) or Qdrant's
    local mode (``path``, a folder: one process at a time). The API key is never written to the manifest."""

    url: str | None = None
    path: str | None = None
    collection: str | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        if bool(self.url) == bool(self.path):
            raise UserError("Give Qdrant either a server URL (--qdrant-url) or a local folder (--qdrant-path), not both.")

    def connect(self):
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise UserError("Qdrant needs qdrant-client: pip install 't0s1[qdrant]'.") from None
        if self.url:
            return QdrantClient(url=self.url, api_key=self.api_key)
        return QdrantClient(path=self.path)

    def describe(self) -> dict:
        return {"kind": "qdrant", "url": self.url, "path": self.path, "collection": self.collection}


class QdrantVectors:
    """The chunk vectors of an index in a Qdrant collection (point id = chunk number)."""

    def __init__(self, client, collection: str):
        self.client, self.collection = client, collection

    def query(self, vector: np.ndarray, limit: int) -> list[tuple[int, float]]:
        points = self.client.query_points(self.collection, query=vector.tolist(), limit=limit, with_payload=False).points
        return [(int(point.id), float(point.score)) for point in points]

    def upload(self, vectors: np.ndarray, documents: list[str], *, batch_size: int = 256) -> None:
        from qdrant_client import models

        self.client.create_collection(
            self.collection, vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.COSINE)
        )
        self.client.upload_collection(
            self.collection, vectors=vectors, ids=range(len(vectors)), payload=({"doc": doc} for doc in documents),
            batch_size=batch_size, wait=True,
        )


@dataclass
class BuildResult:
    index: Index
    reused: bool
    seconds: float


def build_index(
    corpus: str | Path | Sequence[Document],
    out: str | Path,
    *,
    retriever: str = "bm25",
    embedder: str | Embedder = EMBEDDED_EMBEDDER,
    chunk_tokens: int = 200,
    overlap_tokens: int = 50,
    fields: FieldMap | None = None,
    qdrant: QdrantTarget | None = None,
    overwrite: bool = False,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> BuildResult:
    """Build (or reuse) the index of ``corpus`` in the folder ``out``.

    ``retriever`` is the index's default retriever: ``bm25`` needs no model; ``dense`` and
    ``hybrid`` embed every chunk with ``embedder``. An ``out`` that already holds this index
    (same corpus, chunker, bm25 analysis and embedder weights) is reused as it is; one that holds
    another index is refused unless ``overwrite``.
    """
    started = time.perf_counter()
    if retriever not in RETRIEVERS:
        raise UserError(f"Unknown retriever {retriever!r}: use one of {', '.join(RETRIEVERS)}.")
    out = Path(out)
    if isinstance(corpus, str | Path):
        source = str(corpus)
        documents = load_corpus(corpus, fields)
    else:
        source, documents = "(documents given in Python)", check_documents(list(corpus))
    _check_out(out)
    dense = retriever in ("dense", "hybrid")
    if dense and isinstance(embedder, str):
        embedder = load_embedder(embedder, device=device)
    settings = ChunkerSettings(chunk_tokens, overlap_tokens, embedder.name if dense else WORDS)
    if dense and chunk_tokens > embedder.max_seq_length - 2:
        raise UserError(
            f"--chunk-tokens {chunk_tokens} is more than the embedder {embedder.name!r} reads "
            f"({embedder.max_seq_length} tokens with its 2 special tokens); use at most {embedder.max_seq_length - 2}."
        )
    if qdrant is not None and not dense:
        raise UserError("Qdrant holds dense vectors: use --retriever dense or hybrid with --qdrant-url / --qdrant-path.")
    if qdrant is not None and not qdrant.collection:
        qdrant = QdrantTarget(qdrant.url, qdrant.path, out.name, qdrant.api_key)
    manifest = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "retriever": retriever,
        "corpus_source": source,
        "corpus_sha256": corpus_sha256(documents),
        "documents": len(documents),
        "chunker": {**settings.to_dict(), "title_in_chunks": True},
        "bm25": {**BM25_ANALYSIS, **BM25_PARAMETERS},
        "dense": (
            {"embedder": embedder.describe(), "store": qdrant.describe() if qdrant else {"kind": "embedded", "file": "dense/embeddings.npy"}}
            if dense else None
        ),
    }
    existing = _read_manifest(out) if (out / MANIFEST_FILE).is_file() else None
    if existing is not None:
        differences = manifest_differences(existing, manifest)
        if not differences:
            if existing.get("retriever") != retriever:
                _write_json_atomic(out / MANIFEST_FILE, {**existing, "retriever": retriever})
            return BuildResult(Index.open(out), reused=True, seconds=time.perf_counter() - started)
        if not overwrite:
            raise UserError(
                f"{out} holds another index: " + "; ".join(differences)
                + ". Pass --overwrite to replace it, or choose another --out."
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    building.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the index gets the usual mode
    created: list[QdrantVectors] = []  # a collection this build made, dropped if the build fails
    try:
        with _progress(progress) as bar:
            counts = _write_index(building, documents, settings, embedder if dense else None, bar, batch_size, qdrant, created, overwrite)
        manifest.update(counts, created=datetime.now(UTC).isoformat(timespec="seconds"), t0s1_version=_version())
        _write_json_atomic(building / MANIFEST_FILE, manifest)
        _replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        for store in created:
            store.client.delete_collection(store.collection)
        raise
    finally:
        for store in created:
            store.client.close()
    return BuildResult(Index.open(out), reused=False, seconds=time.perf_counter() - started)


def _write_index(folder: Path, documents, settings: ChunkerSettings, embedder: Embedder | None, bar, batch_size, qdrant, created, overwrite) -> dict:
    import bm25s
    import pyarrow as pa

    table = pa.table({"id": [d.id for d in documents], "title": [d.title for d in documents], "text": [d.text for d in documents]})
    with pa.OSFile(str(folder / "documents.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)

    task = bar.add_task("chunking", total=len(documents))
    spans = tokenizer_spans(embedder.tokenizer) if embedder else word_spans
    chunks = chunk_documents(documents, settings, spans, on_progress=lambda n: bar.advance(task, n))
    np.save(folder / "chunks.npy", np.stack([chunks.doc.astype(np.int64), chunks.start, chunks.end], axis=1))
    np.save(folder / "doc_offsets.npy", chunks.offsets)
    texts = [indexed_text(documents[d], s, e) for d, s, e in zip(chunks.doc.tolist(), chunks.start.tolist(), chunks.end.tolist())]

    task = bar.add_task("bm25", total=None)
    bm25 = bm25s.BM25(**BM25_PARAMETERS)
    bm25.index(bm25_terms(texts), show_progress=False)
    bm25.save(str(folder / "bm25"), show_progress=False)
    bar.update(task, total=1, completed=1)

    counts = {"chunks": len(chunks)}
    if embedder is not None:
        store = None
        if qdrant is not None:  # before embedding: a refusal should not cost the embedding time
            client = qdrant.connect()
            if client.collection_exists(qdrant.collection):
                if not overwrite:
                    client.close()
                    raise UserError(
                        f"The Qdrant collection {qdrant.collection!r} already exists: pass --overwrite to replace it or "
                        "choose another --qdrant-collection (an index never shares another one's vectors)."
                    )
                client.delete_collection(qdrant.collection)
            store = QdrantVectors(client, qdrant.collection)
            created.append(store)
        task = bar.add_task(f"embedding with {embedder.name}", total=len(texts))
        vectors = embedder.encode(texts, batch_size=batch_size, on_progress=lambda n: bar.advance(task, n))
        if store is None:
            (folder / "dense").mkdir()
            np.save(folder / "dense" / "embeddings.npy", vectors)
        else:
            store.upload(vectors, [documents[d].id for d in chunks.doc.tolist()])
    return counts


def manifest_differences(existing: dict, wanted: dict) -> list[str]:
    """What makes an existing index differ from the requested one, in words (empty: the same)."""
    differences = []
    if existing.get("format") != INDEX_FORMAT or existing.get("version") != INDEX_VERSION:
        differences.append(f"format {existing.get('format')} v{existing.get('version')}, not {INDEX_FORMAT} v{INDEX_VERSION}")
    if existing.get("corpus_sha256") != wanted["corpus_sha256"]:
        differences.append(
            f"another corpus (SHA-256 {str(existing.get('corpus_sha256'))[:12]}… of {existing.get('documents')} documents, "
            f"not {wanted['corpus_sha256'][:12]}… of {wanted['documents']})"
        )
    if existing.get("chunker") != wanted["chunker"]:
        differences.append(f"chunker {_compact(existing.get('chunker'))}, not {_compact(wanted['chunker'])}")
    if existing.get("bm25") != wanted["bm25"]:
        differences.append(f"bm25 {_compact(existing.get('bm25'))}, not {_compact(wanted['bm25'])}")
    old, new = existing.get("dense"), wanted["dense"]
    if (old is None) != (new is None):
        differences.append("bm25 only, not dense vectors" if old is None else "dense vectors too, not bm25 only")
    elif old is not None and old != new:
        if old["embedder"] != new["embedder"]:
            differences.append(f"embedder {_describe_embedder(old['embedder'])}, not {_describe_embedder(new['embedder'])}")
        if old["store"] != new["store"]:
            differences.append(f"vectors in {_compact(old['store'])}, not {_compact(new['store'])}")
    return differences


def _describe_embedder(entry: dict) -> str:
    return f"{entry.get('name')} (weights SHA-256 {str(entry.get('weights_sha256'))[:12]}…)"


def _compact(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) + "}"
    return str(value)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the index.")
    if out.is_dir() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise UserError(f"--out {out} is a folder that holds no index; give a new or empty folder.")


def _replace(building: Path, out: Path) -> None:
    """Put the finished folder in place; an index it replaces goes only once the new one is in."""
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{time.time_ns()}")
        out.rename(old)
        building.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        building.rename(out)


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    temporary.replace(path)


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{folder / MANIFEST_FILE} is not a readable index manifest ({error}); rebuild the index.") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{folder / MANIFEST_FILE} is not an index manifest; rebuild the index.")
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _version() -> str:
    try:
        return metadata.version("t0s1")
    except metadata.PackageNotFoundError:
        return "unknown"


class _NoProgress:
    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    )


# --------------------------------------------------------------------------------------------
# Using an index


class Index:
    """An index folder opened for search: documents, chunks, bm25 and vectors are memory-mapped
    (or in Qdrant); the embedder loads on the first dense query and is checked against the
    manifest's weights hash."""

    def __init__(self, path: Path, manifest: dict, *, qdrant: QdrantTarget | None = None):
        import pyarrow as pa

        self.path, self.manifest = path, manifest
        self.documents = pa.ipc.open_file(pa.memory_map(str(path / "documents.arrow"))).read_all()
        spans = np.load(path / "chunks.npy", mmap_mode="r")
        self.chunks = Chunks(spans[:, 0], spans[:, 1], spans[:, 2])
        self.doc_offsets = np.load(path / "doc_offsets.npy")
        self._qdrant_target = qdrant
        self._bm25 = self._embeddings = self._embedder = self._qdrant = None
        self._positions: dict[str, int] | None = None
        self._retrievers: dict[str, Retriever] = {}

    @classmethod
    def open(cls, path: str | Path, *, qdrant_url: str | None = None, qdrant_api_key: str | None = None) -> Index:
        """Open the index in ``path``; ``qdrant_url`` overrides where its Qdrant vectors are."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"No index at {path}: build one with t0s1 index build CORPUS --out {path}.")
        if not (path / MANIFEST_FILE).is_file():
            raise UserError(f"{path} is not an index (no {MANIFEST_FILE}): build one with t0s1 index build CORPUS --out {path}.")
        manifest = _read_manifest(path)
        if manifest.get("format") != INDEX_FORMAT or manifest.get("version") != INDEX_VERSION:
            raise UserError(
                f"{path} holds index format {manifest.get('format')} v{manifest.get('version')}; this t0s1 reads "
                f"{INDEX_FORMAT} v{INDEX_VERSION}. Rebuild it with t0s1 index build."
            )
        store = (manifest.get("dense") or {}).get("store", {})
        qdrant = None
        if store.get("kind") == "qdrant":
            qdrant = QdrantTarget(
                url=qdrant_url or store.get("url"), path=None if qdrant_url else store.get("path"),
                collection=store["collection"], api_key=qdrant_api_key,
            )
        try:
            return cls(path, manifest, qdrant=qdrant)
        except (OSError, ValueError, KeyError) as error:
            raise UserError(f"{path}: the index is incomplete or damaged ({error}); rebuild it.") from None

    # -- what it holds

    @property
    def retrievers(self) -> tuple[str, ...]:
        return RETRIEVERS if self.manifest.get("dense") else ("bm25",)

    @property
    def default_retriever(self) -> str:
        return self.manifest["retriever"]

    def __len__(self) -> int:
        return self.documents.num_rows

    def document(self, i: int) -> Document:
        return Document(self.documents["id"][i].as_py(), self.documents["title"][i].as_py(), self.documents["text"][i].as_py())

    def position(self, doc_id: str) -> int | None:
        """The row of the document whose id is ``doc_id`` (None: not in the index)."""
        if self._positions is None:
            self._positions = {doc: i for i, doc in enumerate(self.documents["id"].to_pylist())}
        return self._positions.get(doc_id)

    def document_hits(self, doc_ids: list[str], *, score: float = 1.0, retriever: str = "gold") -> list[Hit]:
        """The documents ``doc_ids`` as hits, in that order (the "gold sources" of an evaluation);
        a ``UserError`` naming the ids the index does not hold."""
        positions = [self.position(doc_id) for doc_id in doc_ids]
        missing = [doc_id for doc_id, i in zip(doc_ids, positions) if i is None]
        if missing:
            raise UserError(f"{self.path} holds no document with the id {', '.join(map(repr, missing))}.")
        return [self.hit(i, [], score, retriever) for i in positions]

    def hit(self, doc: int, chunks: list[tuple[int, float]], score: float, retriever: str) -> Hit:
        document = self.document(doc)
        matches = [
            ChunkMatch(document.text[int(self.chunks.start[j]) : int(self.chunks.end[j])], score_j,
                       int(self.chunks.start[j]), int(self.chunks.end[j]))
            for j, score_j in chunks
        ]
        return Hit(document.id, document.title, document.text, score, matches, retriever)

    # -- stores, loaded on first use

    @property
    def bm25(self):
        if self._bm25 is None:
            import bm25s

            self._bm25 = bm25s.BM25.load(str(self.path / "bm25"), mmap=True, show_progress=False)
        return self._bm25

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = np.load(self.path / "dense" / "embeddings.npy", mmap_mode="r")
        return self._embeddings

    @property
    def qdrant(self) -> QdrantVectors:
        if self._qdrant is None:
            client = self._qdrant_target.connect()
            collection = self._qdrant_target.collection
            if not client.collection_exists(collection):
                raise UserError(f"The Qdrant collection {collection!r} of {self.path} does not exist; rebuild the index.")
            count = client.count(collection, exact=True).count
            if count != len(self.chunks):
                raise UserError(
                    f"The Qdrant collection {collection!r} holds {count} vectors but {self.path} has {len(self.chunks)} "
                    "chunks: they belong to different builds. Rebuild the index."
                )
            self._qdrant = QdrantVectors(client, collection)
        return self._qdrant

    def close(self) -> None:
        """Release the Qdrant connection (local mode locks its folder while open)."""
        if self._qdrant is not None:
            self._qdrant.client.close()
            self._qdrant = None

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            dense = self._dense_entry("dense")
            self.use_embedder(load_embedder(dense["embedder"]["name"]))
        return self._embedder

    def use_embedder(self, embedder: Embedder) -> None:
        """Search with this (already loaded) embedder; refused unless its weights are the ones
        that embedded the index."""
        recorded = self._dense_entry("dense")["embedder"]
        if embedder.weights_sha256 != recorded["weights_sha256"]:
            raise UserError(
                f"{self.path} was embedded with {recorded['name']} (weights SHA-256 {recorded['weights_sha256']}); "
                f"the embedder {embedder.name!r} has weights {embedder.weights_sha256}. Vectors of different weights "
                "cannot be compared: search with the same embedder or build another index."
            )
        self._embedder = embedder

    def embed_query(self, query: str) -> np.ndarray:
        return self.embedder.encode([query])[0]

    def _dense_entry(self, retriever: str) -> dict:
        dense = self.manifest.get("dense")
        if not dense:
            raise UserError(
                f"{self.path} was built for bm25 only; rebuild it with --retriever dense or hybrid to search it with {retriever}."
            )
        return dense

    # -- search

    def retriever(self, name: str | None = None) -> Retriever:
        """The retriever ``name`` (default: the one the index was built for), made once."""
        name = name or self.default_retriever
        if name not in RETRIEVERS:
            raise UserError(f"Unknown retriever {name!r}: use one of {', '.join(RETRIEVERS)}.")
        if name not in self._retrievers:
            if name == "bm25":
                self._retrievers[name] = Bm25Retriever(self)
            else:
                store = self._dense_entry(name)["store"]
                dense = QdrantRetriever(self) if store["kind"] == "qdrant" else DenseRetriever(self)
                self._retrievers["dense"] = dense
                if name == "hybrid":
                    self._retrievers[name] = HybridRetriever(self, [self.retriever("bm25"), dense])
        return self._retrievers[name]

    def search(self, query: str, k: int = 5, retriever: str | None = None) -> list[Hit]:
        return self.retriever(retriever).search(query, k)

    def info(self) -> dict:
        """The manifest with the folder's size on disk."""
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {**self.manifest, "path": str(self.path), "bytes_on_disk": size}


def open_index(path: str | Path, *, qdrant_url: str | None = None, qdrant_api_key: str | None = None) -> Index:
    """Open an index folder for search (see ``Index``)."""
    return Index.open(path, qdrant_url=qdrant_url, qdrant_api_key=qdrant_api_key)
