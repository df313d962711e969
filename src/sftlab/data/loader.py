"""Read data files into plain rows that remember where they came from (file and line), so every later error can
name them. JSON and JSONL are parsed here, line by line, because a malformed line must be reported with its number;
CSV and Parquet go through `datasets`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sftlab.errors import DataError


@dataclass
class Row:
    data: dict[str, Any]
    file: str
    line: int  # 1-based line (JSONL) or row number (JSON arrays, CSV, Parquet)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8", file=str(path), line=line) from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _surrogate_field(obj: Any, where: str = "") -> str | None:
    """Where in a parsed JSON value the first lone UTF-16 surrogate sits (a string or a key), or None."""
    if isinstance(obj, str):
        return where or "(value)" if _SURROGATE.search(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{where}.{_printable(k)}" if where else _printable(k)
            if _SURROGATE.search(k):
                return here
            found = _surrogate_field(v, here)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _surrogate_field(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def _check_unicode(obj: Any, source: str, file: str, line: int | None) -> None:
    """JSON's \\uD800-style escapes can decode to lone surrogates, which are not text: tokenizers reject them and
    printing them fails, so they are reported here with their place. Only escapes can produce them (the file was
    decoded as UTF-8), so lines without one are not walked."""
    if "\\ud" not in source and "\\uD" not in source:
        return
    where = _surrogate_field(obj)
    if where is not None:
        raise DataError("contains a lone UTF-16 surrogate (a broken \\u escape such as \\ud800), which is not valid text",
                        file=file, line=line, field=where)


def _json_rows(path: Path) -> list[Row]:
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise DataError("the file is empty", file=str(path))
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg}", file=str(path), line=e.lineno) from None
        if not isinstance(data, list):
            raise DataError("expected a JSON array of objects", file=str(path))
        rows = []
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"row {i + 1} is a {type(obj).__name__}, expected an object", file=str(path))
            _check_unicode(obj, text, str(path), i + 1)
            rows.append(Row(obj, str(path), i + 1))
        return rows
    if stripped[0] == "{" and path.suffix == ".json":
        # A single JSON object is either one row or JSONL saved with a .json suffix; try the former first.
        try:
            obj = json.loads(text)
            if isinstance(obj, dict):
                _check_unicode(obj, text, str(path), 1)
                return [Row(obj, str(path), 1)]
        except json.JSONDecodeError:
            pass
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", file=str(path), line=n) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, found {type(obj).__name__}", file=str(path), line=n)
        _check_unicode(obj, line, str(path), n)
        rows.append(Row(obj, str(path), n))
    return rows


def _table_rows(path: Path, kind: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in many types; name the file either way
        raise DataError(f"cannot read {kind.upper()} file: {e}", file=str(path)) from None
    return [Row(dict(r), str(path), i + 2 if kind == "csv" else i + 1) for i, r in enumerate(ds)]


def read_rows(path_or_name: str, max_samples: int | None = None) -> list[Row]:
    """All rows of one file (or an offline-cached hub dataset), at most max_samples of them."""
    path = Path(path_or_name)
    if not path.exists():
        rows = _hub_rows(path_or_name)
    elif path.is_dir():
        raise DataError("is a directory; give a .json, .jsonl, .csv or .parquet file", file=str(path))
    else:
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            rows = _json_rows(path)
        elif suffix == ".csv":
            rows = _table_rows(path, "csv")
        elif suffix == ".parquet":
            rows = _table_rows(path, "parquet")
        else:
            raise DataError(f"unsupported file type '{suffix}'; use .json, .jsonl, .csv or .parquet", file=str(path))
    if not rows:
        raise DataError("no rows: the dataset is empty", file=str(path_or_name))
    return rows[:max_samples] if max_samples else rows


def iter_rows(path_or_name: str, max_samples: int | None = None) -> Iterator[Row]:
    """The rows of one file, read lazily where the format allows it (JSONL: line by line), so a large file is never
    held in memory; the same rows, line numbers and errors as `read_rows`."""
    path = Path(path_or_name)
    if not (path.is_file() and path.suffix.lower() == ".jsonl" and _starts_with_object(path)):
        yield from read_rows(path_or_name, max_samples)
        return
    for n, (number, line) in enumerate(jsonl_lines(path)):
        if max_samples and n >= max_samples:
            return
        yield _jsonl_row(line, number, str(path))


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSONL file with their 1-based line numbers, decoded lazily; lines are counted as
    read_rows counts them (\r, \u2028... end lines too), and bad UTF-8 is an error naming the line."""
    number, pos = 0, 0
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                text = raw.decode("utf-8-sig" if pos == 0 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (byte {pos + e.start}); re-encode the file as UTF-8", file=str(path),
                                line=number + 1) from None
            pos += len(raw)
            for line in text.splitlines():
                number += 1
                if line.strip():
                    yield number, line


def _starts_with_object(path: Path) -> bool:
    """Whether the file's first non-blank character opens a JSON object (JSONL), read from its first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4096).decode("utf-8-sig", "ignore").lstrip()
    return head.startswith("{")


def _jsonl_row(line: str, number: int, file: str) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", file=file, line=number) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, found {type(obj).__name__}", file=file, line=number)
    _check_unicode(obj, line, file, number)
    return Row(obj, file, number)


def _hub_rows(name: str) -> list[Row]:
    """A hub dataset id, only if it is already in the local cache: never a network request."""
    import os

    if "/" not in name or name.startswith((".", "/")) or Path(name).suffix:
        raise DataError("file not found", file=name)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataError(
            f"not a local file, and not a hub dataset in the offline cache ({type(e).__name__}); sftlab does not "
            "download data: save it as .jsonl/.json/.csv/.parquet and pass the path",
            file=name,
        ) from None
    return [Row(dict(r), name, i + 1) for i, r in enumerate(ds)]
