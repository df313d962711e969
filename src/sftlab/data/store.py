"""Tokenized examples on disk as Arrow, memory-mapped: a million rows cost disk and page cache, not process memory.

A split is one Arrow IPC stream file (``examples.arrow``, columns ``input_ids`` and ``labels``, lists of int32; the
layout `datasets` uses for its cache, so ``datasets.Dataset.from_file`` opens it too) beside ``summary.json``. It is
written into a temporary directory that is renamed into place when complete, so a killed run never leaves a
half-written entry that a later run would read. Every process that opens it maps the same file: the ranks of a
distributed run on one machine share one copy in the page cache.

`TokenizedExamples` reads examples lazily (``ex[i]`` is a dict of two int lists, made when asked for); `lengths()`
comes from the Arrow offsets without touching the tokens. `Subset` and `PackedExamples` are views over it by
index, so splitting off a validation set and packing keep memory flat as well.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EXAMPLES_FILE = "examples.arrow"
ROWS_FILE = "rows.arrow"  # per row read (kept or dropped): `facts.FACT_COLUMNS`, for `sftlab data report`


def _schema():
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                      ("trained", pa.int32())])  # tokens with a label, per example


class ExampleWriter:
    """Writes examples into ``<entry>.tmp-*/`` and renames it to ``entry`` on `commit`; `abort` removes it."""

    def __init__(self, entry: Path):
        import pyarrow as pa

        self.entry = Path(entry)
        self.entry.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.entry.parent))
        self._sink = pa.OSFile(str(self.tmp / EXAMPLES_FILE), "wb")
        self._writer = pa.ipc.new_stream(self._sink, _schema())
        self._rows = None  # (sink, writer) of ROWS_FILE, opened with the first facts

    def write(self, input_ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
              facts: np.ndarray | None = None) -> None:
        """Examples given as flat int32 arrays and the length of each; `facts`: the chunk's per-row facts
        (int32, one row per row read, columns `facts.FACT_COLUMNS`)."""
        import pyarrow as pa

        if facts is not None and len(facts):
            self._write_facts(facts)
        if len(lengths) == 0:
            return
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        offsets = pa.array(starts.astype(np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(input_ids, type=pa.int32()))
        lab = pa.ListArray.from_arrays(offsets, pa.array(labels, type=pa.int32()))
        trained = np.add.reduceat((np.asarray(labels) != -100).astype(np.int32), starts[:-1])
        trained[np.asarray(lengths) == 0] = 0
        self._writer.write_batch(pa.record_batch([ids, lab, pa.array(trained, type=pa.int32())], schema=_schema()))

    def _write_facts(self, facts: np.ndarray) -> None:
        import pyarrow as pa

        from sftlab.data.facts import FACT_COLUMNS

        schema = pa.schema([(c, pa.int32()) for c in FACT_COLUMNS])
        if self._rows is None:
            sink = pa.OSFile(str(self.tmp / ROWS_FILE), "wb")
            self._rows = (sink, pa.ipc.new_stream(sink, schema))
        cols = np.ascontiguousarray(np.asarray(facts, dtype=np.int32).T)
        self._rows[1].write_batch(pa.record_batch([pa.array(c) for c in cols], schema=schema))

    def _close(self) -> None:
        self._writer.close()
        self._sink.close()
        if self._rows is not None:
            self._rows[1].close()
            self._rows[0].close()
            self._rows = None

    def commit(self, extra_files: dict[str, str]) -> Path:
        self._close()
        for name, text in extra_files.items():
            (self.tmp / name).write_text(text)
        if self.entry.exists():
            shutil.rmtree(self.entry, ignore_errors=True)
        os.replace(self.tmp, self.entry)
        return self.entry

    def abort(self) -> None:
        try:
            self._close()
        except Exception:  # already closed or broken: the directory goes either way
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)


class TokenizedExamples(Sequence):
    """The examples of an Arrow file, memory-mapped; ``ex[i]`` -> ``{"input_ids": [...], "labels": [...]}``."""

    def __init__(self, path: str | Path):
        import pyarrow as pa

        self.path = str(path)
        self._map = pa.memory_map(self.path, "r")
        self._table = pa.ipc.open_stream(self._map).read_all()  # zero-copy: the buffers point into the mapping
        self._ids, self._labels, self._offsets, self._trained = [], [], [], []
        starts = [0]
        for batch in self._table.to_batches():
            ids, labels = batch.column(0), batch.column(1)
            if batch.num_columns > 2:
                self._trained.append(batch.column(2).to_numpy(zero_copy_only=True))
            self._ids.append(ids.values.to_numpy(zero_copy_only=True))
            self._labels.append(labels.values.to_numpy(zero_copy_only=True))
            self._offsets.append(ids.offsets.to_numpy(zero_copy_only=True))
            starts.append(starts[-1] + len(batch))
        self._starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"example {i} out of range ({n} examples)")
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[b])
        s, e = int(self._offsets[b][j]), int(self._offsets[b][j + 1])
        return {"input_ids": self._ids[b][s:e].tolist(), "labels": self._labels[b][s:e].tolist()}

    def lengths(self) -> np.ndarray:
        """Tokens per example, from the offsets alone."""
        if not self._offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int64)

    def trained_counts(self) -> np.ndarray:
        """Tokens with a label per example, from the stored column (without reading the tokens)."""
        if len(self._trained) == len(self._offsets):
            return np.concatenate(self._trained).astype(np.int64) if self._trained else np.zeros(0, np.int64)
        return np.asarray([sum(l != -100 for l in e["labels"]) for e in self], dtype=np.int64)

    def row_facts(self) -> dict[str, np.ndarray] | None:
        """Per row read, in reading order: `facts.FACT_COLUMNS` as int32 arrays (memory-mapped), or None when the
        cache entry has none (written without them)."""
        import pyarrow as pa

        path = Path(self.path).parent / ROWS_FILE
        if not path.is_file():
            return None
        table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
        return {name: table.column(name).to_numpy() for name in table.column_names}

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"TokenizedExamples({len(self)} examples, {self.path})"


def example_lengths(examples: Sequence) -> np.ndarray:
    """Tokens per example of any sequence of examples (cheap for the Arrow-backed ones)."""
    if hasattr(examples, "lengths"):
        return examples.lengths()
    return np.asarray([len(e["input_ids"]) for e in examples], dtype=np.int64)


def example_trained_counts(examples: Sequence) -> np.ndarray:
    """Tokens with a label per example (or pack) of any sequence of examples (cheap for the Arrow-backed ones)."""
    if hasattr(examples, "trained_counts"):
        return examples.trained_counts()
    return np.asarray([sum(l != -100 for l in e["labels"]) for e in examples], dtype=np.int64)


class Subset(Sequence):
    """Some examples of another sequence, by index (a split-off training or validation set)."""

    def __init__(self, base: Sequence, indices: np.ndarray):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.base[int(self.indices[i])]

    def lengths(self) -> np.ndarray:
        return example_lengths(self.base)[self.indices]

    def trained_counts(self) -> np.ndarray:
        return example_trained_counts(self.base)[self.indices]


class PackedExamples(Sequence):
    """Packs made on access from the examples' indices (``bins``, from `packing.bfd_pack`): the same rows as
    `packing.pack_examples`, without a second copy of the tokens."""

    def __init__(self, base: Sequence, bins: list[list[int]]):
        self.base = base
        self._order = np.asarray([i for b in bins for i in b], dtype=np.int64)
        self._starts = np.cumsum([0] + [len(b) for b in bins]).astype(np.int64)
        lengths = example_lengths(base)
        self._lengths = np.asarray([int(lengths[b].sum()) if len(b) else 0 for b in
                                    (self._order[s:e] for s, e in zip(self._starts[:-1], self._starts[1:]))],
                                   dtype=np.int64)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        seq_lens: list[int] = []
        for i in self._order[self._starts[k]:self._starts[k + 1]]:
            ex = self.base[int(i)]
            input_ids += ex["input_ids"]
            labels += ex["labels"]
            position_ids += range(len(ex["input_ids"]))
            seq_lens.append(len(ex["input_ids"]))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lens": seq_lens}

    def lengths(self) -> np.ndarray:
        return self._lengths

    def trained_counts(self) -> np.ndarray:
        per_example = example_trained_counts(self.base)[self._order]
        return np.add.reduceat(per_example, self._starts[:-1]) if len(self._order) else np.zeros(0, np.int64)
