"""Loading document collections (records JSONL, raw JSONL chunked by tokens, LocalRQA pickle) and chunking."""

from __future__ import annotations

import json
import re

import pytest

from sftlab.errors import ConfigError, DataError
from sftlab.data.formats import default_fmt_content
from sftlab.rqa.documents import (
    Document,
    chunk_text,
    documents_hash,
    load_documents,
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_default_fmt_content_matches_localrqa_layout():
    meta = {"source": "https://x.example/a", "title": "Alpha"}
    assert default_fmt_content("Body text.", meta) == "Source: https://x.example/a\nTitle: Alpha\nContent:\nBody text."
    # Missing keys are left out rather than printed as None.
    assert default_fmt_content("Body", {"title": "T"}) == "Title: T\nContent:\nBody"
    assert default_fmt_content("Body", {}) == "Content:\nBody"


def test_document_fills_fmt_content_and_accessors():
    d = Document("Text", metadata={"source": "s1", "title": "T1", "page": 3})
    assert d.fmt_content == "Source: s1\nTitle: T1\nContent:\nText"
    assert (d.source, d.title) == ("s1", "T1")
    kept = Document("Text", fmt_content="custom", metadata={})
    assert kept.fmt_content == "custom" and kept.source is None


def test_load_records_jsonl(tmp_path):
    p = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            {"page_content": "Alpha text", "fmt_content": "F-alpha", "metadata": {"source": "a", "title": "A"}},
            "",  # blank lines are skipped
            {"page_content": "Beta text", "metadata": {"source": "b", "title": "B", "year": 1900}},
            {"text": "Gamma text", "metadata": {"source": "c"}},  # `text` stands in for page_content
        ],
    )
    docs = load_documents(p)
    assert [d.page_content for d in docs] == ["Alpha text", "Beta text", "Gamma text"]
    assert docs[0].fmt_content == "F-alpha"
    assert docs[1].fmt_content == "Source: b\nTitle: B\nContent:\nBeta text"
    assert docs[1].metadata["year"] == 1900


