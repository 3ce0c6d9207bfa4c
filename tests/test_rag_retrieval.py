"""Dense and hybrid retrieval with the embedded all-MiniLM-L6-v2: quality on a generated corpus,
Qdrant against the embedded store, index reuse, the weights hash check, re-ranking."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.errors import UserError
from t0s1.rag import embedders
from t0s1.rag.embedders import PUBLISHED_WEIGHTS, load_embedder
from t0s1.rag.metrics import score_retrieval
from t0s1.rag.retrievers import Hit, RerankedRetriever, Reranker
from t0s1.rag.store import QdrantTarget, build_index, open_index
from t0s1.rag.synthetic import make_corpus

runner = CliRunner()
NUM_DOCUMENTS = 240  # two queries each; ~20 s to embed on two CPU cores


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(NUM_DOCUMENTS, seed=0)


@pytest.fixture(scope="module")
def embedder(one_torch_thread):
    return load_embedder()


class CountingEmbedder:
    """Counts the texts an embedder embeds (to show what is and is not embedded again)."""

    def __init__(self, embedder):
        self.embedder, self.texts = embedder, 0
        self.original = embedder.encode

    def __enter__(self):
        def encode(texts, **kwargs):
            self.texts += len(texts)
            return self.original(texts, **kwargs)

        self.embedder.encode = encode
        return self

    def __exit__(self, *exc):
        self.embedder.encode = self.original


@pytest.fixture(scope="module")
def hybrid_index(tmp_path_factory, corpus, embedder):
    documents, _ = corpus
    out = tmp_path_factory.mktemp("rag") / "hybrid"
    result = build_index(documents, out, retriever="hybrid", embedder=embedder, progress=False)
    result.index.use_embedder(embedder)
    return result.index


@pytest.fixture(scope="module")
def tampered_model_dir(tmp_path_factory):
    """A copy of the embedded model with one byte of its weights changed (it still loads)."""
    folder = tmp_path_factory.mktemp("tampered") / "model"
    shutil.copytree(embedders.embedded_embedder_dir(), folder)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.seek(-1000, 2)
        byte = handle.read(1)
        handle.seek(-1000, 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    return folder


def test_hybrid_is_at_least_as_good_as_the_better_of_bm25_and_dense(hybrid_index, corpus):
    _, queries = corpus
    pairs = [(query.text, query.doc_id) for query in queries]
    scores = {name: score_retrieval(hybrid_index.retriever(name), pairs, ks=(1, 5)) for name in ("bm25", "dense", "hybrid")}
    print(f"\n{len(pairs)} queries over {NUM_DOCUMENTS} documents (named and described conditions):")
    for name, score in scores.items():
        print(f"  {name:7s} p@1 {score.precision[1]:.3f}  p@5 {score.precision[5]:.3f}  MRR {score.mrr:.3f}")
    for metric in (lambda s: s.precision[1], lambda s: s.precision[5], lambda s: s.mrr):
        assert metric(scores["hybrid"]) >= max(metric(scores["bm25"]), metric(scores["dense"]))
    # Each retriever is worth fusing: neither is useless on this corpus.
    assert scores["bm25"].precision[5] > 0.5 and scores["dense"].precision[5] > 0.5


def test_dense_finds_paraphrases_that_bm25_cannot(hybrid_index, corpus):
    _, queries = corpus
    described = [(q.text, q.doc_id) for q in queries if q.style == "described"]
    dense = score_retrieval(hybrid_index.retriever("dense"), described, ks=(5,))
    bm25 = score_retrieval(hybrid_index.retriever("bm25"), described, ks=(5,))
    assert dense.precision[5] > bm25.precision[5]


def test_hits_are_parent_documents_with_their_best_chunks(hybrid_index, corpus):
    documents, queries = corpus
    by_id = {d.id: d for d in documents}
    for name in ("dense", "hybrid"):
        hits = hybrid_index.search(queries[1].text, 5, name)
        assert len(hits) == 5 and len({h.doc_id for h in hits}) == 5
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        for hit in hits:
            assert hit.text == by_id[hit.doc_id].text and hit.retriever == name
            assert all(hit.text[c.start : c.end] == c.text for c in hit.chunks)


def test_qdrant_local_mode_returns_the_same_top_k_as_the_embedded_store(tmp_path, corpus, embedder):
    documents, queries = corpus
    subset = documents[:50]
    ids = {d.id for d in subset}
    asked = [q.text for q in queries if q.doc_id in ids]
    embedded = build_index(subset, tmp_path / "embedded", retriever="hybrid", embedder=embedder, progress=False).index
    target = QdrantTarget(path=str(tmp_path / "qdrant"), collection="conditions")
    qdrant = build_index(subset, tmp_path / "with-qdrant", retriever="hybrid", embedder=embedder, qdrant=target, progress=False).index
    assert qdrant.manifest["dense"]["store"]["kind"] == "qdrant"
    assert not (tmp_path / "with-qdrant" / "dense").exists()  # the vectors live in Qdrant
    embedded.use_embedder(embedder)
    qdrant.use_embedder(embedder)
    try:
        for name in ("dense", "hybrid"):
            for query in asked:
                here = embedded.search(query, 5, name)
                there = qdrant.search(query, 5, name)
                assert [h.doc_id for h in there] == [h.doc_id for h in here], query
                assert np.allclose([h.score for h in there], [h.score for h in here], atol=1e-4)
    finally:
        qdrant.close()


def test_an_index_built_once_is_reused_without_embedding_again(hybrid_index, corpus, embedder):
    documents, queries = corpus
    vectors = hybrid_index.path / "dense" / "embeddings.npy"
    modified = vectors.stat().st_mtime_ns
    with CountingEmbedder(embedder) as counter:
        again = build_index(documents, hybrid_index.path, retriever="hybrid", embedder=embedder, progress=False)
        assert again.reused and counter.texts == 0
        reopened = open_index(hybrid_index.path)
        reopened.use_embedder(embedder)
        for query in queries[:3]:
            reopened.search(query.text, 5, "hybrid")
        assert counter.texts == 3  # the queries, never the corpus
    assert vectors.stat().st_mtime_ns == modified


def test_an_index_is_never_searched_or_rebuilt_with_other_weights(hybrid_index, corpus, tampered_model_dir):
    documents, _ = corpus
    other = load_embedder(str(tampered_model_dir))  # a local folder: loads, but its hash differs
    assert other.weights_sha256 != PUBLISHED_WEIGHTS["model.safetensors"]
    reopened = open_index(hybrid_index.path)
    with pytest.raises(UserError, match="Vectors of different weights cannot be compared"):
        reopened.use_embedder(other)
    with pytest.raises(UserError, match="embedder"):
        build_index(documents, hybrid_index.path, retriever="hybrid", embedder=other, progress=False)
    result = runner.invoke(
        app, ["rag", "ask", "Who gets it?", "--index", str(hybrid_index.path), "--embedder", str(tampered_model_dir),
              "--retriever", "dense", "--max-thinking-tokens", "8"],
    )
    assert result.exit_code == 2 and "different weights" in " ".join(result.output.split())


def test_the_embedded_model_is_refused_when_its_hash_does_not_match(tmp_path, corpus, tampered_model_dir, monkeypatch):
    documents, _ = corpus
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(f'{{"id": "{d.id}", "text": "{d.text}"}}\n' for d in documents[:5]))
    monkeypatch.setattr(embedders, "embedded_embedder_dir", lambda: tampered_model_dir)
    out = tmp_path / "index"
    result = runner.invoke(app, ["index", "build", str(corpus_file), "--out", str(out), "--retriever", "dense"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert PUBLISHED_WEIGHTS["model.safetensors"] in message and "sentence-transformers/all-MiniLM-L6-v2" in message
    assert not out.exists()


def test_the_embedded_model_loads_with_no_network(monkeypatch, embedder):
    def no_network(*args, **kwargs):
        raise OSError("network use in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    offline = load_embedder()
    assert offline.weights_sha256 == PUBLISHED_WEIGHTS["model.safetensors"]
    sentence = ["A persistent cough and night sweats."]
    assert np.allclose(offline.encode(sentence), embedder.encode(sentence), atol=1e-5)


@pytest.mark.parametrize("change", ["fewer", "more", "half-written"])
def test_vectors_that_do_not_match_the_chunks_are_refused_naming_the_file(tmp_path, hybrid_index, corpus, embedder, change):
    _, queries = corpus
    folder = tmp_path / "copy"
    shutil.copytree(hybrid_index.path, folder)
    vectors_file = folder / "dense" / "embeddings.npy"
    vectors = np.load(vectors_file)
    if change == "fewer":
        np.save(vectors_file, vectors[:-1])
    elif change == "more":
        np.save(vectors_file, np.vstack([vectors, vectors[:1]]))
    else:
        vectors_file.write_bytes(vectors_file.read_bytes()[: vectors_file.stat().st_size // 2])
    with pytest.raises(UserError) as refused:
        index = open_index(folder)
        index.use_embedder(embedder)
        index.search(queries[0].text, 5, "dense")
    message = str(refused.value)
    assert str(vectors_file) in message and "damaged" in message and "--overwrite" in message


def copy_points(client, points, collection: str) -> None:
    """A new collection ``collection`` holding ``points`` (scrolled with vectors and payloads)."""
    from qdrant_client import models

    client.create_collection(collection, vectors_config=models.VectorParams(size=len(points[0].vector), distance=models.Distance.COSINE))
    client.upsert(collection, points=[models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in points])


def test_a_qdrant_collection_of_another_build_is_refused_not_searched(tmp_path, corpus, embedder):
    from qdrant_client import QdrantClient

    documents, queries = corpus
    target = QdrantTarget(path=str(tmp_path / "qdrant"), collection="shared")
    build_index(documents[:20], tmp_path / "first", retriever="dense", embedder=embedder, qdrant=target, progress=False)
    first = open_index(tmp_path / "first")
    collection = first.manifest["dense"]["store"]["collection"]
    first.close()
    # Another build's vectors, as many, land in the collection the first index searches.
    build_index(documents[20:40], tmp_path / "second", retriever="dense", embedder=embedder,
                qdrant=QdrantTarget(path=target.path, collection="other"), progress=False)
    client = QdrantClient(path=target.path)
    try:
        second = client.get_aliases().aliases[-1].collection_name
        points = client.scroll(second, limit=1000, with_vectors=True, with_payload=True)[0]
        client.delete_collection(collection)
        copy_points(client, points, collection)
    finally:
        client.close()
    first = open_index(tmp_path / "first")
    first.use_embedder(embedder)
    try:
        with pytest.raises(UserError, match="holds the vectors of another build"):
            first.search(queries[0].text, 3)
    finally:
        first.close()


def test_a_qdrant_rebuild_keeps_the_previous_collection_until_it_is_in_place(tmp_path, corpus, embedder):
    from qdrant_client import QdrantClient, models

    documents, queries = corpus
    target = QdrantTarget(path=str(tmp_path / "qdrant"), collection="conditions")
    folder = tmp_path / "index"

    def collections():
        client = QdrantClient(path=target.path)
        try:
            return ({c.name for c in client.get_collections().collections},
                    {a.alias_name: a.collection_name for a in client.get_aliases().aliases})
        finally:
            client.close()

    # An index built before aliases: its vectors are in the collection of the name given.
    old = build_index(documents[:20], folder, retriever="dense", embedder=embedder, qdrant=target, progress=False).index
    built = old.manifest["dense"]["store"]["collection"]
    old.close()
    client = QdrantClient(path=target.path)
    try:
        points = client.scroll(built, limit=1000, with_vectors=True, with_payload=True)[0]
        client.update_collection_aliases(change_aliases_operations=[models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name="conditions"))])
        client.delete_collection(built)
        copy_points(client, points, "conditions")
    finally:
        client.close()
    manifest_file = folder / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["dense"]["store"] = {k: v for k, v in manifest["dense"]["store"].items() if k != "alias"} | {"collection": "conditions"}
    manifest_file.write_text(json.dumps(manifest))
    assert collections() == ({"conditions"}, {})

    def search():
        index = open_index(folder)
        index.use_embedder(embedder)
        try:
            return [hit.doc_id for hit in index.search(queries[0].text, 3, "dense")]
        finally:
            index.close()

    before = search()
    # A rebuild that fails while embedding: the previous index still searches its vectors.
    original = embedder.encode

    def failing(texts, **kwargs):
        raise RuntimeError("the embedder broke")

    embedder.encode = failing
    try:
        with pytest.raises(RuntimeError, match="the embedder broke"):
            build_index(documents[20:40], folder, retriever="dense", embedder=embedder, qdrant=target, overwrite=True, progress=False)
    finally:
        embedder.encode = original
    assert collections() == ({"conditions"}, {})
    assert search() == before
    # A rebuild that succeeds: its own collection, the name an alias of it, the old one dropped.
    rebuilt = build_index(documents[20:40], folder, retriever="dense", embedder=embedder, qdrant=target, overwrite=True, progress=False).index
    store = rebuilt.manifest["dense"]["store"]
    rebuilt.close()
    assert store["alias"] == "conditions" and store["collection"].startswith("conditions-build-")
    assert collections() == ({store["collection"]}, {"conditions": store["collection"]})
    assert search() != before
    # The same corpus and settings again: reused as it is (the alias is what was asked for).
    again = build_index(documents[20:40], folder, retriever="dense", embedder=embedder, qdrant=target, progress=False)
    again.index.close()
    assert again.reused
    # Once more with overwrite: the alias moves, the collection it named goes.
    third = build_index(documents[20:40], folder, retriever="dense", embedder=embedder, qdrant=target, overwrite=True, progress=False).index
    moved = third.manifest["dense"]["store"]["collection"]
    third.close()
    assert moved != store["collection"]
    assert collections() == ({moved}, {"conditions": moved})


KILLED_QDRANT_BUILD = """
import os, signal, sys
from t0s1.rag import store
from t0s1.rag.corpus import Document
out, qdrant, count, point = sys.argv[1:5]
documents = [Document(f"d{i}", f"Title {i}", f"document number {i} about topic {i % 3}") for i in range(int(count))]
die = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
if point == "before-swap":  # the vectors are uploaded, the folder not in place
    store._replace = die
