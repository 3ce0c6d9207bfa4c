"""The index folder: built once, memory-mapped on every use, refused when it does not match.

Layout of an index folder::

    manifest.json        what the index holds: corpus SHA-256, chunker, bm25 analysis, embedder
                         (name, weights and model files SHA-256, dimension), where the vectors are,
                         the counts (documents, chunks, vectors), a build id, and the size and
                         SHA-256 of every other file in the folder
    documents.arrow      the parent documents (id, title, text), Arrow IPC, memory-mapped
    chunks.npy           int64 [chunk, (document, start, end)]: chunk spans in the document text
    doc_offsets.npy      document i owns chunks doc_offsets[i] .. doc_offsets[i+1]-1
    bm25/                the bm25s index of the chunks (always built: cheap, and hybrid needs it)
    dense/embeddings.npy float32 unit vectors of the chunks (dense / hybrid, embedded store)

With a Qdrant target the vectors go to a Qdrant collection instead of ``dense/`` and the rest
stays in the folder; every point's payload carries the build id, so a collection is matched to its
folder by identity, not only by name and size. Each build uploads to a collection of its own,
``<name>-build-<build id>``, and the name given (``--qdrant-collection``) becomes a Qdrant alias of
it once the folder is in place; the manifest records both. So a rebuild with ``overwrite`` never
touches the collection the previous index searches until the new one is complete: a failed or
killed rebuild leaves the previous index working, and the previous collection is dropped only after
the alias has moved.

A build writes a temporary folder beside ``--out`` (``.<name>.building-<pid>-*``) and swaps it
into place when everything is written (one atomic exchange of the two folders on Linux), so a
failed or killed build leaves the previous index as it was; the next build removes what a killed
one left. Rebuilding the same corpus with the same settings reuses the index without embedding
anything; ``overwrite`` always rebuilds.

Opening an index checks every file against the manifest: the size of each (a half-written or
truncated file, more or fewer vectors than chunks), the SHA-256 of the small ones (up to
``HASHED_AT_OPEN`` bytes: the bm25 parameters and vocabulary, the chunk spans), and the counts of
documents, chunks and vectors. Large files are hashed by ``verify_index(full=True)`` (``t0s1 index
info --verify``, and before an index is reused by a build): hashing gigabytes of vectors on every
open would make opening slow.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from t0s1.errors import UserError
from t0s1.files import is_storage_full, process_alive, storage_full_error, umask, write_text_atomic
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
INDEX_VERSION = 2  # 2: counts, build id and file checksums in the manifest
BM25_PARAMETERS = {"method": "lucene", "k1": 1.5, "b": 0.75}
HASHED_AT_OPEN = 1 << 20
"""Files up to this many bytes are hashed each time an index is opened; larger ones are checked by size."""


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

    def publish(self, name: str) -> None:
        """Point the alias ``name`` at this collection, then drop the collection it named before
        (an index built before aliases: the collection called ``name`` itself)."""
        from qdrant_client import models

        client = self.client
        before = aliased_collection(client, name)
        operations = []
        if before is not None:
            operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=name)))
        elif client.collection_exists(name):
            client.delete_collection(name)
        operations.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=self.collection, alias_name=name)))
        client.update_collection_aliases(change_aliases_operations=operations)  # one atomic change
        if before is not None and before != self.collection and client.collection_exists(before):
            client.delete_collection(before)

    def drop_other_builds(self, name: str) -> list[str]:
        """Drop the collections of other builds of the alias ``name`` (``<name>-build-<id>``) but
        this one and the alias's: a build killed after its upload leaves its collection behind.
        Call only when no other build of the same index is running. Returns the names dropped."""
        pattern = re.compile(re.escape(name) + r"-build-[0-9a-f]{12}")
        keep = {self.collection, aliased_collection(self.client, name)}
        stale = sorted(c.name for c in self.client.get_collections().collections if pattern.fullmatch(c.name) and c.name not in keep)
        for collection in stale:
            self.client.delete_collection(collection)
        return stale

    def upload(self, vectors: np.ndarray, documents: list[str], build_id: str, *, batch_size: int = 256) -> None:
        from qdrant_client import models

        self.client.create_collection(
            self.collection, vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.COSINE)
        )
        self.client.upload_collection(
            self.collection, vectors=vectors, ids=range(len(vectors)),
            payload=({"doc": doc, "build": build_id} for doc in documents), batch_size=batch_size, wait=True,
        )

    def problem(self, manifest: dict) -> str | None:
        """What makes the collection not the one the manifest's build uploaded (None: it is):
        missing, another point count, or points of another build (the id in every payload)."""
        if not self.client.collection_exists(self.collection):  # a collection, not an alias: what the build uploaded
            return f"the Qdrant collection {self.collection!r} does not exist"
        count = self.client.count(self.collection, exact=True).count
        if count != manifest["vectors"]:
            return f"the Qdrant collection {self.collection!r} holds {count} vectors, the manifest records {manifest['vectors']}"
        for point in self.client.retrieve(self.collection, ids=sorted({0, count - 1}), with_payload=True):
            build = (point.payload or {}).get("build")
            if build != manifest["build_id"]:
                return (
                    f"the Qdrant collection {self.collection!r} holds the vectors of another build "
                    f"(build id {build}, the manifest records {manifest['build_id']})"
                )
        return None


@dataclass
class BuildResult:
    index: Index
    reused: bool
    seconds: float


def aliased_collection(client, name: str) -> str | None:
    """The collection the Qdrant alias ``name`` points at (None: no such alias)."""
    for alias in client.get_aliases().aliases:
        if alias.alias_name == name:
            return alias.collection_name
    return None


def build_collection_name(name: str, build_id: str) -> str:
    """The collection a build uploads to; ``name`` becomes its alias once the build is in place."""
    return f"{name}-build-{build_id[:12]}"


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
    (same corpus, chunker, bm25 analysis and embedder) is reused as it is once every file checks
    against the manifest; one that holds another index, or this one damaged, is refused unless
    ``overwrite``, which always rebuilds.
    """
    started = time.perf_counter()
    if retriever not in RETRIEVERS:
        raise UserError(f"Unknown retriever {retriever!r}: use one of {', '.join(RETRIEVERS)}.")
    out = Path(out)
    _recover(out)
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
        # whole_text: chunks cover each document to its end (indexes built before cut dense
        # chunking at the embedder's 128 tokens: their chunker entry differs, so they are rebuilt)
        # every_token: no text of a word longer than a window is lost; room_for_title: a chunk and its
        # title fit the embedder (indexes built before chunked otherwise: their entry differs, so they are rebuilt)
        "chunker": {**settings.to_dict(), "title_in_chunks": True, "whole_text": True,
                    **({"every_token": True, "room_for_title": True} if dense else {})},
        "bm25": {**BM25_ANALYSIS, **BM25_PARAMETERS},
        "dense": (
            {"embedder": embedder.describe(), "store": qdrant.describe() if qdrant else {"kind": "embedded", "file": "dense/embeddings.npy"}}
            if dense else None
        ),
    }
    has_index = (out / MANIFEST_FILE).is_file()
    if has_index and not overwrite:  # with overwrite, not even the manifest needs to be readable
        existing = _read_manifest(out)
        differences = manifest_differences(existing, manifest)
        if differences:
            raise UserError(
                f"{out} holds another index: " + "; ".join(differences)
                + ". Pass --overwrite to replace it, or choose another --out."
            )
        problem = index_problem(out, existing, full=True, qdrant=qdrant)
        if problem is not None:
            raise UserError(f"{out} holds this index, damaged: {problem}. Pass --overwrite to rebuild it.")
        _finish_publishing(out, existing, qdrant)
        if existing.get("retriever") != retriever:
            _write_json_atomic(out / MANIFEST_FILE, {**existing, "retriever": retriever})
        return BuildResult(Index.open(out), reused=True, seconds=time.perf_counter() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{_debris_prefix(out, 'building')}{os.getpid()}-", dir=out.parent))
    building.chmod(0o777 & ~umask())  # mkdtemp makes it private; the index gets the usual mode
    created: list[QdrantVectors] = []  # a collection this build made, dropped if the build fails
    manifest["build_id"] = uuid.uuid4().hex
    try:
        with _progress(progress) as bar:
            counts = _write_index(
                building, documents, settings, embedder if dense else None, bar, batch_size, qdrant, created, overwrite,
                manifest["build_id"],
            )
        manifest.update(
            counts, files=_file_entries(building), created=datetime.now(UTC).isoformat(timespec="seconds"), t0s1_version=_version()
        )
        if created:  # the vectors are in this build's own collection; the name given becomes its alias
            manifest["dense"]["store"] = {**manifest["dense"]["store"], "collection": created[0].collection, "alias": qdrant.collection}
        (building / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _replace(building, out)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        for store in created:
            store.client.delete_collection(store.collection)
        if is_storage_full(error):
            kept = f"The previous index in {out} is kept as it was." if has_index else "Nothing was left behind."
            raise storage_full_error(f"the index beside {out}", error, kept) from None
        raise
    else:
        for store in created:
            try:
                store.publish(qdrant.collection)
                if not _other_builds_running(out):
                    store.drop_other_builds(qdrant.collection)
            except Exception as error:  # the index is in place and searches its own collection
                warnings.warn(
                    f"The index in {out} is built and uses the Qdrant collection {store.collection!r}, but the alias "
                    f"{qdrant.collection!r} could not be moved to it ({type(error).__name__}: {error}); the collection "
                    "it named before is kept (building the same index again moves it).", stacklevel=2,
                )
    finally:
        for store in created:
            store.client.close()
    return BuildResult(Index.open(out), reused=False, seconds=time.perf_counter() - started)


def _write_index(
    folder: Path, documents, settings: ChunkerSettings, embedder: Embedder | None, bar, batch_size, qdrant, created, overwrite, build_id
) -> dict:
    import bm25s
    import pyarrow as pa

    table = pa.table({"id": [d.id for d in documents], "title": [d.title for d in documents], "text": [d.text for d in documents]})
    with pa.OSFile(str(folder / "documents.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)

    task = bar.add_task("chunking", total=len(documents))
    spans = tokenizer_spans(embedder.tokenizer) if embedder else word_spans
    window = embedder.max_seq_length - 2 if embedder else None  # its [CLS] and [SEP] aside
    chunks = chunk_documents(documents, settings, spans, window=window, on_progress=lambda n: bar.advance(task, n))
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
            if not overwrite and (aliased_collection(client, qdrant.collection) is not None or client.collection_exists(qdrant.collection)):
                client.close()
                raise UserError(
                    f"The Qdrant collection {qdrant.collection!r} already exists: pass --overwrite to replace it or "
                    "choose another --qdrant-collection (an index never shares another one's vectors)."
                )
            # The previous collection of that name stays searchable until this build is in place.
            store = QdrantVectors(client, build_collection_name(qdrant.collection, build_id))
            created.append(store)
        task = bar.add_task(f"embedding with {embedder.name}", total=len(texts))
        vectors = embedder.encode(texts, batch_size=batch_size, on_progress=lambda n: bar.advance(task, n))
        if store is None:
            (folder / "dense").mkdir()
            np.save(folder / "dense" / "embeddings.npy", vectors)
        else:
            store.upload(vectors, [documents[d].id for d in chunks.doc.tolist()], build_id)
        counts["vectors"] = len(vectors)
    return counts


def _file_entries(folder: Path) -> dict:
    """Size and SHA-256 of every file of an index folder but the manifest, by relative path."""
    return {
        path.relative_to(folder).as_posix(): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_problem(path: Path, manifest: dict, *, full: bool = False, qdrant: QdrantTarget | None = None) -> str | None:
    """What is wrong with the files of the index in ``path`` against its manifest (None: nothing).

    Always: every file is there with the recorded size, and files up to ``HASHED_AT_OPEN`` bytes
    have the recorded SHA-256; ``full``: every file's SHA-256, and the Qdrant collection (when the
    vectors are there) is the one this build uploaded."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{path / MANIFEST_FILE} records no files"
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            return f"{path / MANIFEST_FILE} records {name!r} without its size and SHA-256"
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{file} has {size:,} bytes, the manifest records {entry['bytes']:,} (half-written, or from another build)"
        if (full or size <= HASHED_AT_OPEN) and _sha256(file) != entry["sha256"]:
            return f"{file} does not have the SHA-256 the manifest records (its content changed)"
    store = (manifest.get("dense") or {}).get("store", {})
    if full and store.get("kind") == "qdrant":
        target = qdrant or QdrantTarget(url=store.get("url"), path=store.get("path"), collection=store["collection"])
        client = target.connect()
        try:
            return QdrantVectors(client, store["collection"]).problem(manifest)
        finally:
            client.close()
    return None


def verify_index(path: str | Path, *, full: bool = True) -> None:
    """Check an index folder against its manifest (see ``index_problem``); a ``UserError`` naming
    the file and how to rebuild when something is wrong."""
    index = Index.open(path)
    try:
        problem = index_problem(index.path, index.manifest, full=full, qdrant=index._qdrant_target)
    finally:
        index.close()
    if problem is not None:
        raise _damaged(index.path, index.manifest, problem)


def _damaged(path: Path, manifest: dict, problem: str) -> UserError:
    source = manifest.get("corpus_source")
    corpus = source if isinstance(source, str) and not source.startswith("(") else "CORPUS"
    return UserError(
        f"{path}: the index is damaged: {problem}. Rebuild it with the same settings: "
        f"t0s1 index build {corpus} --out {path} --overwrite."
    )


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
        old_store, new_store = _store_as_asked(old["store"]), _store_as_asked(new["store"])
        if old_store != new_store:
            differences.append(f"vectors in {_compact(old_store)}, not {_compact(new_store)}")
    return differences


def _store_as_asked(store: dict) -> dict:
    """Where the vectors are, as a build is asked for it: a Qdrant store by the collection name
    given (the alias), not the build's own collection."""
    if "alias" not in store:
        return store
    return {**{k: v for k, v in store.items() if k != "alias"}, "collection": store["alias"]}


def _describe_embedder(entry: dict) -> str:
    return (f"{entry.get('name')} (weights SHA-256 {str(entry.get('weights_sha256'))[:12]}…, "
            f"other files {str(entry.get('files_sha256'))[:12]}…)")


def _compact(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) + "}"
    return str(value)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the index.")
    if out.is_dir() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise UserError(f"--out {out} is a folder that holds no index; give a new or empty folder.")


def _debris_prefix(out: Path, kind: str) -> str:
    """The name prefix of a build's temporary folders beside ``out`` ("building" or "replaced"),
    followed by the building process's id."""
    return f".{out.name}.{kind}-"


def _replace(building: Path, out: Path) -> None:
    """Put the finished folder in place; an index it replaces goes only once the new one is in."""
    if not out.exists():
        building.rename(out)
    elif _exchange(building, out):  # one atomic step: ``out`` is the old index or the new one
        shutil.rmtree(building, ignore_errors=True)  # now the previous index
    else:  # no atomic exchange here: a kill between the renames is repaired by ``_recover``
        old = out.with_name(f"{_debris_prefix(out, 'replaced')}{os.getpid()}-{time.time_ns()}")
        out.rename(old)
        building.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _finish_publishing(out: Path, manifest: dict, qdrant: QdrantTarget | None) -> None:
    """For an index whose vectors are in Qdrant under an alias: if the alias does not name the
    index's collection (its build was killed, or the move failed, between the folder's swap and
    the alias's move), move it now, and drop what earlier builds left."""
    store = (manifest.get("dense") or {}).get("store") or {}
    alias, collection = store.get("alias"), store.get("collection")
    if store.get("kind") != "qdrant" or not alias or not collection:
        return
    target = qdrant or QdrantTarget(url=store.get("url"), path=store.get("path"), collection=alias)
    client = target.connect()
    try:
        vectors = QdrantVectors(client, collection)
        if aliased_collection(client, alias) != collection:
            vectors.publish(alias)
        if not _other_builds_running(out):
            vectors.drop_other_builds(alias)
    finally:
        client.close()


def _other_builds_running(out: Path) -> bool:
    """Whether another process is building the index ``out`` now (its temporary folder is there)."""
    return any(alive for _, alive in _temporary_folders(out, "building"))


def _temporary_folders(out: Path, kind: str):
    """(folder, alive) for each temporary folder of ``kind`` ("building", "replaced") beside
    ``out``: alive while the process that made it, another one, runs."""
    prefix = _debris_prefix(out, kind)
    for folder in out.parent.glob(prefix + "*"):
        pid = folder.name[len(prefix):].split("-", 1)[0]
        yield folder, pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid))


def _recover(out: Path) -> None:
    """Repair what a killed build left beside ``out``: put back an index that was moved aside when
    the build died between its two renames, and remove the temporary folders of builds whose
    process is gone (a running build's are left alone)."""
    if not out.parent.is_dir():
        return
    debris = [(kind, folder) for kind in ("building", "replaced") for folder, alive in _temporary_folders(out, kind) if not alive]
    moved_aside = sorted((f for kind, f in debris if kind == "replaced" and (f / MANIFEST_FILE).is_file()), key=lambda f: f.name.rsplit("-", 1)[-1].zfill(24))
    if moved_aside and not out.exists():
        moved_aside[-1].rename(out)
    for _, folder in debris:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(
            f"{folder / MANIFEST_FILE} is not a readable index manifest ({error}); rebuild the index: "
            f"t0s1 index build CORPUS --out {folder} --overwrite."
        ) from None
    if not isinstance(manifest, dict):
        raise UserError(f"{folder / MANIFEST_FILE} is not an index manifest; rebuild the index: t0s1 index build CORPUS --out {folder} --overwrite.")
    return manifest


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
        self.doc_offsets = np.load(path / "doc_offsets.npy")
        documents, chunks = manifest["documents"], manifest["chunks"]
        for name, shape, expected in (
            ("documents.arrow", (self.documents.num_rows,), (documents,)),
            ("chunks.npy", spans.shape, (chunks, 3)),
            ("doc_offsets.npy", self.doc_offsets.shape, (documents + 1,)),
        ):
            if shape != expected:
                raise _damaged(path, manifest, f"{path / name} holds shape {shape}, the manifest's counts give {expected}")
        if int(self.doc_offsets[-1]) != chunks:
            raise _damaged(path, manifest, f"{path / 'doc_offsets.npy'} ends at chunk {int(self.doc_offsets[-1])}, not {chunks}")
        self.chunks = Chunks(spans[:, 0], spans[:, 1], spans[:, 2])
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
                f"{INDEX_FORMAT} v{INDEX_VERSION}. Rebuild it with t0s1 index build --overwrite."
            )
        problem = index_problem(path, manifest)
        if problem is not None:
            raise _damaged(path, manifest, problem)
        store = (manifest.get("dense") or {}).get("store", {})
        qdrant = None
        if store.get("kind") == "qdrant":
            qdrant = QdrantTarget(
                url=qdrant_url or store.get("url"), path=None if qdrant_url else store.get("path"),
                collection=store["collection"], api_key=qdrant_api_key,
            )
        try:
            return cls(path, manifest, qdrant=qdrant)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            raise _damaged(path, manifest, f"{type(error).__name__}: {error}") from None

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

            folder = self.path / "bm25"
            try:
                self._bm25 = bm25s.BM25.load(str(folder), mmap=True, show_progress=False)
            except (OSError, ValueError, KeyError, TypeError) as error:  # a file changed after the index was opened
                raise _damaged(self.path, self.manifest, f"{folder} cannot be read ({type(error).__name__}: {error})") from None
        return self._bm25

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            file = self.path / "dense" / "embeddings.npy"
            try:
                vectors = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise _damaged(self.path, self.manifest, f"{file} cannot be read ({type(error).__name__}: {error})") from None
            expected = (self.manifest.get("vectors"), self._dense_entry("dense")["embedder"]["dimension"])
            if vectors.shape != expected:
                raise _damaged(self.path, self.manifest, f"{file} holds shape {vectors.shape}, the manifest gives {expected}")
            self._embeddings = vectors
        return self._embeddings

    @property
    def qdrant(self) -> QdrantVectors:
        if self._qdrant is None:
            client = self._qdrant_target.connect()
            vectors = QdrantVectors(client, self._qdrant_target.collection)
            problem = vectors.problem(self.manifest)
            if problem is not None:
                client.close()
                raise _damaged(self.path, self.manifest, problem)
            self._qdrant = vectors
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
        if embedder.files_sha256 != recorded.get("files_sha256"):
            raise UserError(
                f"{self.path} was embedded with {recorded['name']} whose configuration and tokenizer files hash to "
                f"{recorded.get('files_sha256')}; those of the embedder {embedder.name!r} hash to {embedder.files_sha256} "
                "(same weights, other tokenizer, pooling or settings). Vectors of different models cannot be compared: "
                "search with the same embedder or build another index."
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
