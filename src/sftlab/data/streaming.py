"""Streaming (``streaming: true``): rows read lazily from .jsonl/.json/.parquet/.csv, tokenized inside the
DataLoader workers, packed on the fly, sharded by (rank, worker), repeated pass after pass until ``max_steps``.

Flow, in each DataLoader worker: `read_file` (only the rows this shard owns are parsed) -> `batched.encode_batch`
(the same function the cached path uses, so the examples are those of `dataset.encode_row` token for token) ->
examples, or packs of a window of examples (`packing.bfd_pack`) -> the collator. Row ``i`` of a file belongs to
shard ``i % shards``, shard = rank * workers + worker, so every row is seen by exactly one (rank, worker) per pass.

Resume is exact without replaying the data: every item carries the position its shard restarts from (pass, file,
row, items to skip there); the trainer keeps the position of the last item consumed per shard and writes it beside
each checkpoint (`StreamTracker`); a resumed run starts each shard there. A bad row stops the run with its
`DataError` (file, line, field): the worker hands the error over as an item and the trainer raises it.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from sftlab.data import formats as F
from sftlab.data.batched import encode_batch
from sftlab.data.loader import Row, _jsonl_row, _surrogate_field, jsonl_lines, read_rows
from sftlab.data.packing import bfd_pack
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import DataError

POSITION_KEY = "sftlab_stream_position"
ERROR_KEY = "sftlab_stream_error"
COUNTS_KEY = "sftlab_stream_counts"
STATE_FILE = "stream_state_{rank}.json"
ENCODE_ROWS = 64  # rows per batched encode call inside a worker
PACK_WINDOW = 1000  # examples packed together (best-fit decreasing) when packing on the fly
_PARQUET_BATCH = 1024


# ---- lazy readers -------------------------------------------------------------------------------------------
def read_file(path: str, start: int = 0, owns: Callable[[int], bool] = lambda i: True,
              max_samples: int | None = None) -> Iterator[tuple[int, Row]]:
    """(index, row) for the rows of one file from index ``start`` on that ``owns`` accepts, read lazily: rows of
    other shards are skipped without being parsed where the format allows (JSONL lines, Parquet batches).
    Line numbers and errors as `loader.read_rows`; a CSV cell is read as its text (an empty cell is missing)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found (streaming reads local files only)", file=path)
    suffix = p.suffix.lower()
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}
    if suffix not in readers:
        raise DataError(f"unsupported file type '{suffix}'; use .json, .jsonl, .csv or .parquet", file=path)
    for i, row in readers[suffix](p, start, owns):
        if max_samples and i >= max_samples:
            return
        yield i, row


def _first_char(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4096).decode("utf-8-sig", "ignore").lstrip()
    return head[:1]


def _jsonl_rows(path: Path, start: int, owns) -> Iterator[tuple[int, Row]]:
    first = _first_char(path)
    if not first:
        raise DataError("the file is empty", file=str(path))
    if first == "[":
        yield from _array_rows(path, start, owns)
        return
    for i, (number, line) in enumerate(jsonl_lines(path)):
        if i >= start and owns(i):
            yield i, _jsonl_row(line, number, str(path))


def _json_rows(path: Path, start: int, owns) -> Iterator[tuple[int, Row]]:
    first = _first_char(path)
    if first == "[":
        yield from _array_rows(path, start, owns)
    elif first == "{" and not _first_line_is_object(path):
        # One (pretty-printed) object: a single row, read whole as loader.read_rows does.
        for i, row in enumerate(read_rows(str(path))):
            if i >= start and owns(i):
                yield i, row
    else:
        yield from _jsonl_rows(path, start, owns)


def _first_line_is_object(path: Path) -> bool:
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except json.JSONDecodeError:
                    return False
    return False


def _array_rows(path: Path, start: int, owns) -> Iterator[tuple[int, Row]]:
    """A top-level JSON array, one element at a time (ijson): the file is never held in memory."""
    import ijson

    i = -1
    with open(path, "rb") as fh:
        items = ijson.items(fh, "item", use_float=True)
        while True:
            try:
                obj = next(items)
            except StopIteration:
                return
            except (ijson.JSONError, UnicodeDecodeError) as e:
                raise DataError(f"malformed JSON after row {i + 1}: {e}", file=str(path)) from None
            i += 1
            if i < start or not owns(i):
                continue
            if not isinstance(obj, dict):
                raise DataError(f"row {i + 1} is a {type(obj).__name__}, expected an object", file=str(path))
            where = _surrogate_field(obj)
            if where is not None:
                raise DataError("contains a lone UTF-16 surrogate (a broken \\u escape such as \\ud800), which is "
                                "not valid text", file=str(path), line=i + 1, field=where)
            yield i, Row(obj, str(path), i + 1)