@pytest.mark.parametrize(
    "rows, line, needle",
    [
        ([{"page_content": "ok", "metadata": {}}, "{not json", {"page_content": "x"}], 2, "invalid JSON"),
        ([{"page_content": "ok"}, {"title": "no content"}], 2, "neither"),
        ([{"page_content": 5}], 1, "page_content"),
        ([{"page_content": "ok", "metadata": ["x"]}], 1, "metadata"),
        ([{"page_content": "ok"}, {"text": "raw", "source": "s"}], 2, "raw"),  # kinds may not be mixed
        ([[1, 2]], 1, "JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, rows, line, needle):
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_documents(p)
    msg = str(ei.value)
    assert str(p) in msg and f"line {line}" in msg and needle in msg


def test_missing_and_empty_collection(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_documents(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_documents(tmp_path / "empty.jsonl")


def test_chunk_words_with_overlap_hand_computed():
    text = " ".join(f"w{i}" for i in range(10))
    assert chunk_text(text, None, chunk_size=4, chunk_overlap=1) == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert chunk_text(text, None, chunk_size=4, chunk_overlap=0) == ["w0 w1 w2 w3", "w4 w5 w6 w7", "w8 w9"]
    assert chunk_text(text, None, chunk_size=20, chunk_overlap=5) == [text]
    # Original spacing inside a chunk is preserved (cut from the text, not re-joined).
    assert chunk_text("a  b\nc d", None, chunk_size=3, chunk_overlap=0) == ["a  b\nc", "d"]
    assert chunk_text("   ", None, 4, 1) == []


@pytest.mark.parametrize("size, overlap", [(0, 0), (4, 4), (4, -1), (4, 9)])
def test_chunk_rejects_bad_sizes(size, overlap):
    with pytest.raises(ConfigError):
        chunk_text("a b c", None, size, overlap)


def test_chunk_with_real_tokenizer(smol_tokenizer):
    # Unique sentences, so every chunk has exactly one place in the text.
    text = " ".join(f"Keeper number {i} of Corvish Lighthouse served {i * 3 + 1} winters on Thessary Rock." for i in range(12))
    size, overlap = 24, 6
    chunks = chunk_text(text, smol_tokenizer, size, overlap)
    n_tokens = len(smol_tokenizer(text, add_special_tokens=False)["input_ids"])
    stride = size - overlap
    assert len(chunks) == 1 + -(-(n_tokens - size) // stride)  # first window + ceil((n - size) / stride)
    spans = []
    for chunk in chunks:
        start = text.find(chunk)
        assert start >= 0 and text.count(chunk) == 1, "each chunk is cut verbatim from the text"
        spans.append((start, start + len(chunk)))
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 < e0 < e1, "consecutive chunks advance and overlap"
        shared = text[s1:e0]
        n_shared = len(smol_tokenizer(shared, add_special_tokens=False)["input_ids"])
        assert abs(n_shared - overlap) <= 1
    for chunk in chunks[:-1]:
        assert abs(len(smol_tokenizer(chunk, add_special_tokens=False)["input_ids"]) - size) <= 1


def test_load_raw_jsonl_chunks_and_keeps_metadata(tmp_path):
    body = " ".join(f"tok{i}" for i in range(25))
    p = write_jsonl(
        tmp_path / "raw.jsonl",
        [
            {"text": body, "source": "https://w.example/long", "title": "Long"},
            {"text": "short one", "source": "https://w.example/short", "title": "Short", "lang": "en"},
        ],
    )
    docs = load_documents(p, tokenizer=None, chunk_size=10, chunk_overlap=2)
    words = body.split()
    expected = [" ".join(words[s : s + 10]) for s in (0, 8, 16)] + ["short one"]
    assert [d.page_content for d in docs] == expected
    assert all(d.source == "https://w.example/long" and d.title == "Long" for d in docs[:3])
    assert docs[1].fmt_content == f"Source: https://w.example/long\nTitle: Long\nContent:\n{expected[1]}"
    assert docs[3].metadata == {"source": "https://w.example/short", "title": "Short", "lang": "en"}


def test_load_raw_jsonl_with_tokenizer(tmp_path, smol_tokenizer):
    body = "Kelpbrick is a pressed building block made from dried kelp and lime. " * 6
    p = write_jsonl(tmp_path / "raw.jsonl", [{"text": body, "source": "s", "title": "t"}])
    docs = load_documents(p, tokenizer=smol_tokenizer, chunk_size=16, chunk_overlap=4)
    assert [d.page_content for d in docs] == chunk_text(body, smol_tokenizer, 16, 4)
    assert len(docs) > 1


def test_load_localrqa_pickle_same_records_as_jsonl(tmp_path):
    # The shipped example pickle holds the same collection as documents.jsonl.
    from pathlib import Path

    ex = Path(__file__).resolve().parents[2] / "examples" / "rqa"
    a, b = load_documents(ex / "documents.jsonl"), load_documents(ex / "documents.pkl")
    assert a == b and len(a) >= 40


def test_documents_hash_canonical_and_sensitive():
    d1 = [Document("A", metadata={"source": "s", "title": "t"}), Document("B")]
    same = [Document("A", metadata={"title": "t", "source": "s"}), Document("B")]  # key order irrelevant
    assert documents_hash(d1) == documents_hash(same)
    assert re.fullmatch(r"[0-9a-f]{64}", documents_hash(d1))
    assert documents_hash(d1) != documents_hash(list(reversed(d1)))
    assert documents_hash(d1) != documents_hash([Document("A", metadata={"source": "s2", "title": "t"}), Document("B")])
    assert documents_hash(d1) != documents_hash([Document("A", metadata={"source": "s", "title": "t"}), Document("B ")])
