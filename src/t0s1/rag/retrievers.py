"""Retrievers behind one interface: ``search(query, k) -> [Hit]``.

Retrievers score chunks and return parent documents, as t0 does: a document scores as its best
chunk, and its ``Hit`` carries its best chunks. ``bm25`` (the ``bm25s`` package) and ``dense``
(cosine similarity of sentence-transformers vectors, in the index folder or in Qdrant) score
chunks; ``hybrid`` fuses their document rankings by reciprocal rank fusion; a ``RerankedRetriever``
re-scores a wider candidate list with a cross-encoder or with the generator itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from t0s1.errors import UserError
from t0s1.rag.chunking import Chunks

RETRIEVERS = ("bm25", "dense", "hybrid")

CHUNKS_PER_HIT = 3
"""A hit carries at most this many of its document's best chunks."""

RRF_K = 60
"""Reciprocal rank fusion: a document at rank r (from 1) in a ranking adds 1 / (RRF_K + r)
(Cormack et al., 2009)."""

FUSION_DEPTH = 50
"""Hybrid fuses the top max(k, FUSION_DEPTH) documents of each retriever."""

BM25_ANALYSIS = {
    "package": "bm25s",
    "lowercase": True,
    "token_pattern": r"(?u)\b\w\w+\b",
    "stopwords": "en",
    "stemmer": "english (Snowball, PyStemmer)",
}
"""How bm25 turns chunk and query text into terms (recorded in the manifest)."""


@dataclass
class ChunkMatch:
    """One chunk of a hit: its text (a slice of the document), span and score."""

    text: str
    score: float
    start: int
    end: int


@dataclass
class Hit:
    """A retrieved document: its id, title, whole text, score and best chunks.

    ``score`` is on the scale of ``retriever``: a bm25 score, a cosine similarity (dense), a
    fused reciprocal-rank score (hybrid) or a re-ranker's score.
    """

    doc_id: str
    title: str
    text: str
    score: float
    chunks: list[ChunkMatch] = field(default_factory=list)
    retriever: str = ""

    def snippet(self, chars: int = 300) -> str:
        """The best chunk, cut at ``chars`` characters (what a reply shows of a source)."""
        text = " ".join((self.chunks[0].text if self.chunks else self.text).split())
        return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"

    def to_dict(self, *, snippet_chars: int = 300, with_text: bool = False) -> dict:
        data = {"id": self.doc_id, "title": self.title, "score": round(float(self.score), 6),
                "retriever": self.retriever, "snippet": self.snippet(snippet_chars)}
        if with_text:
            data["text"] = self.text
            data["chunks"] = [{"text": c.text, "score": round(float(c.score), 6), "start": c.start, "end": c.end}
                              for c in self.chunks]
        return data


class SearchableIndex(Protocol):
    """What a retriever reads of an index. ``t0s1.rag.store.Index`` (the index folder) is one; the
    store builds retrievers over itself, so the arrow points from the store to the retrievers."""

    chunks: Chunks
    doc_offsets: np.ndarray
    """Document i owns chunks doc_offsets[i] .. doc_offsets[i+1]-1."""

    @property
    def bm25(self) -> Any: ...  # a bm25s.BM25 over the chunks

    @property
    def embeddings(self) -> np.ndarray: ...  # unit vectors of the chunks, one row each

    @property
    def qdrant(self) -> Any: ...  # the chunk vectors in Qdrant: query(vector, limit) -> [(chunk, score)]

    def embed_query(self, query: str) -> np.ndarray: ...

    def hit(self, doc: int, chunks: list[tuple[int, float]], score: float, retriever: str) -> Hit: ...


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise UserError(f"k (the number of sources) must be an integer >= 0, got {k!r}.")
    return int(k)


class Retriever(ABC):
    """``search(query, k)``: the k best documents for ``query``, best first (fewer if fewer match)."""

    name: str

    def __init__(self, index: SearchableIndex):
        self.index = index

    def search(self, query: str, k: int) -> list[Hit]:
        k = check_k(k)
        if not isinstance(query, str) or not query.strip():
            raise UserError("The query is empty: give the question to retrieve sources for.")
        if k == 0:
            return []
        return self._search(query, k)

    @abstractmethod
    def _search(self, query: str, k: int) -> list[Hit]: ...


