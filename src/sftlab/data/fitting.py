"""A row's full encoding fitted to ``cutoff_len`` under the truncation policy, shared by the per-row reference
(`dataset.encode_row`) and the batched path (`batched`), so both give the same examples token for token."""

from __future__ import annotations

import contextlib

from sftlab.data import formats as F
from sftlab.data.loader import Row
from sftlab.data.templates import Template
from sftlab.data.tokenize import IGNORE_INDEX, Encoded, cut_to_length, encode_messages, last_answer_start
from sftlab.errors import DataError


@contextlib.contextmanager
def naming_row(row: Row):
    """A template's complaint about the conversation (it refused it, or dropped a turn's reasoning) names the row."""
    try:
        yield
    except DataError as e:
        if e.file is not None:
            raise
        raise DataError(str(e), file=row.file, line=row.line) from None


def fit_encoded(fmt: str, row: Row, enc: Encoded, tokenizer, template: Template, s,
                with_answer_mask: bool = False) -> tuple[Encoded | None, str | None]:
    """Apply cutoff_len and the truncation policy (``s``: `dataset.EncodeSettings`) to a row's full encoding; drop
    rows with nothing to train."""
    if fmt == "text":
        if len(enc.input_ids) > s.cutoff_len:
            if s.truncation == "error":
                raise DataError(f"{len(enc.input_ids)} tokens exceed cutoff_len={s.cutoff_len}", file=row.file, line=row.line)
            if s.truncation == "drop":
                return None, "too long"
            enc = Encoded(enc.input_ids[: s.cutoff_len], enc.labels[: s.cutoff_len], truncated=True)
        return enc, None
    if len(enc.input_ids) > s.cutoff_len:
        if s.truncation == "error":
            raise DataError(f"{len(enc.input_ids)} tokens exceed cutoff_len={s.cutoff_len} (truncation=error)",
                            file=row.file, line=row.line)
        if s.truncation == "drop":
            return None, "too long"
        tools = F.row_tools(row)
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
