"""`sftlab data preview`: the first N training examples exactly as the model sees them, trained tokens marked.

Same config and flags as `sftlab train`, so what is previewed is what is trained. Text output wraps trained spans
in colour on a terminal and in `[[...]]` otherwise; JSON output gives ids, labels, the decoded text, the decoded
trained tokens and the marked spans."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from sftlab.config import Config
from sftlab.data.dataset import encode_row, load_rows
from sftlab.data.tokenize import IGNORE_INDEX

_ON, _OFF = "\033[1;32m", "\033[0m"


def _spans(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of (trained?, ids)."""
    runs: list[tuple[bool, list[int]]] = []
    for i, l in zip(ids, labels):
        trained = l != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(i)
        else:
            runs.append((trained, [i]))
    return runs


def marked_spans(tokenizer, ids: list[int], labels: list[int]) -> list[dict]:
    """Consecutive token runs as {"trained", "start", "end" (token positions), "text"}: what `render_marked` marks
    and what the JSON output's "spans" hold (the web UI highlights these)."""
    out, start = [], 0
    for trained, run in _spans(ids, labels):
        text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append({"trained": trained, "start": start, "end": start + len(run), "text": text})
        start += len(run)
    return out


def render_marked(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    out = []
    for span in marked_spans(tokenizer, ids, labels):
        trained, text = span["trained"], span["text"]
        if trained:
            out.append(f"{_ON}{text}{_OFF}" if color else f"[[{text}]]")
        else:
            out.append(text)
    return "".join(out)


def preview(cfg: Config, n: int = 3, fmt: str = "text", out: TextIO = sys.stdout) -> None:
    from sftlab.models.load import load_tokenizer, resolve_model_path
    from sftlab.data.templates import resolve_template
    from sftlab.data.splits import encode_settings
    from sftlab.errors import ConfigError

    if not cfg.data.train_file:
        raise ConfigError("data preview: pass --train_file (or a config with train_file)")
    path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.cache_dir)
    tok = load_tokenizer(path)
    template = resolve_template(cfg, tok, path)
    settings = encode_settings(cfg)
    pairs = load_rows(cfg.data.train_file, settings.dataset_format, settings.column_mapping, n, settings.options)[:n]
    color = fmt == "text" and hasattr(out, "isatty") and out.isatty()
    if fmt == "text":
        print(f"template '{template.name}', train_on={cfg.data.train_on}, cutoff_len={cfg.data.cutoff_len}; "
              + ("trained tokens in green" if color else "trained tokens inside [[...]]"), file=out)
    for k, (f, row) in enumerate(pairs):
        enc, why = encode_row(f, row, tok, template, settings)
        where = f"{row.file}:{row.line}"
        if enc is None:
            if fmt == "json":
                print(json.dumps({"source": where, "dropped": why}), file=out)
            else:
                print(f"\n=== example {k} ({where}, {f}): dropped ({why})", file=out)
            continue
        trained_ids = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
        if fmt == "json":
            print(json.dumps({
                "source": where, "format": f,
                "input_ids": enc.input_ids, "labels": enc.labels,
                "text": tok.decode(enc.input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                "trained_text": tok.decode(trained_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                "prompt_tokens": len(enc.input_ids) - len(trained_ids), "trained_tokens": len(trained_ids),
                "truncated": enc.truncated,
                "spans": marked_spans(tok, enc.input_ids, enc.labels),
            }, ensure_ascii=False), file=out)
        else:
            print(f"\n=== example {k} ({where}, {f}): {len(enc.input_ids)} tokens, "
                  f"{len(enc.input_ids) - len(trained_ids)} prompt, {len(trained_ids)} trained"
                  + (", truncated" if enc.truncated else ""), file=out)
            print(render_marked(tok, enc.input_ids, enc.labels, color), file=out)