class ChunkScoringRetriever(Retriever):
    """A retriever that scores every chunk: documents are ranked exactly by their best chunk."""

    @abstractmethod
    def chunk_scores(self, query: str) -> np.ndarray: ...

    def _search(self, query: str, k: int) -> list[Hit]:
        scores = np.asarray(self.chunk_scores(query), dtype=np.float32)
        offsets = self.index.doc_offsets
        best = np.maximum.reduceat(scores, offsets[:-1])
        docs = _top(best, k, self.minimum_score)
        hits = []
        for doc in docs:
            first, last = offsets[doc], offsets[doc + 1]
            local = _top(scores[first:last], CHUNKS_PER_HIT, None)
            hits.append(self.index.hit(int(doc), [(first + j, float(scores[first + j])) for j in local], float(best[doc]), self.name))
        return hits

    minimum_score: float | None = None


def _top(scores: np.ndarray, n: int, above: float | None) -> np.ndarray:
    """Indices of the ``n`` largest scores, largest first, ties by index; only scores > ``above``."""
    candidates = np.arange(len(scores)) if above is None else np.flatnonzero(scores > above)
    if len(candidates) > n:  # keep every score tied with the n-th: which of them argpartition keeps is arbitrary
        nth = -np.partition(-scores[candidates], n - 1)[n - 1]
        candidates = candidates[scores[candidates] >= nth]
    return candidates[np.lexsort((candidates, -scores[candidates]))][:n]


class Bm25Retriever(ChunkScoringRetriever):
    """BM25 over the chunks (``bm25s``, memory-mapped from the index folder)."""

    name = "bm25"
    minimum_score = 0.0  # a document sharing no term with the query is not a hit

    def chunk_scores(self, query: str) -> np.ndarray:
        terms = bm25_terms([query])[0]
        if not terms:  # only stopwords: nothing to match
            return np.zeros(len(self.index.chunks), dtype=np.float32)
        return self.index.bm25.get_scores(terms)


def bm25_terms(texts: list[str]) -> list[list[str]]:
    """``BM25_ANALYSIS`` applied to texts: the terms bm25 indexes and looks up."""
    import bm25s

    return bm25s.tokenize(texts, lower=True, stopwords="en", stemmer=_stemmer(), show_progress=False, return_ids=False)


_STEMMER = None


def _stemmer():
    global _STEMMER
    if _STEMMER is None:
        import Stemmer

        _STEMMER = Stemmer.Stemmer("english")
    return _STEMMER.stemWords


class DenseRetriever(ChunkScoringRetriever):
    """Cosine similarity between the query's vector and every chunk's (stored unit-length, so a
    matrix-vector product; the matrix is memory-mapped from the index folder)."""

    name = "dense"

    def chunk_scores(self, query: str) -> np.ndarray:
        return self.index.embeddings @ self.index.embed_query(query)


class QdrantRetriever(Retriever):
    """Dense retrieval with the vectors in a Qdrant collection (a server, or local mode).

    Qdrant returns the best chunks; the search widens until they cover k documents, so the
    documents and their order match the embedded store's."""

    name = "dense"

    def _search(self, query: str, k: int) -> list[Hit]:
        vector = self.index.embed_query(query)
        total = len(self.index.chunks)
        limit = min(total, max(4 * k, 20))
        while True:
            points = self.index.qdrant.query(vector, limit)
            per_doc: dict[int, list[tuple[int, float]]] = {}
            for chunk, score in points:
                per_doc.setdefault(int(self.index.chunks.doc[chunk]), []).append((chunk, score))
            if len(per_doc) >= k or limit >= total:
                break
            limit = min(total, limit * 4)
        ranked = sorted(per_doc.items(), key=lambda item: (-item[1][0][1], item[0]))[:k]
        return [self.index.hit(doc, matches[:CHUNKS_PER_HIT], matches[0][1], self.name) for doc, matches in ranked]


class HybridRetriever(Retriever):
    """Reciprocal rank fusion of several retrievers' document rankings."""

    name = "hybrid"

    def __init__(self, index: SearchableIndex, retrievers: list[Retriever], *, rrf_k: int = RRF_K, depth: int = FUSION_DEPTH):
        super().__init__(index)
        self.retrievers, self.rrf_k, self.depth = retrievers, rrf_k, depth

    def _search(self, query: str, k: int) -> list[Hit]:
        fused: dict[str, float] = {}
        found: dict[str, list[Hit]] = {}
        for retriever in self.retrievers:
            for rank, hit in enumerate(retriever.search(query, max(k, self.depth)), start=1):
                fused[hit.doc_id] = fused.get(hit.doc_id, 0.0) + 1.0 / (self.rrf_k + rank)
                found.setdefault(hit.doc_id, []).append(hit)
        order = sorted(fused, key=lambda doc_id: -fused[doc_id])[:k]
        return [_merge(found[doc_id], fused[doc_id], self.name) for doc_id in order]


