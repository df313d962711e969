"""Files -> tokenized examples, with truncation, drop accounting, an on-disk cache and a printed summary.

Flow: `loader.read_rows` (file, line) -> `formats.to_messages` -> `templates.render` -> `tokenize.encode_*` ->
truncation -> examples `{"input_ids", "labels"}`. Rows are validated while being converted, so every bad row fails
here, before any model is loaded. The result is cached under a key made of the data's bytes, the tokenizer, the
template and every setting that changes the output; other ranks of a distributed run read that cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftlab.data import formats as F
from sftlab.data.loader import Row, read_rows
from sftlab.data.templates import Message, Template
from sftlab.data.tools import assistant_text, call_dicts
from sftlab.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    cut_to_length,
    encode_messages,
    encode_prompt,
    encode_text,
    last_answer_start,
)
from sftlab.errors import DataError

CACHE_VERSION = "1"


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
    """One row -> (example, None) or (None, reason it was dropped). `with_answer_mask`: see `Encoded`."""
    try:
        return _encode_row(fmt, row, tokenizer, template, s, with_answer_mask)
    except DataError as e:
        if e.file is not None:
            raise
        # A template's complaint about the conversation (it refused it, or dropped a turn's reasoning): name the row.
        raise DataError(str(e), file=row.file, line=row.line) from None


def _encode_row(fmt: str, row: Row, tokenizer, template: Template, s: EncodeSettings,
                with_answer_mask: bool) -> tuple[Encoded | None, str | None]:
    if fmt == "text":
        enc = encode_text(tokenizer, F.row_text(row))
        if len(enc.input_ids) > s.cutoff_len:
            if s.truncation == "error":
                raise DataError(f"{len(enc.input_ids)} tokens exceed cutoff_len={s.cutoff_len}", file=row.file, line=row.line)
            if s.truncation == "drop":
                return None, "too long"
            enc = Encoded(enc.input_ids[: s.cutoff_len], enc.labels[: s.cutoff_len], truncated=True)
        return enc, None
    messages = F.to_messages(fmt, row, s.options)
    tools = F.row_tools(row)
    enc = encode_messages(tokenizer, template, messages, s.train_on, tools, s.train_on_reasoning,
                          with_answer_mask)
    if len(enc.input_ids) > s.cutoff_len:
        if s.truncation == "error":
            raise DataError(f"{len(enc.input_ids)} tokens exceed cutoff_len={s.cutoff_len} (truncation=error)",
                            file=row.file, line=row.line)
        if s.truncation == "drop":
            return None, "too long"
        # Oldest context first: whole earlier exchanges / history entries, while any remain.
        for drop in range(1, F.context_units(fmt, row, s.options) + 1):
            shorter = F.to_messages(fmt, row, s.options, drop=drop)
            if shorter is None:
                break
            enc = encode_messages(tokenizer, template, shorter, s.train_on, tools, s.train_on_reasoning,
                                  with_answer_mask)
            enc.truncated = True
            if len(enc.input_ids) <= s.cutoff_len:
                break
        if len(enc.input_ids) > s.cutoff_len:
            enc = cut_to_length(enc, s.cutoff_len, last_answer_start(enc))
    if all(l == IGNORE_INDEX for l in enc.labels):
        return None, "no trained token"
    return enc, None


def _encode_chunk(args: tuple) -> list[tuple[dict | None, str | None, str, bool]]:
    pairs, tokenizer, template, settings = args
    out = []
    for fmt, row in pairs:
        enc, why = encode_row(fmt, row, tokenizer, template, settings)
        out.append(({"input_ids": enc.input_ids, "labels": enc.labels} if enc else None, why, fmt,
                    bool(enc and enc.truncated)))
    return out


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
    from sftlab.models.bundled import default_cache_dir

    return default_cache_dir() / "data"


def tokenize_files(files: list[str], split: str, tokenizer, template: Template, settings: EncodeSettings,
                   max_samples: int | None = None, num_workers: int | None = None,
                   cache_dir: str | None = None, overwrite_cache: bool = False) -> tuple[list[dict], DataSummary]:
    """Tokenized examples of one split and its summary, from the cache when the same inputs were seen before."""
    key = _fingerprint({
        "v": CACHE_VERSION, "files": _files_digest(files), "tok": tokenizer_fingerprint(tokenizer),
        "template": template.to_dict(), "settings": asdict(settings), "max_samples": max_samples,
    })
    cache_root = Path(cache_dir) if cache_dir else default_data_cache()
    entry = cache_root / key[:32]
    if entry.is_dir() and (entry / "summary.json").is_file() and not overwrite_cache:
        examples = [json.loads(l) for l in (entry / "examples.jsonl").read_text().splitlines() if l]
        summary = DataSummary(**json.loads((entry / "summary.json").read_text()))
        summary.split = split
        return examples, summary

    pairs = load_rows(files, settings.dataset_format, settings.column_mapping, max_samples, settings.options)
    summary = DataSummary(split=split, rows_read=len(pairs))
    if num_workers and num_workers > 1 and len(pairs) > 64:
        import multiprocessing as mp

        size = (len(pairs) + num_workers - 1) // num_workers
        chunks = [(pairs[i:i + size], tokenizer, template, settings) for i in range(0, len(pairs), size)]
        with mp.get_context("spawn").Pool(num_workers) as pool:
            results = [x for part in pool.map(_encode_chunk, chunks) for x in part]
    else:
        results = _encode_chunk((pairs, tokenizer, template, settings))
    examples = []
    fmts: Counter = Counter()
    dropped: Counter = Counter()
    for ex, why, fmt, truncated in results:
        fmts[fmt] += 1
        if ex is None:
            dropped[why] += 1
            continue
        examples.append(ex)
        summary.truncated += truncated
        n_trained = sum(l != IGNORE_INDEX for l in ex["labels"])
        summary.trained_tokens += n_trained
        summary.prompt_tokens += len(ex["input_ids"]) - n_trained
    summary.kept = len(examples)
    summary.dropped = dict(dropped)
    summary.formats = dict(fmts)
    if not examples:
        raise DataError(f"{split}: no example left to train on ({summary.line()})", file=", ".join(files))
    _write_cache(entry, examples, summary)
    return examples, summary


def _write_cache(entry: Path, examples: list[dict], summary: DataSummary) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        with open(tmp / "examples.jsonl", "w") as fh:
            for ex in examples:
                fh.write(json.dumps(ex) + "\n")
        (tmp / "summary.json").write_text(json.dumps(asdict(summary)))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError:
        pass  # the cache is an optimisation; a read-only or full disk must not stop training


@dataclass
class PredictItem:
    prompt: str  # the rendered prompt text
    prompt_ids: list[int]
    label: str
    messages: list[Message]
    tools: list[dict] | None = None
    label_calls: list[dict] | None = None  # the answer's tool calls ({"name", "arguments"}), when it makes any


def prediction_items(files: list[str], tokenizer, template: Template, settings: EncodeSettings,
                     max_samples: int | None = None) -> list[PredictItem]:
    """For generation: each row's conversation up to its final answer, and that answer as the label."""
    items = []
    for fmt, row in load_rows(files, settings.dataset_format, settings.column_mapping, max_samples,
                              settings.options):
        if fmt == "text":
            raise DataError("prediction needs prompts and answers; the 'text' format has none", file=row.file)
        messages = F.to_messages(fmt, row, settings.options)
        tools = F.row_tools(row)
        prompt_msgs, answer = messages[:-1], messages[-1]
        ids = encode_prompt(tokenizer, template, prompt_msgs, tools)
        if len(ids) > settings.cutoff_len:
            ids = ids[-settings.cutoff_len:]  # the end of the prompt holds the question
        calls = call_dicts(answer.tool_calls) if answer.tool_calls else None
        items.append(PredictItem(template.render_prompt(prompt_msgs, tools), ids, assistant_text(answer),
                                 prompt_msgs, tools, calls))
    return items


def split_off(examples: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split val_size (a fraction < 1, or a count >= 1) of the examples off as an eval set, reproducibly."""
    import random

    n = len(examples)
    k = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise DataError(f"val_size={val_size} leaves no training or no eval example out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in eval_idx], [e for i, e in enumerate(examples) if i in eval_idx]
