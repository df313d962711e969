"""What one split holds, token by token: from the tokenized cache (`SplitStats.from_cache`, what the report uses) or
row by row (`row_tokens` + `SplitStats.add`, the per-row reference the cache path is tested against).

The reference encodes every row exactly as training encodes it (`dataset.encode_row`, the one place that decides
what is trained); rows longer than `cutoff_len` are also encoded whole, to tell what truncation cost. The cache path
reads the same numbers, in numpy, from the memory-mapped examples and the per-row facts tokenization stores beside
them (`facts.row_facts`): nothing is encoded twice. Per row, only a few lengths are kept (4 bytes each), for the
distributions and the cost estimate.

Words used in the report:
* prompt tokens: tokens that are not trained; answer tokens: trained tokens; both before truncation.
* markup: trained tokens that are not the text of an assistant message (end-of-turn markers, role headers that the
  template puts inside the trained span, the EOS after a `text` row). With train_on=all this also counts prompts.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sftlab.data import formats as F
from sftlab.data.dataset import EncodeSettings, encode_row
from sftlab.data.duplicates import row_content
from sftlab.data.loader import Row
from sftlab.data.templates import Template
from sftlab.data.tokenize import IGNORE_INDEX, Encoded, encode_messages, encode_text


@dataclass
class RowTokens:
    """One row's token counts before (`*_full`) and after truncation; `kept` is None when the row was dropped."""

    turns: int
    prompt_full: int
    answer_full: int
    kept: Encoded | None
    drop_reason: str | None = None
    content: str = ""  # the text of every message (or the `text` row), for duplicate detection

    @property
    def total_full(self) -> int:
        return self.prompt_full + self.answer_full


def _trained(enc: Encoded) -> int:
    return sum(l != IGNORE_INDEX for l in enc.labels)


