"""Retrieval quality on questions with known relevant (gold) documents, as t0 reports it.

Over questions each with one or more gold documents and a ranking of retrieved documents:

- ``p@k`` (t0's precision at k): the share of questions with a gold document among the first k
  retrieved (the hit rate at k). With one gold document per question it equals ``recall@k``.
- ``recall@k``: the mean share of a question's gold documents found among the first k (a question
  that needs two documents and finds one scores 0.5).
- ``mrr``: the mean of 1 / rank of the first gold document (0 when none is within ``depth``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from t0s1.rag.retrievers import Retriever

DEPTH = 30
"""How many documents are ranked for MRR (a gold document below this rank counts 0)."""


@dataclass
class RetrievalScores:
    queries: int
    precision: dict[int, float]  # k -> p@k
    mrr: float
    recall: dict[int, float] = field(default_factory=dict)  # k -> recall@k
    depth: int = DEPTH

    def to_dict(self) -> dict:
        return {
            "queries": self.queries,
            **{f"p@{k}": v for k, v in self.precision.items()},
            **{f"recall@{k}": v for k, v in self.recall.items()},
            "mrr": self.mrr,
            "mrr_depth": self.depth,
        }


def score_rankings(
    rankings: Sequence[Sequence[str]], gold: Sequence[Collection[str]], ks: Sequence[int] = (1, 5), depth: int = DEPTH
) -> RetrievalScores:
    """p@k, recall@k for each k and MRR of ``rankings[i]`` (document ids, best first) against
    ``gold[i]`` (the ids of question i's gold documents)."""
    if len(rankings) != len(gold):
        raise ValueError(f"{len(rankings)} rankings for {len(gold)} sets of gold ids")
    if not all(gold):  # it would count as a miss in p@k and MRR, and not at all in recall
        raise ValueError("a question without gold ids cannot be scored: leave it out")
    count = max(len(rankings), 1)
    precision, recall = {}, {}
    for k in ks:
        precision[k] = sum(any(doc in wanted for doc in ranking[:k]) for ranking, wanted in zip(rankings, gold)) / count
        recall[k] = sum(
            len(set(ranking[:k]) & set(wanted)) / len(wanted) for ranking, wanted in zip(rankings, gold)
        ) / count
    reciprocal = 0.0
    for ranking, wanted in zip(rankings, gold):
        rank = next((i for i, doc in enumerate(ranking[:depth], start=1) if doc in wanted), None)
        reciprocal += 1 / rank if rank else 0.0
    return RetrievalScores(len(rankings), precision, reciprocal / count, recall, depth)


def score_retrieval(
    retriever: Retriever,
    queries: Sequence[tuple[str, str | Collection[str]]],
    ks: Sequence[int] = (1, 5),
    depth: int = DEPTH,
) -> RetrievalScores:
    """p@k, recall@k for each k and MRR over ``(query, relevant id or ids)`` pairs."""
    depth = max(depth, *ks)
    rankings = [[hit.doc_id for hit in retriever.search(query, depth)] for query, _ in queries]
    gold = [{relevant} if isinstance(relevant, str) else set(relevant) for _, relevant in queries]
    return score_rankings(rankings, gold, ks, depth)