def _parquet_rows(path: Path, start: int, owns) -> Iterator[tuple[int, Row]]:
    """Row groups before ``start`` are skipped from the footer; the rest is read in batches of rows."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"cannot read PARQUET file: {e}", file=str(path)) from None
    first, offset = 0, 0
    meta = pf.metadata
    while first < meta.num_row_groups and offset + meta.row_group(first).num_rows <= start:
        offset += meta.row_group(first).num_rows
        first += 1
    groups = list(range(first, meta.num_row_groups))
    if not groups:
        return
    i = offset
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups):
        wanted = [k for k in range(batch.num_rows) if i + k >= start and owns(i + k)]
        if wanted:
            for k, data in zip(wanted, batch.take(wanted).to_pylist()):
                yield i + k, Row(data, str(path), i + k + 1)
        i += batch.num_rows


def _csv_rows(path: Path, start: int, owns) -> Iterator[tuple[int, Row]]:
    """Rows of a CSV file (header first, blank lines skipped), each cell as its text; the line named is the one
    the record starts on."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError("the file is empty", file=str(path))
            i, prev = -1, reader.line_num
            for cells in reader:
                here, prev = prev + 1, reader.line_num
                if not cells:
                    continue
                i += 1
                if i < start or not owns(i):
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{len(cells)} cells but the header names {len(header)} columns",
                                    file=str(path), line=here)
                yield i, Row({k: (v if v != "" else None) for k, v in zip(header, cells)}, str(path), here)
        except UnicodeDecodeError as e:
            raise DataError(f"not valid UTF-8 ({e.reason}); re-encode the file as UTF-8", file=str(path),
                            line=reader.line_num + 1) from None
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e}", file=str(path), line=reader.line_num) from None


# ---- positions ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Position:
    """Where a shard restarts: in pass ``epoch``, at row index ``row`` of file number ``file``, skipping the first
    ``skip`` items made from there (packs of a window that were already consumed)."""

    epoch: int = 0
    file: int = 0
    row: int = 0
    skip: int = 0


@dataclass
class StreamStats:
    """What one shard did with its rows since its iteration began (a worker's counts travel with each of its items
    under COUNTS_KEY, and `StreamTracker.summary` adds them up)."""

    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    trained_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)