def _text_answer_mask(tokenizer, enc: Encoded) -> list[bool]:
    """`text` rows: every token is the row's own text except the EOS that encoding appends (if not cut off)."""
    mask = [True] * len(enc.input_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and not enc.truncated and mask:
        mask[-1] = False
    return mask


def row_tokens(fmt: str, row: Row, tokenizer, template: Template, s: EncodeSettings) -> RowTokens:
    """Encode one row as training does, plus its whole length when truncation shortened or dropped it."""
    kept, why = encode_row(fmt, row, tokenizer, template, s, with_answer_mask=True)
    if fmt == "text":
        turns = 1
        if kept is not None:
            kept.answer_mask = _text_answer_mask(tokenizer, kept)
        content = row_content(fmt, row, s.options)
        full = kept if kept is not None and not kept.truncated else encode_text(tokenizer, content)
    else:
        messages = F.to_messages(fmt, row, s.options)
        turns = sum(m.role == "assistant" for m in messages)
        content = row_content(fmt, row, s.options)
        whole = kept is None or kept.truncated
        full = (encode_messages(tokenizer, template, messages, s.train_on, F.row_tools(row), s.train_on_reasoning)
                if whole else kept)
    answer = _trained(full)
    return RowTokens(turns, len(full.input_ids) - answer, answer, kept, why, content)


def distribution(values) -> dict[str, float]:
    """mean, median, p95 (nearest rank: the smallest value with at least 95% of values at or below it) and max."""
    xs = np.sort(np.asarray(values, dtype=np.int64))
    n = len(xs)
    if n == 0:
        return {"mean": 0.0, "median": 0.0, "p95": 0, "max": 0}
    median = int(xs[n // 2]) if n % 2 else (int(xs[n // 2 - 1]) + int(xs[n // 2])) / 2
    return {"mean": round(int(xs.sum()) / n, 2), "median": median, "p95": int(xs[math.ceil(0.95 * n) - 1]),
            "max": int(xs[-1])}


@dataclass
class SplitStats:
    split: str
    cutoff_len: int
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    turns: Counter = field(default_factory=Counter)
    over_cutoff: int = 0  # rows longer than cutoff_len before truncation
    answers_cut: int = 0  # kept rows that lost trained tokens to truncation
    answer_tokens_lost: int = 0  # trained tokens cut from kept rows
    prompt_tokens_lost: int = 0  # prompt tokens cut from kept rows
    dropped_tokens: int = 0  # tokens of dropped rows (whole length)
    tokens: int = 0  # kept examples, after truncation
    trained_tokens: int = 0
    markup_tokens: int = 0  # trained tokens that are not assistant text
    prompt_full: array = field(default_factory=lambda: array("I"))
    answer_full: array = field(default_factory=lambda: array("I"))
    total_full: array = field(default_factory=lambda: array("I"))
    kept_lengths: array = field(default_factory=lambda: array("I"))  # tokens of each kept example, in row order
    kept_trained: array = field(default_factory=lambda: array("I"))  # its trained tokens
    kept_rows: array = field(default_factory=lambda: array("I"))  # its row's index (0-based, reading order)

    def add(self, fmt: str, r: RowTokens) -> None:
        self.rows_read += 1
        self.formats[fmt] += 1
        self.turns[r.turns] += 1
        self.prompt_full.append(r.prompt_full)
        self.answer_full.append(r.answer_full)
        self.total_full.append(r.total_full)
        self.over_cutoff += r.total_full > self.cutoff_len
        enc = r.kept
        if enc is None:
            self.dropped[r.drop_reason] += 1
            self.dropped_tokens += r.total_full
            return
        self.kept += 1
        self.kept_rows.append(self.rows_read - 1)
        self.kept_lengths.append(len(enc.input_ids))
        trained = np.asarray(enc.labels) != IGNORE_INDEX
        n_trained = int(trained.sum())
        self.kept_trained.append(n_trained)
        self.tokens += len(enc.input_ids)
        self.trained_tokens += n_trained
        if enc.answer_mask is not None:
            self.markup_tokens += int((trained & ~np.asarray(enc.answer_mask, dtype=bool)).sum())
        if enc.truncated:
            self.truncated += 1
            lost = r.answer_full - n_trained
            self.answers_cut += lost > 0
            self.answer_tokens_lost += max(lost, 0)
            self.prompt_tokens_lost += max(r.prompt_full - (len(enc.input_ids) - n_trained), 0)

    @classmethod
    def from_cache(cls, split: str, cutoff_len: int, facts: dict, lengths: np.ndarray, trained: np.ndarray,
                   formats: dict[str, int], dropped: dict[str, int]) -> "SplitStats":
        """The same numbers as `add` over every row, from the cache: `facts` (`facts.FACT_COLUMNS`, one entry per
        row read), the kept examples' `lengths` and `trained` counts (in row order) and the summary's counts."""
        f = {k: np.asarray(v, dtype=np.int64) for k, v in facts.items()}
        kept = f["kept"].astype(bool)
        if int(kept.sum()) != len(lengths):
            raise ValueError(f"{split}: the cache's row facts ({int(kept.sum())} kept) do not match its "
                             f"{len(lengths)} examples")
        total = f["prompt_full"] + f["answer_full"]
        lengths, trained = np.asarray(lengths, np.int64), np.asarray(trained, np.int64)
        cut = f["truncated"][kept].astype(bool)
        lost = f["answer_full"][kept][cut] - trained[cut]
        prompt_lost = f["prompt_full"][kept][cut] - (lengths[cut] - trained[cut])
        s = cls(split, cutoff_len, rows_read=len(total), kept=int(kept.sum()), truncated=int(cut.sum()),
                dropped=Counter(dropped), formats=Counter(formats),
                turns=Counter({int(k): int(v) for k, v in zip(*np.unique(f["turns"], return_counts=True))}),
                over_cutoff=int((total > cutoff_len).sum()), answers_cut=int((lost > 0).sum()),
                answer_tokens_lost=int(np.maximum(lost, 0).sum()),
                prompt_tokens_lost=int(np.maximum(prompt_lost, 0).sum()),
                dropped_tokens=int(total[~kept].sum()), tokens=int(lengths.sum()), trained_tokens=int(trained.sum()),
                markup_tokens=int(f["markup"].sum()))
        s.prompt_full, s.answer_full, s.total_full = f["prompt_full"], f["answer_full"], total
        s.kept_lengths, s.kept_trained, s.kept_rows = lengths, trained, np.flatnonzero(kept)
        return s

    def histogram(self, bins: int = 20) -> dict:
        """Counts of whole-row lengths in equal bins from 0 to max(longest row, cutoff_len)."""
        total = np.asarray(self.total_full, dtype=np.int64)
        top = max(int(total.max()) if len(total) else 0, self.cutoff_len, 1)
        width = max(1, math.ceil(top / bins))
        counts = np.bincount(np.minimum(total // width, bins - 1), minlength=bins)
        return {"bin_width": width, "edges": [i * width for i in range(bins + 1)], "counts": counts.tolist()}

    def to_dict(self) -> dict:
        return {
            "split": self.split, "rows_read": self.rows_read, "kept": self.kept, "truncated": self.truncated,
            "dropped": dict(sorted(self.dropped.items())), "dropped_total": sum(self.dropped.values()),
            "formats": dict(sorted(self.formats.items())), "turns_per_row": {str(k): v for k, v in sorted(self.turns.items())},
            "prompt_tokens": distribution(self.prompt_full), "answer_tokens": distribution(self.answer_full),
            "total_tokens": distribution(self.total_full), "cutoff_len": self.cutoff_len,
            "rows_over_cutoff": self.over_cutoff, "answers_cut": self.answers_cut,
            "answer_tokens_lost": self.answer_tokens_lost, "prompt_tokens_lost": self.prompt_tokens_lost,
            "dropped_row_tokens": self.dropped_tokens,
            "tokens": self.tokens, "trained_tokens": self.trained_tokens,
            "trained_share": round(self.trained_tokens / self.tokens, 4) if self.tokens else 0.0,
            "markup_tokens": self.markup_tokens, "answer_text_tokens": self.trained_tokens - self.markup_tokens,
            "markup_share_of_trained": round(self.markup_tokens / self.trained_tokens, 4) if self.trained_tokens else 0.0,
            "histogram": self.histogram(),
        }
