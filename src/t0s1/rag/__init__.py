"""Retrieval-augmented reasoning (the t0 pipeline): index a corpus, retrieve parent documents,
reason over them with budget forcing.

    from t0s1.rag import build_index, open_index, ask
    build_index("conditions.jsonl", "runs/index", retriever="hybrid")
    index = open_index("runs/index")
    reply = ask(lm, index, "I keep throwing up and feel exhausted", BudgetForcing(256, num_ignore=3))
    reply.answer, reply.sources, reply.cited

Layout: ``corpus`` (loaders), ``chunking`` (token windows with overlap), ``embedders`` (dense
models, the embedded default checked by hash), ``store`` (the index folder, Qdrant), ``retrievers``
(bm25, dense, hybrid, re-rankers), ``prompt`` (sources packed into the context), ``answer`` (the
whole path), ``metrics`` (p@k, recall@k, MRR), ``synthetic`` (generated corpora with questions),
``questions`` (question files, resumable outputs), ``evaluate`` (``rag eval``: retrieval scores and
the grid of k x budgets), ``teacher`` (OpenAI-compatible or local teachers), ``synth``
(``rag synth-questions``), ``traces`` (``rag traces``: s1K rows), ``demo``
(``quickstart --rag``), ``cli`` (``t0s1 index`` / ``t0s1 rag``).
"""

from t0s1.rag.answer import RagAnswer, RagRequest, ask, ask_many, retrieve_sources
from t0s1.rag.chunking import ChunkerSettings, chunk_documents
from t0s1.rag.corpus import Document, FieldMap, corpus_sha256, load_corpus
from t0s1.rag.embedders import EMBEDDED_EMBEDDER, Embedder, load_embedder
from t0s1.rag.prompt import INCONCLUSIVE, RagPrompt, build_rag_messages, reserve_tokens
from t0s1.rag.retrievers import (
    RETRIEVERS,
    CrossEncoderReranker,
    Hit,
    LlmReranker,
    RerankedRetriever,
    Retriever,
)
from t0s1.rag.store import BuildResult, Index, QdrantTarget, build_index, open_index

__all__ = [
    "EMBEDDED_EMBEDDER",
    "INCONCLUSIVE",
    "RETRIEVERS",
    "BuildResult",
    "ChunkerSettings",
    "CrossEncoderReranker",
    "Document",
    "Embedder",
    "FieldMap",
    "Hit",
    "Index",
    "LlmReranker",
    "QdrantTarget",
    "RagAnswer",
    "RagPrompt",
    "RagRequest",
    "RerankedRetriever",
    "Retriever",
    "ask",
    "ask_many",
    "build_index",
    "build_rag_messages",
    "chunk_documents",
    "corpus_sha256",
    "load_corpus",
    "load_embedder",
    "open_index",
    "reserve_tokens",
    "retrieve_sources",
]
