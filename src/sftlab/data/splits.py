"""Files -> the training and evaluation splits the Trainer consumes: the one way data enters a run.

`build_splits` tokenizes (or maps from the cache) each split's files, splits ``val_size`` off the training
examples and packs when ``packing`` is on. Every step keeps the examples on disk: the tokenized examples are a
memory-mapped Arrow file (sftlab.data.store), the validation split and the packs are index views over it, so the
memory of a run does not grow with the data. The main process tokenizes first; the other ranks of a distributed
run then find the cache entry and map the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from sftlab.data.dataset import DataSummary, EncodeSettings, RowRewrite, split_indices, tokenize_files
from sftlab.data.formats import FileFormat, FormatOptions
from sftlab.data.store import PackedExamples, Subset, example_lengths
from sftlab.data.templates import Template
from sftlab.logs import log


@dataclass
class Splits:
    """What the Trainer trains and evaluates on (sequences of examples, or of packs), and each split's summary."""

    train: Sequence | None = None
    eval: Sequence | None = None
    summaries: list[DataSummary] = field(default_factory=list)


def encode_settings(cfg) -> EncodeSettings:
    d = cfg.data
    return EncodeSettings(
        train_on=d.train_on, cutoff_len=d.cutoff_len, truncation=d.truncation, dataset_format=d.dataset_format,
        column_mapping=d.column_mapping,
        options=FormatOptions(role_map=d.sharegpt_role_map, sharegpt_keys=d.sharegpt_keys, system=None,
                              files={k: FileFormat(**v) for k, v in d.file_formats.items()}),
        train_on_reasoning=d.train_on_reasoning,
    )


def build_splits(cfg, tokenizer, template: Template, rewrite: RowRewrite | None = None) -> Splits:
    """The run's splits: tokenized (main process first), val_size split off, packed when asked. ``cfg`` is the run's
    `sftlab.config.Config` (not imported: the config sits above the data layer).

    ``rewrite``: a step that rewrites the rows in memory before they are encoded (the retrieval step of
    ``rqa_context: retrieved``, given by the workflow, which owns the retriever); nothing is written but the cache."""
    d, t = cfg.data, cfg.training
    s = encode_settings(cfg)
    out = Splits()

    def tokenized(files: list[str], split: str):
        ex, summary = tokenize_files(files, split, tokenizer, template, s, max_samples=d.max_samples,
                                     num_workers=d.preprocessing_num_workers, cache_dir=d.data_cache_dir,
                                     overwrite_cache=d.overwrite_cache, rewrite=rewrite)
        out.summaries.append(summary)
        log.info(summary.line())
        return ex

    with once_per_machine(t, desc="tokenize"):
        if t.do_train and d.train_file and d.streaming:
            out.train = streamed(cfg, tokenizer, template, s)
        elif t.do_train and d.train_file:
            out.train = tokenized(d.train_file, "train")
            if d.val_size:
                out.train, out.eval = split_examples(out.train, d.val_size, t.seed)
                log.info(f"[eval] split off {len(out.eval)} of the training examples (val_size={d.val_size})")
        if d.eval_file and (t.do_eval or t.do_train):
            out.eval = tokenized(d.eval_file, "eval")
    if d.packing:
        if not d.streaming:  # a stream packs on the fly
            out.train = pack(out.train, d.cutoff_len)
        out.eval = pack(out.eval, d.cutoff_len)
    return out


def streamed(cfg, tokenizer, template: Template, s: EncodeSettings):
    """The training split of ``streaming: true``: read and tokenized in the dataloader workers, sharded by rank
    and worker (sftlab.data.streaming). Each file's format is found here, so a missing file or an unknown format
    fails before the model loads."""
    from sftlab.data.streaming import StreamingExamples

    d, t = cfg.data, cfg.training
    stream = StreamingExamples(d.train_file, tokenizer, template, s, rank=t.process_index, world_size=t.world_size,
                               packing=d.packing, max_samples=d.max_samples)
    stream.check_files()
    log.info(stream.describe())
    return stream


def split_examples(examples: Sequence, val_size: float, seed: int) -> tuple[Subset, Subset]:
    """`dataset.split_off` as two index views (the same examples in the same order)."""
    train_idx, eval_idx = split_indices(len(examples), val_size, seed)
    return Subset(examples, train_idx), Subset(examples, eval_idx)


def pack(examples: Sequence | None, capacity: int) -> PackedExamples | None:
    """Best-fit-decreasing packs of the examples (the packs of `packing.pack_examples`), built on access."""
    if examples is None:
        return None
    from sftlab.data.packing import bfd_pack

    packs = PackedExamples(examples, bfd_pack(example_lengths(examples).tolist(), capacity))
    log.info(f"packed {len(examples)} examples into {len(packs)} rows of up to {capacity} tokens")
    return packs


class ListDataset:
    """A list (or any sequence) as a torch map-style dataset (Trainer needs __len__/__getitem__ only)."""

    def __init__(self, items: Sequence):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@contextmanager
def once_per_machine(args, desc: str):
    """Run the block on global rank 0 first, then on each other machine's first local rank, then everywhere else.

    For work that fills a cache (tokenization): with a cache on a filesystem every node sees, rank 0 fills it and
    every other rank reads it; with node-local caches each machine does the work once, not once per rank (the other
    ranks then map the same file). Two nested ``main_process_first`` blocks; every rank passes the same barriers."""
    with args.main_process_first(local=False, desc=desc), args.main_process_first(local=True, desc=desc):
        yield