# ---- the dataset --------------------------------------------------------------------------------------------
class StreamingExamples(torch.utils.data.IterableDataset):
    """The training examples (or packs) of files too large to tokenize ahead, produced in the DataLoader workers.

    Endless: pass after pass over the files, in file order, until the trainer stops at max_steps. No len()."""

    def __init__(self, files: list[str], tokenizer, template, settings, *, rank: int = 0, world_size: int = 1,
                 packing: bool = False, max_samples: int | None = None, pack_window: int = PACK_WINDOW,
                 encode_rows: int = ENCODE_ROWS):
        self.files, self.tokenizer, self.template, self.settings = list(files), tokenizer, template, settings
        self.rank, self.world_size = rank, world_size
        self.packing, self.max_samples = packing, max_samples
        self.pack_window, self.encode_rows = pack_window, encode_rows
        self.start: dict[int, Position] = {}  # shard -> where it restarts (a resumed run)
        self.num_shards_at_start: int | None = None
        # Batches this rank consumed before a resume: the DataLoader takes batches from its workers in turn, worker 0
        # first, so worker w serves shard (w + batches_before) % workers and the turns go on as before the stop.
        self.batches_before = 0
        self.stats = StreamStats()

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if info is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
        shard = self.rank * workers + (worker + self.batches_before) % workers
        shards = self.world_size * workers
        try:
            self._check_shards(shards)
            for item, pos in self.shard_items(shard, shards, self.start.get(shard, Position())):
                st = self.stats
                yield {**item, POSITION_KEY: (shard, shards, *astuple(pos)),
                       COUNTS_KEY: (st.rows_read, st.kept, st.truncated, st.prompt_tokens, st.trained_tokens,
                                   dict(st.dropped), dict(st.formats))}
        except DataError as e:
            if info is None:
                raise
            yield {ERROR_KEY: e}  # crosses to the main process as an item: the trainer raises it there

    def _check_shards(self, shards: int) -> None:
        if self.num_shards_at_start is not None and self.num_shards_at_start != shards:
            raise DataError(f"the checkpoint's stream was split over {self.num_shards_at_start} shards (ranks x "
                            f"dataloader_num_workers), this run over {shards}: resume with the same number of ranks "
                            "and dataloader_num_workers")

    def shard_items(self, shard: int, shards: int, start: Position = Position()) -> Iterator[tuple[dict, Position]]:
        """(example or pack, position after it) of one shard, pass after pass, from ``start``."""
        pos = start
        while True:
            made = 0
            for item, after in self.one_pass(shard, shards, pos):
                made += 1
                yield item, after
            if made == 0 and pos == Position(pos.epoch):
                raise DataError(f"streaming: shard {shard} of {shards} (ranks x dataloader workers) got no example in "
                                f"a whole pass over {', '.join(self.files)}: fewer usable rows than shards; use fewer "
                                "dataloader_num_workers or more data")
            pos = Position(pos.epoch + 1)

    def one_pass(self, shard: int, shards: int, pos: Position) -> Iterator[tuple[dict, Position]]:
        examples = self._examples(shard, shards, pos)
        if not self.packing:
            yield from examples
            return
        window: list[tuple[dict, Position]] = []
        restart = pos
        for ex, after in examples:
            window.append((ex, after))
            if len(window) == self.pack_window:
                yield from self._packs(window, restart, skip=pos.skip if restart == pos else 0)
                restart, window = after, []
        if window:
            yield from self._packs(window, restart, skip=pos.skip if restart == pos else 0)

    def _packs(self, window: list[tuple[dict, Position]], restart: Position, skip: int):
        """The window's examples packed best-fit decreasing; each pack with where to restart after it."""
        bins = bfd_pack([len(ex["input_ids"]) for ex, _ in window], self.settings.cutoff_len)
        end = window[-1][1]
        for j, b in enumerate(bins):
            if j < skip:
                continue
            after = end if j == len(bins) - 1 else Position(restart.epoch, restart.file, restart.row, j + 1)
            yield pack_of([window[i][0] for i in b]), after

    def _examples(self, shard: int, shards: int, pos: Position) -> Iterator[tuple[dict, Position]]:
        """(example, position after its row) of the shard's rows in one pass, from ``pos`` (file, row)."""
        s = self.settings
        owns = lambda i: i % shards == shard  # noqa: E731
        for f in range(pos.file, len(self.files)):
            path = self.files[f]
            fmt, mapping = self._file_format(path)
            chunk: list[tuple[int, tuple[str, Row]]] = []
            start = pos.row if f == pos.file else 0
            for i, row in read_file(path, start, owns, self.max_samples):
                row = F.apply_column_mapping(row, mapping)
                chunk.append((i, (fmt or F.detect_format(set(row.data), path), row)))
                if len(chunk) == self.encode_rows:
                    yield from self._encoded(chunk, f, pos.epoch)
                    chunk = []
            yield from self._encoded(chunk, f, pos.epoch)

    def _encoded(self, chunk: list[tuple[int, tuple[str, Row]]], f: int, epoch: int):
        if not chunk:
            return
        st = self.stats
        for (i, (fmt, _)), (enc, why) in zip(chunk, encode_batch([p for _, p in chunk], self.tokenizer,
                                                                  self.template, self.settings)):
            st.rows_read += 1
            st.formats[fmt] += 1
            if enc is None:
                st.dropped[why] += 1
                continue
            st.kept += 1
            st.truncated += bool(enc.truncated)
            trained = sum(label != IGNORE_INDEX for label in enc.labels)
            st.trained_tokens += trained
            st.prompt_tokens += len(enc.labels) - trained
            yield {"input_ids": enc.input_ids, "labels": enc.labels}, Position(epoch, f, i + 1)

    def _file_format(self, path: str) -> tuple[str | None, dict[str, str]]:
        """The file's format (given, or detected from its first row, as the cached path does) and column mapping."""
        s = self.settings
        fmt, mapping = s.dataset_format, s.column_mapping
        own = s.options.files.get(path) if s.options else None
        if own is not None:
            fmt = own.dataset_format or fmt
            mapping = {**mapping, **own.column_mapping}
        if fmt is not None:
            if fmt not in F.FORMATS:
                raise DataError(f"unknown dataset_format '{fmt}'; choose one of {F.FORMATS}")
            return fmt, mapping
        for _, row in read_file(path):
            return F.detect_format(set(F.apply_column_mapping(row, mapping).data), path), mapping
        raise DataError("no rows: the dataset is empty", file=path)

    def check_files(self) -> None:
        """Each file exists, and its format is known (given, or detected from its first row)."""
        for path in self.files:
            self._file_format(path)

    def describe(self) -> str:
        return (f"[train] streaming {len(self.files)} file(s) ({', '.join(self.files)}): tokenized in the dataloader "
                f"workers, {'packed on the fly, ' if self.packing else ''}sharded over ranks x workers, repeated "
                "until max_steps; row counts are not known ahead")


