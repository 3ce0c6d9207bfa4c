"""Token-based chunking with overlap.

A chunk is a window of ``chunk_tokens`` consecutive tokens of one document; the next window starts
``chunk_tokens - overlap_tokens`` tokens later, so neighbouring chunks share ``overlap_tokens``
tokens (t0 used a 50-token overlap). Chunks are character spans of the document text, so a chunk's
text is a slice of the original (formatting kept), whatever tokenizer counted it.

Which tokens: an index with dense vectors counts the embedder's own tokens (so a chunk fits the
embedder's window); a bm25-only index counts words (runs of non-space characters) and needs no
model. bm25 then scores the chunk text with its own analysis (see ``retrievers.BM25_ANALYSIS``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from t0s1.errors import UserError
from t0s1.rag.corpus import Document

WORDS = "words"
"""The token unit of a bm25-only index: runs of non-space characters."""

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class ChunkerSettings:
    """How documents are cut. ``unit`` is ``"words"`` or the embedder whose tokenizer counts."""

    chunk_tokens: int = 200
    overlap_tokens: int = 50
    unit: str = WORDS

    def __post_init__(self) -> None:
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise UserError(f"--chunk-tokens must be a positive integer, got {self.chunk_tokens!r}.")
        if (
            isinstance(self.overlap_tokens, bool)
            or not isinstance(self.overlap_tokens, int)
            or not 0 <= self.overlap_tokens < self.chunk_tokens
        ):
            raise UserError(
                f"--chunk-overlap must be at least 0 and less than --chunk-tokens ({self.chunk_tokens}), "
                f"got {self.overlap_tokens!r}."
            )

    def to_dict(self) -> dict:
        return asdict(self)


Token = tuple[int, int, bool]
"""A token: its (start, end) character span and whether it begins a word."""

SpanFunction = Callable[[list[str]], list[list[Token]]]
"""Texts -> the tokens of each text."""


def word_spans(texts: list[str]) -> list[list[Token]]:
    return [[(*match.span(), True) for match in _WORD.finditer(text)] for text in texts]


def tokenizer_spans(tokenizer) -> SpanFunction:
    """Tokens of a Hugging Face fast tokenizer (its Rust backend: no length warnings), over the
    whole text: a copy without the truncation and padding an embedder's tokenizer.json may set
    (all-MiniLM's cuts at 128 tokens, which left the rest of every document out of the index)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("Chunking by tokens needs a fast tokenizer (one with a tokenizer.json).")
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()

    def spans(texts: list[str]) -> list[list[Token]]:
        result = []
        for encoding in backend.encode_batch(texts, add_special_tokens=False):
            words = encoding.word_ids
            result.append([(start, end, i == 0 or words[i] != words[i - 1]) for i, (start, end) in enumerate(encoding.offsets)])
        return result

    return spans


def chunk_spans(text_length: int, tokens: list[Token], settings: ChunkerSettings) -> list[tuple[int, int]]:
    """Character spans of the chunks of one text, given its tokens: windows of at most
    ``chunk_tokens`` tokens, each starting ``chunk_tokens - overlap_tokens`` tokens after the last
    (or earlier: never past a token no chunk holds yet), that together hold every token.

    A window edge inside a word is moved to the word's edge, so that a chunk holds whole words
    (its text tokenizes back to its tokens): its end back to the word's start, its start past
    pieces of a word that the chunk before holds already. Only a word longer than a window is cut:
    the chunk then ends inside it, and the next one starts with the rest of it."""
    tokens = [token for token in tokens if token[1] > token[0]]
    if not tokens:
        return [(0, text_length)]
    count, width, stride = len(tokens), settings.chunk_tokens, settings.chunk_tokens - settings.overlap_tokens
    windows: list[tuple[int, int]] = []  # (first, final) token of each chunk
    covered = 0  # tokens[:covered] are in a chunk
    start = 0
    while True:
        last = min(start + width, count) - 1
        first = start
        while first < covered and first <= last and not tokens[first][2]:  # the rest of a word a chunk holds
            first += 1
        final = last
        while final >= first and final + 1 < count and not tokens[final + 1][2]:  # a word cut at the end
            final -= 1
        if final < first:  # from first on, no whole word fits: cut inside the word
            final = last
        if not windows or first < windows[-1][0] or final > windows[-1][1]:  # else the chunk before holds it all
            if windows and first <= windows[-1][0] and final >= windows[-1][1]:
                windows.pop()  # this window holds all of the one before
            windows.append((first, final))
        covered = max(covered, final + 1)
        if covered >= count:
            return [(tokens[first][0], tokens[final][1]) for first, final in windows]
        start = min(start + stride, covered)


@dataclass
class Chunks:
    """The chunks of a corpus, as arrays: chunk ``j`` is ``text[start[j]:end[j]]`` of document
    ``doc[j]``. Chunks of a document are contiguous: document ``i`` owns chunks
    ``offsets[i]`` to ``offsets[i + 1] - 1``."""

    doc: np.ndarray  # int32
    start: np.ndarray  # int64
    end: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.doc)

    @property
    def offsets(self) -> np.ndarray:
        counts = np.bincount(self.doc, minlength=int(self.doc[-1]) + 1 if len(self.doc) else 0)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def chunk_documents(
    documents: list[Document],
    settings: ChunkerSettings,
    spans: SpanFunction = word_spans,
    *,
    window: int | None = None,
    batch_size: int = 512,
    on_progress: Callable[[int], None] | None = None,
) -> Chunks:
    """Cut every document into overlapping token windows (at least one chunk per document).
    ``window``: the most tokens the embedder reads of a chunk's indexed text (its document's title,
    then the chunk; ``indexed_text``): a document's windows are narrowed to leave room for its
    title, so the embedder never cuts a chunk's last words."""
    doc_index, starts, ends = [], [], []
    for first in range(0, len(documents), batch_size):
        batch = documents[first : first + batch_size]
        titles = spans([d.title for d in batch]) if window else [()] * len(batch)
        for offset, (document, tokens) in enumerate(zip(batch, spans([d.text for d in batch]), strict=True)):
            for start, end in chunk_spans(len(document.text), tokens, _beside_title(settings, document, len(titles[offset]), window)):
                doc_index.append(first + offset)
                starts.append(start)
                ends.append(end)
        if on_progress:
            on_progress(len(batch))
    return Chunks(np.asarray(doc_index, dtype=np.int32), np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64))


def _beside_title(settings: ChunkerSettings, document: Document, title_tokens: int, window: int | None) -> ChunkerSettings:
    """``settings`` for the chunks of ``document``: windows of at most what the embedder's
    ``window`` leaves beside the title (the overlap shrinks with them)."""
    if window is None or settings.chunk_tokens + title_tokens <= window:
        return settings
    room = window - title_tokens
    if room < 1:
        raise UserError(f"The title of document {document.id!r} is {title_tokens} tokens long: the embedder reads "
                        f"{window} tokens of a chunk with its title, which leaves no room for the text. Shorten the title.")
    return ChunkerSettings(room, min(settings.overlap_tokens, room - 1), settings.unit)


def indexed_text(document: Document, start: int, end: int) -> str:
    """What retrieval sees of a chunk: the document title, then the chunk (titles carry much of
    what a query names)."""
    return f"{document.title}\n{document.text[start:end]}"
