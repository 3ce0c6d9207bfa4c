"""Loading a corpus for retrieval: JSONL, Parquet, or a folder of ``.txt`` / ``.md`` files.

Every source becomes a list of ``Document(id, title, text)``. Field names are mapped: by default
each field is the first of its aliases that a row has (``FIELD_ALIASES``), so t0's NHS files
(``condition_title`` / ``condition_content``) load as they are; ``FieldMap`` names them
explicitly. A row without an id takes its title as id (t0's pages are named by their title), and
a row without either its line (or row) number. Errors name the file and the line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from t0s1.errors import UserError
from t0s1.jsonl import read_jsonl

FIELD_ALIASES = {
    "id": ("id", "doc_id", "_id"),
    "title": ("title", "condition_title", "name"),
    "text": ("text", "content", "condition_content", "body"),
}
"""For each document field, the row keys tried in order when no explicit name is given."""

TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    """One document of a corpus: the unit retrieval returns (a parent of its chunks)."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class FieldMap:
    """Which row keys hold a document's id, title and text (None: try ``FIELD_ALIASES``)."""

    id: str | None = None
    title: str | None = None
    text: str | None = None

    def keys(self, field: str) -> tuple[str, ...]:
        explicit = getattr(self, field)
        return (explicit,) if explicit else FIELD_ALIASES[field]

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "text": self.text}


def load_corpus(path: str | Path, fields: FieldMap | None = None) -> list[Document]:
    """The documents of a JSONL file, a Parquet file, or a folder of ``.txt`` / ``.md`` files.

    A ``UserError`` names the problem: no such path, an empty corpus, a row without text, a
    duplicate id.
    """
    path = Path(path)
    fields = fields or FieldMap()
    if path.is_dir():
        documents = _load_folder(path)
    elif not path.exists():
        raise UserError(f"No corpus at {path}: give a .jsonl or .parquet file or a folder of .txt / .md files.")
    elif path.suffix == ".parquet":
        documents = _from_rows(path, _parquet_rows(path), fields, "row")
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        documents = _from_rows(path, read_jsonl(path), fields, "line")
    else:
        raise UserError(f"{path}: unknown corpus format {path.suffix!r}; use .jsonl, .parquet or a folder of .txt / .md files.")
    if not documents:
        raise UserError(f"{path} holds no documents: the corpus is empty.")
    return documents


def check_documents(documents: list[Document]) -> list[Document]:
    """Documents given in Python meet the rules of loaded ones: some, each with a text, ids unique."""
    if not documents:
        raise UserError("The corpus is empty: give at least one document.")
    first_seen: dict[str, int] = {}
    for number, document in enumerate(documents, start=1):
        if not isinstance(document, Document):
            raise UserError(f"Document {number} is a {type(document).__name__}, not a t0s1.rag.Document.")
        if not document.text.strip():
            raise UserError(f"Document {number} ({document.id!r}) has no text; every document needs a non-empty text.")
        if document.id in first_seen:
            raise UserError(f"Document {number}: duplicate id {document.id!r} (first at document {first_seen[document.id]}).")
        first_seen[document.id] = number
    return documents


def corpus_sha256(documents: list[Document]) -> str:
    """A fingerprint of the documents as loaded (ids, titles, texts, order), whatever the format."""
    digest = hashlib.sha256()
    for document in documents:
        # surrogatepass: a JSON "\ud800" escape loads as a lone surrogate, which plain UTF-8 cannot encode
        digest.update(json.dumps([document.id, document.title, document.text], ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(b"\n")
    return digest.hexdigest()


def _encodes(text: str) -> bool:
    """Whether ``text`` is valid Unicode for UTF-8 (JSON may carry lone surrogates: ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parquet_rows(path: Path) -> list[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable Parquet file ({error}).") from None
    return list(enumerate(table.to_pylist(), start=1))


def _from_rows(path: Path, rows: list[tuple[int, dict]], fields: FieldMap, unit: str) -> list[Document]:
    documents = []
    first_seen: dict[str, int] = {}
    for number, row in rows:
        where = f"{path}, {unit} {number}"
        text = _field(row, fields, "text")
        if not isinstance(text, str) or not text.strip():
            tried = " / ".join(repr(key) for key in fields.keys("text"))
            raise UserError(
                f"{where}: no text (looked for {tried}); every document needs a non-empty text. "
                "Name the field with --text-field."
            )
        title = _field(row, fields, "title")
        doc_id = _field(row, fields, "id")
        for name, value in (("title", title), ("id", doc_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
                raise UserError(f"{where}: the {name} is {type(value).__name__} ({str(value)[:60]!r}); give a string or a number.")
        for name, value in (("text", text), ("title", title), ("id", doc_id)):
            if isinstance(value, str) and not _encodes(value):
                raise UserError(f"{where}: the {name} holds a lone surrogate (an escape such as \\ud800 that is half of a "
                                "character): it cannot be written as UTF-8. Fix the corpus.")
        title = "" if title is None else str(title).strip()
        if doc_id is None or str(doc_id).strip() == "":
            doc_id = title or str(number)
        doc_id = str(doc_id).strip()
        if doc_id in first_seen:
            raise UserError(
                f"{where}: duplicate id {doc_id!r} (first at {unit} {first_seen[doc_id]}); ids must be unique. "
                "Fix the corpus or name another id field with --id-field."
            )
        first_seen[doc_id] = number
        documents.append(Document(doc_id, title or doc_id, text.strip()))
    return documents


def _field(row: dict, fields: FieldMap, field: str):
    for key in fields.keys(field):
        if key in row and row[key] is not None:
            return row[key]
    return None


def _load_folder(folder: Path) -> list[Document]:
    """One document per ``.txt`` / ``.md`` file (recursively, sorted): the id is the relative
    path, the title the first Markdown heading or else the file name."""
    documents = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{file}: not UTF-8 text; convert it or leave it out of the corpus folder.") from None
        if not text.strip():
            raise UserError(f"{file}: the file is empty; every document needs a non-empty text.")
        title, body = _title_and_body(file, text)
        documents.append(Document(file.relative_to(folder).as_posix(), title, body))
    return documents


def _title_and_body(file: Path, text: str) -> tuple[str, str]:
    lines = text.strip().splitlines()
    if file.suffix == ".md" and lines[0].startswith("# "):
        body = "\n".join(lines[1:]).strip()
        return lines[0][2:].strip(), body or lines[0][2:].strip()
    return file.stem.replace("_", " ").replace("-", " ").strip() or file.name, text.strip()
