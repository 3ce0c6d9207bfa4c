"""Retrieval quality on queries with one known relevant document, as t0 reports it.

t0's p@k is the share of queries whose relevant document is among the first k retrieved (with a
single relevant document, this is also recall@k / hit rate@k); MRR is the mean of 1 / rank of the
relevant document (0 when it is not retrieved at all within ``depth``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from t0s1.rag.retrievers import Retriever


@dataclass
class RetrievalScores:
    queries: int
    precision: dict[int, float]  # k -> p@k
    mrr: float

    def to_dict(self) -> dict:
        return {"queries": self.queries, **{f"p@{k}": v for k, v in self.precision.items()}, "mrr": self.mrr}


def rank_of(retriever: Retriever, query: str, relevant_id: str, depth: int) -> int | None:
    """Rank (from 1) of the relevant document in the first ``depth`` hits, or None."""
    for rank, hit in enumerate(retriever.search(query, depth), start=1):
        if hit.doc_id == relevant_id:
            return rank
    return None


def score_retrieval(
    retriever: Retriever, queries: Sequence[tuple[str, str]], ks: Sequence[int] = (1, 5), depth: int = 30
) -> RetrievalScores:
    """p@k for each k and MRR over ``(query, relevant document id)`` pairs."""
    depth = max(depth, *ks)
    ranks = [rank_of(retriever, query, relevant, depth) for query, relevant in queries]
    count = max(len(ranks), 1)
    precision = {k: sum(rank is not None and rank <= k for rank in ranks) / count for k in ks}
    return RetrievalScores(len(ranks), precision, sum(1 / rank for rank in ranks if rank) / count)