def pack_of(examples: list[dict]) -> dict:
    """One pack of examples, as `packing.pack_examples` and `store.PackedExamples` build it."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ex in examples:
        input_ids += ex["input_ids"]
        labels += ex["labels"]
        position_ids += range(len(ex["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "seq_lens": [len(ex["input_ids"]) for ex in examples]}


# ---- the trainer's side: errors raised, positions kept, saved and restored ------------------------------------
class StreamTracker:
    """In the training process: raises a worker's data error, keeps the position of the last item consumed per
    shard and the batches consumed, writes them beside each checkpoint (one file per rank) and restores them on
    resume; sums the shards' row counts for the run's data summary."""

    def __init__(self, dataset: StreamingExamples):
        self.dataset = dataset
        self.positions: dict[int, list[int]] = {}
        self.counts: dict[int, tuple] = {}
        self.batches = 0

    def observe(self, batch: dict) -> dict:
        """Called on every training batch in the main process, before anything reads it."""
        error = batch.pop(ERROR_KEY, None)
        if error is not None:
            raise error
        pos = batch.pop(POSITION_KEY, None)
        counts = batch.pop(COUNTS_KEY, None)
        if pos is not None:
            shard, shards, *rest = (int(x) for x in pos)
            self.positions[shard] = [shards, *rest]
            self.batches += 1
        if counts is not None:
            self.counts[int(pos[0])] = counts
        return batch

    def save(self, directory: str, rank: int) -> None:
        state = {str(k): [self.dataset.num_shards_at_start or 0, *astuple(p)] for k, p in self.dataset.start.items()}
        state.update({str(k): v for k, v in self.positions.items()})
        with open(os.path.join(directory, STATE_FILE.format(rank=rank)), "w", encoding="utf-8") as fh:
            json.dump({"batches": self.dataset.batches_before + self.batches, "shards": state}, fh)

    def restore(self, checkpoint: str, rank: int) -> bool:
        """Start every shard of this rank where the checkpoint's run left it; False when the checkpoint has no
        stream state (it was not a streaming run)."""
        path = os.path.join(checkpoint, STATE_FILE.format(rank=rank))
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        start = {}
        for k, (n, epoch, f, row, skip) in state["shards"].items():
            start[int(k)] = Position(epoch, f, row, skip)
            if n:
                self.dataset.num_shards_at_start = n
        self.dataset.start = start
        self.dataset.batches_before = int(state["batches"])
        return True

    def summary(self):
        """The rows the workers of this rank read, kept, cut and dropped in this run, as a `DataSummary`."""
        from sftlab.data.dataset import DataSummary

        out = DataSummary(split="train, streamed")
        dropped: Counter = Counter()
        formats: Counter = Counter()
        for rows, kept, truncated, prompt, trained, why, fmts in self.counts.values():
            out.rows_read += rows
            out.kept += kept
            out.truncated += truncated
            out.prompt_tokens += prompt
            out.trained_tokens += trained
            dropped.update(why)
            formats.update(fmts)
        out.dropped, out.formats = dict(dropped), dict(formats)
        return out


def collate_stream_item(features: list[dict]) -> tuple[list[dict], dict]:
    """The collator's side: the examples without the stream's keys, and those keys for the batch (the error of a
    bad row, or the position after the batch's last item)."""
    extra: dict = {}
    clean = []
    for f in features:
        if ERROR_KEY in f:
            return [], {ERROR_KEY: f[ERROR_KEY]}
        if POSITION_KEY in f:
            f = dict(f)
            extra[POSITION_KEY] = torch.tensor(f.pop(POSITION_KEY), dtype=torch.int64)
            extra[COUNTS_KEY] = f.pop(COUNTS_KEY, None)
        clean.append(f)
    return clean, extra