def _merge(hits: list[Hit], score: float, retriever: str) -> Hit:
    """One document found by several retrievers: their best chunks, without repeats."""
    chunks, seen = [], set()
    for hit in hits:
        for chunk in hit.chunks:
            if (chunk.start, chunk.end) not in seen:
                seen.add((chunk.start, chunk.end))
                chunks.append(chunk)
    first = hits[0]
    return Hit(first.doc_id, first.title, first.text, score, chunks[:CHUNKS_PER_HIT], retriever)


# --------------------------------------------------------------------------------------------
# Re-ranking


class Reranker(ABC):
    """Re-scores candidate hits for a query; higher is more relevant."""

    name: str

    @abstractmethod
    def scores(self, query: str, hits: list[Hit]) -> list[float]: ...


def passage(hit: Hit) -> str:
    """What a re-ranker reads of a hit: the title and its best chunks."""
    return hit.title + "\n" + "\n".join(chunk.text for chunk in hit.chunks or [ChunkMatch(hit.text, 0.0, 0, 0)])


class CrossEncoderReranker(Reranker):
    """A sentence-transformers cross-encoder (a local folder, or a hub id from the cache)."""

    name = "cross-encoder"

    def __init__(self, name_or_path: str, device: str = "cpu"):
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise UserError("Cross-encoder re-ranking needs sentence-transformers: pip install 't0s1[rag]'.") from None
        from pathlib import Path

        from t0s1.rag.embedders import hub_offline

        try:
            self.model = CrossEncoder(name_or_path, device=device, local_files_only=Path(name_or_path).is_dir() or hub_offline())
        except (OSError, ValueError) as error:
            raise UserError(f"Could not load the cross-encoder {name_or_path!r} ({error}).") from None

    def scores(self, query: str, hits: list[Hit]) -> list[float]:
        predictions = self.model.predict([(query, passage(hit)) for hit in hits], show_progress_bar=False)
        return [float(score) for score in np.asarray(predictions).reshape(len(hits), -1)[:, 0]]


class LlmReranker(Reranker):
    """The generator as a pointwise re-ranker (as t0 does): for each candidate, the log-odds of
    "yes" over "no" as the next token after asking whether the document helps answer the question."""

    name = "llm"

    PROMPT = (
        "Document:\n{passage}\n\nQuestion: {query}\n\n"
        "Does the document contain information that helps answer the question? Answer yes or no."
    )

    def __init__(self, lm, batch_size: int = 4):
        self.lm, self.batch_size = lm, batch_size
        tokenizer = lm.tokenizer
        self.yes = _first_token_ids(tokenizer, ("yes", "Yes", " yes", " Yes"))
        self.no = _first_token_ids(tokenizer, ("no", "No", " no", " No"))

    def scores(self, query: str, hits: list[Hit]) -> list[float]:
        import torch

        tokenizer = self.lm.tokenizer
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": self.PROMPT.format(passage=passage(hit), query=query)}],
                tokenize=False, add_generation_prompt=True,
            )
            for hit in hits
        ]
        scores = []
        for first in range(0, len(prompts), self.batch_size):
            ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts[first : first + self.batch_size]]
            # The engine's runner (PyTorch or llama.cpp) prefills the prompts: the logits of their
            # last positions, each independent of the batch (padding is masked).
            runner = self.lm.new_runner(rows=len(ids), length=max(len(row) for row in ids))
            try:
                with torch.inference_mode():
                    _, logits = runner.add(ids)
            finally:
                runner.close()
            log_probs = torch.log_softmax(logits, dim=-1)
            yes = torch.logsumexp(log_probs[:, self.yes], dim=-1)
            no = torch.logsumexp(log_probs[:, self.no], dim=-1)
            scores.extend((yes - no).tolist())
        return scores


def _first_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    return sorted({tokenizer(word, add_special_tokens=False).input_ids[0] for word in words})


class RerankedRetriever(Retriever):
    """The base retriever's top ``depth`` documents, re-ordered by a re-ranker; the k best."""

    def __init__(self, base: Retriever, reranker: Reranker, depth: int = 20):
        super().__init__(base.index)
        if depth < 1:
            raise UserError(f"The re-ranking depth must be at least 1, got {depth}.")
        self.base, self.reranker, self.depth = base, reranker, depth
        self.name = f"{base.name}+{reranker.name}"

    def _search(self, query: str, k: int) -> list[Hit]:
        candidates = self.base.search(query, max(k, self.depth))
        if not candidates:
            return []
        scores = self.reranker.scores(query, candidates)
        order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))[:k]
        return [
            Hit(candidates[i].doc_id, candidates[i].title, candidates[i].text, scores[i], candidates[i].chunks, self.name)
            for i in order
        ]