else:  # the folder is in place, the alias not moved
    store.QdrantVectors.publish = die
store.build_index(documents, out, retriever="dense", qdrant=store.QdrantTarget(path=qdrant, collection="kb"), overwrite=True,
                  progress=False)
"""


def test_a_qdrant_build_killed_after_its_upload_is_cleaned_and_one_killed_before_its_alias_moved_is_finished(tmp_path):
    """SIGKILL runs no cleanup: a build killed after its upload left its collection forever, and
    one killed between the folder's swap and the alias's move left the alias on the old
    collection, which a rerun reused without moving it. The next build of the index repairs both."""
    import subprocess
    import sys

    from qdrant_client import QdrantClient

    from t0s1.rag.corpus import Document

    out, qdrant = tmp_path / "index", tmp_path / "qdrant"

    def killed_build(count: int, point: str) -> None:
        child = subprocess.run([sys.executable, "-c", KILLED_QDRANT_BUILD, str(out), str(qdrant), str(count), point], timeout=300)
        assert child.returncode == -9

    def build(count: int) -> tuple[bool, str]:
        documents = [Document(f"d{i}", f"Title {i}", f"document number {i} about topic {i % 3}") for i in range(count)]
        result = build_index(documents, out, retriever="dense", qdrant=QdrantTarget(path=str(qdrant), collection="kb"), progress=False)
        result.index.close()
        return result.reused, result.index.manifest["dense"]["store"]["collection"]

    def collections():
        client = QdrantClient(path=str(qdrant))
        try:
            return {c.name for c in client.get_collections().collections}, {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        finally:
            client.close()

    killed_build(10, "before-swap")
    [orphan] = collections()[0]
    assert not out.exists() and orphan.startswith("kb-build-")
    reused, first = build(10)
    assert not reused and collections() == ({first}, {"kb": first})  # the orphan is gone
    killed_build(12, "before-alias")
    names, aliases = collections()
    assert aliases == {"kb": first} and len(names) == 2
    reused, second = build(12)  # the same build again: reused, and now published
    assert reused and second != first and collections() == ({second}, {"kb": second})


def test_an_embedder_with_the_same_weights_but_other_model_files_is_refused(tmp_path, hybrid_index):
    import json

    folder = tmp_path / "model"
    source = embedders.embedded_embedder_dir()
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    settings = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**settings, "max_seq_length": 64}))
    other = load_embedder(str(folder))
    assert other.weights_sha256 == PUBLISHED_WEIGHTS["model.safetensors"]  # the very same weights
    with pytest.raises(UserError, match="other tokenizer, pooling or settings"):
        open_index(hybrid_index.path).use_embedder(other)


class ByTitle(Reranker):
    """A stand-in re-ranker: prefers titles late in the alphabet."""

    name = "by-title"

    def scores(self, query: str, hits: list[Hit]) -> list[float]:
        return [float(sorted(h.title for h in hits).index(hit.title)) for hit in hits]


def test_reranking_reorders_the_wider_candidate_list(hybrid_index, corpus):
    _, queries = corpus
    base = hybrid_index.retriever("bm25")
    reranked = RerankedRetriever(base, ByTitle(), depth=10)
    candidates = base.search(queries[0].text, 10)
    hits = reranked.search(queries[0].text, 3)
    assert [h.title for h in hits] == sorted((c.title for c in candidates), reverse=True)[:3]
    assert reranked.name == "bm25+by-title" and all(h.retriever == "bm25+by-title" for h in hits)


def test_llm_reranker_scores_do_not_depend_on_the_batch(tiny_model, hybrid_index, corpus):
    from t0s1.rag.retrievers import LlmReranker

    _, queries = corpus
    hits = hybrid_index.search(queries[0].text, 5, "bm25")
    one_by_one = LlmReranker(tiny_model, batch_size=1).scores(queries[0].text, hits)
    batched = LlmReranker(tiny_model, batch_size=5).scores(queries[0].text, hits)
    assert len(batched) == 5 and np.all(np.isfinite(batched))
    assert np.allclose(one_by_one, batched, atol=1e-4)


def test_cross_encoder_reranker_from_a_local_folder(tmp_path, hybrid_index, corpus):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from t0s1.rag.retrievers import CrossEncoderReranker

    torch.manual_seed(0)
    folder = tmp_path / "cross-encoder"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedders.embedded_embedder_dir()).save_pretrained(folder)
    reranker = CrossEncoderReranker(str(folder))
    _, queries = corpus
    candidates = hybrid_index.search(queries[0].text, 8, "bm25")
    scores = reranker.scores(queries[0].text, candidates)
    hits = RerankedRetriever(hybrid_index.retriever("bm25"), reranker, depth=8).search(queries[0].text, 4)
    expected = [candidates[i].doc_id for i in np.argsort(-np.asarray(scores), kind="stable")[:4]]
    assert [h.doc_id for h in hits] == expected
    assert [h.score for h in hits] == pytest.approx(sorted(scores, reverse=True)[:4], abs=1e-5)


def test_tied_scores_rank_by_index_whatever_k():
    """argpartition kept an arbitrary subset of the scores tied at the cut: a search for 1 and one
    for 30 disagreed on the first document when many documents scored alike (boilerplate)."""
    from t0s1.rag.retrievers import _top

    generator = np.random.default_rng(0)
    for _ in range(500):
        scores = generator.integers(0, 4, size=int(generator.integers(1, 60))).astype(np.float32)
        full = _top(scores, len(scores), None)
        assert list(full) == sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        for n in (1, 3, 10):
            assert list(_top(scores, n, None)) == list(full[:n])
        assert list(_top(scores, 5, 1.0)) == [i for i in full if scores[i] > 1.0][:5]
