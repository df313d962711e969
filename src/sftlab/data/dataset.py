"""Files -> tokenized examples, with truncation, drop accounting, an on-disk cache and a printed summary.

Flow: `loader.iter_rows` (file, line) -> `formats.to_messages` -> `templates.render` -> `tokenize.encode_*` ->
truncation -> examples `{"input_ids", "labels"}`. `encode_row` does this for one row (the reference);
`tokenize_files` does it in batches over worker processes (sftlab.data.batched) and writes the examples to an
Arrow file that is then memory-mapped (sftlab.data.store). Rows are validated while being converted, so every bad
row fails here, before any model is loaded. The cache entry is keyed by the data's bytes, the tokenizer, the
template and every setting that changes the output; other ranks of a distributed run map that entry.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sftlab.data import formats as F
from sftlab.data.batched import count_trained, encode_stream
from sftlab.data.fitting import fit_encoded, naming_row
from sftlab.data.loader import Row, iter_rows, read_rows
from sftlab.data.store import EXAMPLES_FILE, ExampleWriter, TokenizedExamples
from sftlab.data.messages import Message
from sftlab.data.templates import Template
from sftlab.data.tools import assistant_text, call_dicts
from sftlab.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    encode_messages,
    encode_prompt,
    fit_prompt,
    encode_text,
)
from sftlab.errors import DataError

CACHE_VERSION = "4"  # 2: Arrow files; 3: with trained-token counts; 4: with per-row facts (rows.arrow)


@dataclass
class DataSummary:
    split: str
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    trained_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        dropped = sum(self.dropped.values())
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"[{self.split}] rows read {self.rows_read}, kept {self.kept}, truncated {self.truncated}, "
            f"dropped {dropped} ({why}); prompt tokens {self.prompt_tokens}, trained tokens {self.trained_tokens}; "
            f"formats {dict(self.formats)}"
        )


@dataclass
class EncodeSettings:
    train_on: str
    cutoff_len: int
    truncation: str
    dataset_format: str | None
    column_mapping: dict[str, str]
    options: F.FormatOptions
    train_on_reasoning: bool = True


Pairs = list[tuple[str, Row]]  # (format, row)
REWRITE_CHUNK_ROWS = 4096  # rows given to a RowRewrite at a time: memory stays bounded, batch calls stay large


@dataclass(frozen=True)
class RowRewrite:
    """A step that rewrites rows in memory after they are read and before they are encoded (the retrieval step of
    ``rqa_context: retrieved``, given by the workflow, which owns the retriever).

    ``apply(pairs, split) -> pairs``: a chunk of (format, row) pairs in, the same number out, in order (a row keeps
    its file and line, so later errors name where it came from). ``key``: everything the output depends on besides
    the rows and the encode settings (for retrieval: the index, k, the seed); part of the tokenized cache key, so a
    changed index is never served from a stale cache."""

    apply: Callable[[Pairs, str], Pairs]
    key: dict[str, Any]


def rewritten(pairs: Iterable[tuple[str, Row]], rewrite: RowRewrite | None, split: str) -> Iterator[tuple[str, Row]]:
    """The pairs through `rewrite`, REWRITE_CHUNK_ROWS at a time (lazily: a stream stays a stream)."""
    if rewrite is None:
        yield from pairs
        return
    it = iter(pairs)
    while chunk := list(itertools.islice(it, REWRITE_CHUNK_ROWS)):
        out = rewrite.apply(chunk, split)
        if len(out) != len(chunk):
            raise ValueError(f"a row rewrite returned {len(out)} rows for {len(chunk)}")
        yield from out


def load_rows(files: list[str], dataset_format: str | None, column_mapping: dict[str, str],
              max_samples: int | None, options: F.FormatOptions | None = None) -> list[tuple[str, Row]]:
    """(format, row) pairs from every file; the format is detected per file unless given (for the run, or for
    the file by its dataset_info.json entry)."""
    out: list[tuple[str, Row]] = []
    for path in files:
        own = options.files.get(path) if options else None
        if own is not None:
            dataset_format = own.dataset_format or dataset_format
            column_mapping = {**column_mapping, **own.column_mapping}
        rows = read_rows(path, max_samples)
        rows = [F.apply_column_mapping(r, column_mapping) for r in rows]
        if dataset_format:
            if dataset_format not in F.FORMATS:
                raise DataError(f"unknown dataset_format '{dataset_format}'; choose one of {F.FORMATS}")
            fmt = dataset_format
        else:
            fmt = F.detect_format(set(rows[0].data), path)
        out += [(fmt, r) for r in rows]
    return out


def encode_row(fmt: str, row: Row, tokenizer, template: Template, s: EncodeSettings,
               with_answer_mask: bool = False) -> tuple[Encoded | None, str | None]:
    """One row -> (example, None) or (None, reason it was dropped). `with_answer_mask`: see `Encoded`. The
    per-row reference: the batched path (sftlab.data.batched) gives the same examples, tested token for token."""
    with naming_row(row):
        if fmt == "text":
            return fit_encoded(fmt, row, encode_text(tokenizer, F.row_text(row)), tokenizer, template, s)
        messages = F.to_messages(fmt, row, s.options)
        enc = encode_messages(tokenizer, template, messages, s.train_on, F.row_tools(row), s.train_on_reasoning,
                              with_answer_mask)
        return fit_encoded(fmt, row, enc, tokenizer, template, s, with_answer_mask)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256((state + str(tokenizer.all_special_tokens)).encode()).hexdigest()


def _files_digest(files: list[str]) -> list[str]:
    out = []
    for f in files:
        p = Path(f)
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out.append(f"{p.name}:{h.hexdigest()}")
        else:
            out.append(f)
    return out


def default_data_cache() -> Path:
    from sftlab.files import default_cache_dir

    return default_cache_dir() / "data"


def stream_rows(files: list[str], dataset_format: str | None, column_mapping: dict[str, str],
                max_samples: int | None, options: F.FormatOptions | None = None) -> Iterator[tuple[str, Row]]:
    """(format, row) pairs from every file, read lazily (as `load_rows`, which lists them all)."""
    for path in files:
        fmt, mapping = dataset_format, column_mapping
        own = options.files.get(path) if options else None
        if own is not None:
            fmt = own.dataset_format or fmt
            mapping = {**mapping, **own.column_mapping}
        if fmt and fmt not in F.FORMATS:
            raise DataError(f"unknown dataset_format '{fmt}'; choose one of {F.FORMATS}")
        for row in iter_rows(path, max_samples):
            row = F.apply_column_mapping(row, mapping)
            if fmt is None:
                fmt = F.detect_format(set(row.data), path)
            yield fmt, row


def _rows_hint(files: list[str], max_samples: int | None) -> int | None:
    """About how many rows the files hold (JSONL lines), for the progress bar; None when unknown."""
    total = 0
    for f in files:
        p = Path(f)
        if not (p.is_file() and p.suffix.lower() == ".jsonl"):
            return None
        with open(p, "rb") as fh:
            n = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))
        total += min(n, max_samples) if max_samples else n
    return total


def cache_key(files: list[str], tokenizer, template: Template, settings: EncodeSettings,
              max_samples: int | None, rewrite: RowRewrite | None = None) -> str:
    parts = {
        "v": CACHE_VERSION, "files": _files_digest(files), "tok": tokenizer_fingerprint(tokenizer),
        "template": template.to_dict(), "settings": asdict(settings), "max_samples": max_samples,
    }
    if rewrite is not None:
        parts["rewrite"] = rewrite.key
    return _fingerprint(parts)


def tokenize_files(files: list[str], split: str, tokenizer, template: Template, settings: EncodeSettings,
                   max_samples: int | None = None, num_workers: int | None = None,
                   cache_dir: str | None = None, overwrite_cache: bool = False,
                   rewrite: RowRewrite | None = None) -> tuple[TokenizedExamples, DataSummary]:
    """Tokenized examples of one split (memory-mapped from the on-disk cache) and its summary.

    The cache entry is keyed by the data's bytes, the tokenizer, the template, every setting that changes the
    output and `rewrite`'s key; when it exists the files are not read again (this is how the other ranks of a
    distributed run get their data: the main process tokenizes first). `rewrite` changes the rows in memory
    before they are encoded (see RowRewrite)."""
    key = cache_key(files, tokenizer, template, settings, max_samples, rewrite)
    cache_root = Path(cache_dir) if cache_dir else default_data_cache()
    entry = cache_root / key[:32]
    if (entry / "summary.json").is_file() and (entry / EXAMPLES_FILE).is_file() and not overwrite_cache:
        summary = DataSummary(**json.loads((entry / "summary.json").read_text()))
        summary.split = split
        return TokenizedExamples(entry / EXAMPLES_FILE), summary
    try:
        writer = ExampleWriter(entry)
    except OSError:
        # The cache directory is not writable: the examples still go to disk, in a temporary directory.
        writer = ExampleWriter(Path(tempfile.mkdtemp(prefix="sftlab-data-")) / key[:32])
    summary = DataSummary(split=split)
    fmts: Counter = Counter()
    dropped: Counter = Counter()
    try:
        pairs = stream_rows(files, settings.dataset_format, settings.column_mapping, max_samples, settings.options)
        pairs = rewritten(pairs, rewrite, split)
        for chunk in encode_stream(pairs, tokenizer, template, settings, num_workers=num_workers,
                                   total=_rows_hint(files, max_samples), desc=f"tokenize {split}"):
            writer.write(chunk.input_ids, chunk.labels, chunk.lengths, chunk.facts)
            summary.rows_read += chunk.rows
            summary.kept += len(chunk.lengths)
            summary.truncated += chunk.truncated
            trained = count_trained(chunk.labels)
            summary.trained_tokens += trained
            summary.prompt_tokens += len(chunk.input_ids) - trained
            fmts.update(chunk.formats)
            dropped.update(chunk.dropped)
        summary.dropped = dict(dropped)
        summary.formats = dict(fmts)
        if not summary.kept:
            raise DataError(f"{split}: no example left to train on ({summary.line()})", file=", ".join(files))
        path = writer.commit({"summary.json": json.dumps(asdict(summary))})
    except BaseException:
        writer.abort()
        raise
    return TokenizedExamples(path / EXAMPLES_FILE), summary


@dataclass
class PredictItem:
    prompt: str  # the rendered prompt text
    prompt_ids: list[int]
    label: str
    messages: list[Message]
    tools: list[dict] | None = None
    label_calls: list[dict] | None = None  # the answer's tool calls ({"name", "arguments"}), when it makes any


def prediction_items(files: list[str], tokenizer, template: Template, settings: EncodeSettings,
                     max_samples: int | None = None, rewrite: RowRewrite | None = None,
                     split: str = "test") -> list[PredictItem]:
    """For generation: each row's conversation up to its final answer, and that answer as the label. `rewrite`
    changes the rows first, as for training (see RowRewrite)."""
    items = []
    pairs = load_rows(files, settings.dataset_format, settings.column_mapping, max_samples, settings.options)
    for fmt, row in rewritten(pairs, rewrite, split):
        if fmt == "text":
            raise DataError("prediction needs prompts and answers; the 'text' format has none", file=row.file)
        messages = F.to_messages(fmt, row, settings.options)
        tools = F.row_tools(row)
        answer = messages[-1]
        ids, prompt_msgs = fit_prompt(tokenizer, template, _prompt_without(fmt, row, settings.options),
                                      settings.cutoff_len, tools)
        calls = call_dicts(answer.tool_calls) if answer.tool_calls else None
        items.append(PredictItem(template.render_prompt(prompt_msgs, tools), ids, assistant_text(answer),
                                 prompt_msgs, tools, calls))
    return items


def _prompt_without(fmt: str, row: Row, options: F.FormatOptions):
    """messages_without for `tokenize.fit_prompt`: the row's prompt without its n oldest context units."""
    units = F.context_units(fmt, row, options)

    def messages_without(n: int) -> list[Message] | None:
        msgs = F.to_messages(fmt, row, options, drop=n) if n <= units else None
        return msgs[:-1] if msgs else None

    return messages_without


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and the eval examples when val_size (a fraction < 1, or a count >= 1) of n
    examples is split off, reproducibly; each list in the examples' order."""
    import random

    k = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise DataError(f"val_size={val_size} leaves no training or no eval example out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:k])
    return [i for i in range(n) if i not in eval_idx], sorted(eval_idx)


def split_off(examples: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split val_size (a fraction < 1, or a count >= 1) of the examples off as an eval set, reproducibly."""
    train_idx, eval_idx = split_indices(len(examples), val_size, seed)
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]