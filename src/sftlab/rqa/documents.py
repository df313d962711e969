"""Document collections for retrieval: a loader for the three on-disk kinds of `Document` records (rqa.schema).

Kinds accepted by `load_documents`:
  * JSONL of records: `page_content` (or `text`) + optional `fmt_content` + `metadata` (`source`, `title`, ...);
  * raw JSONL of `text`, `source`, `title` (no `metadata` object), chunked here by tokens with overlap;
  * a LocalRQA pickle (a list of Document objects), read by the restricted unpickler in `safe_pickle`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

from sftlab.errors import ConfigError, DataError
from sftlab.rqa.schema import Document

PICKLE_SUFFIXES = (".pkl", ".pickle")


def as_document(obj: Document | dict) -> Document:
    """Accept either a Document or an rqa-row dict, so metrics work on gold_docs straight from the data."""
    return obj if isinstance(obj, Document) else Document.from_dict(obj)


# ----------------------------------------------------------------------------------------------- chunking


def chunk_text(text: str, tokenizer: Any = None, chunk_size: int = 256, chunk_overlap: int = 32) -> list[str]:
    """Split `text` into windows of `chunk_size` tokens, consecutive windows sharing `chunk_overlap` tokens.

    Chunks are cut from the original string at token offsets (not decoded), so no tokenizer artefacts leak
    into the passages. Without a tokenizer, whitespace-separated words are the tokens.
    """
    if chunk_size <= 0:
        raise ConfigError(f"chunk_size must be positive, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise ConfigError(f"chunk_overlap must be in [0, chunk_size={chunk_size}), got {chunk_overlap}")
    spans = _token_spans(text, tokenizer)
    if not spans:
        return []
    stride = chunk_size - chunk_overlap
    chunks = []
    start = 0
    while True:
        end = min(start + chunk_size, len(spans))
        chunks.append(text[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):
            return chunks
        start += stride


def _token_spans(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """Character spans of the tokens of `text` (special tokens excluded, empty spans dropped)."""
    if tokenizer is None:
        return [m.span() for m in re.finditer(r"\S+", text)]
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (python) tokenizers cannot report offsets
        raise ConfigError("chunking raw documents needs a fast tokenizer (one that reports offsets)") from e
    spans = []
    for a, b in enc["offset_mapping"]:
        # Byte-level BPE may report a leading space inside the span; either way the span is a substring.
        if b > a:
            spans.append((a, b))
    return spans


# ----------------------------------------------------------------------------------------------- loading


def load_documents(
    path: str | Path, tokenizer: Any = None, chunk_size: int = 256, chunk_overlap: int = 32
) -> list[Document]:
    """Read a document collection (see the module docstring for the accepted kinds)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("document collection not found", file=str(path))
    with path.open("rb") as f:
        # Protocol 2+ pickles start with the PROTO opcode 0x80, which no UTF-8 JSONL file can start with.
        looks_pickled = f.read(1) == b"\x80"
    if path.suffix.lower() in PICKLE_SUFFIXES or looks_pickled:
        from sftlab.rqa.safe_pickle import load_document_pickle

        docs = load_document_pickle(path)
    else:
        docs = _load_jsonl(path, tokenizer, chunk_size, chunk_overlap)
    if not docs:
        raise DataError("document collection is empty", file=str(path))
    return docs


def _load_jsonl(path: Path, tokenizer: Any, chunk_size: int, chunk_overlap: int) -> list[Document]:
    docs: list[Document] = []
    kind: str | None = None  # decided by the first row; later rows must agree, so a typo can't switch modes
    from sftlab.data.loader import _read_text  # reports non-UTF-8 bytes with their line

    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", file=str(path), line=lineno) from None
        if not isinstance(row, dict):
            raise DataError("expected a JSON object per line", file=str(path), line=lineno)
        row_kind = "records" if ("page_content" in row or "metadata" in row) else "raw" if "text" in row else None
        if row_kind is None:
            raise DataError(
                "row has neither 'page_content' (document record) nor 'text' (raw document)",
                file=str(path),
                line=lineno,
            )
        if kind is None:
            kind = row_kind
        elif row_kind != kind:
            raise DataError(
                f"row looks like a {row_kind} document but earlier rows are {kind} documents "
                "(records have 'page_content'/'metadata'; raw documents have 'text', 'source', 'title')",
                file=str(path),
                line=lineno,
            )
        if kind == "records":
            docs.append(_record_from_row(row, path, lineno))
        else:
            docs.extend(_chunks_from_raw_row(row, path, lineno, tokenizer, chunk_size, chunk_overlap))
    return docs


def _record_from_row(row: dict, path: Path, lineno: int) -> Document:
    key = "page_content" if "page_content" in row else "text"
    content = row.get(key)
    if not isinstance(content, str):
        raise DataError("must be a string", file=str(path), line=lineno, field=key)
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise DataError("must be an object", file=str(path), line=lineno, field="metadata")
    fmt = row.get("fmt_content") or ""
    if not isinstance(fmt, str):
        raise DataError("must be a string", file=str(path), line=lineno, field="fmt_content")
    return Document(page_content=content, fmt_content=fmt, metadata=dict(metadata))


def _chunks_from_raw_row(
    row: dict, path: Path, lineno: int, tokenizer: Any, chunk_size: int, chunk_overlap: int
) -> list[Document]:
    text = row.get("text")
    if not isinstance(text, str):
        raise DataError("must be a string", file=str(path), line=lineno, field="text")
    metadata = {}
    for key, value in row.items():
        if key != "text":
            metadata[key] = value
    # fmt_content is left empty so every chunk gets its own Source/Title header.
    return [Document(page_content=chunk, metadata=dict(metadata)) for chunk in chunk_text(text, tokenizer, chunk_size, chunk_overlap)]


# ----------------------------------------------------------------------------------------------- hashing


def documents_hash(docs: Sequence[Document]) -> str:
    """sha256 over a canonical JSON of the records (order matters: index row i is document i)."""
    h = hashlib.sha256()
    for doc in docs:
        line = json.dumps(doc.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def write_documents_jsonl(docs: Sequence[Document], path: str | Path) -> None:
    """Write records in the JSONL-of-records kind that `load_documents` reads back unchanged."""
    with Path(path).open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc.to_dict(), ensure_ascii=False, default=str) + "\n")
