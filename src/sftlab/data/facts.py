"""Per-row facts kept beside the tokenized examples, for `sftlab data report`: what each row held before
truncation and how much of what is trained is template markup.

Tokenization (`batched.encode_batch`) already has every row's whole encoding before it is fitted to
``cutoff_len``; keeping six integers per row (24 bytes, in ``rows.arrow`` of the cache entry) lets the report read
its numbers from the same memory-mapped cache that training uses instead of encoding the rows again. The meaning of
each number is the per-row reference's (`stats.row_tokens` and `stats.SplitStats.add`), tested equal.
"""

from __future__ import annotations

from sftlab.data.tokenize import IGNORE_INDEX, Encoded

# One int32 column each, one row per row read (kept or dropped), in reading order.
FACT_COLUMNS = ("prompt_full", "answer_full", "turns", "markup", "kept", "truncated")


def _trained(enc: Encoded) -> int:
    return sum(l != IGNORE_INDEX for l in enc.labels)


def markup_tokens(fmt: str, enc: Encoded, eos_token_id: int | None) -> int:
    """Trained tokens of a kept example that are not assistant text: for `text` rows the EOS encoding appends (when
    not cut off), otherwise the trained tokens outside `enc.answer_mask`."""
    if fmt == "text":
        return int(eos_token_id is not None and not enc.truncated and len(enc.input_ids) > 0)
    if enc.answer_mask is None:
        return 0
    return sum(l != IGNORE_INDEX and not a for l, a in zip(enc.labels, enc.answer_mask))


def row_facts(fmt: str, full: Encoded, fitted: Encoded | None, turns: int, eos_token_id: int | None) -> tuple:
    """(prompt_full, answer_full, turns, markup, kept, truncated) of one row: `full` is its whole encoding, `fitted`
    what truncation made of it (None: dropped)."""
    answer = _trained(full)
    if fitted is None:
        return len(full.input_ids) - answer, answer, turns, 0, 0, 0
    return (len(full.input_ids) - answer, answer, turns, markup_tokens(fmt, fitted, eos_token_id), 1,
            int(bool(fitted.truncated)))
