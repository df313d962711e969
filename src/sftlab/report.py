"""`sftlab data report`: what a training run will learn from and what it will cost, before it runs.

`data_report(cfg)` reads the same configuration as `sftlab train`. Each split is tokenized exactly as training
tokenizes it, into the same memory-mapped cache (`data.dataset.tokenize_files`: a report followed by train, or train
followed by a report, tokenizes once), and its token statistics are computed in numpy from that cache and the per-row
facts stored beside it (`data.stats.SplitStats.from_cache`). The rows' text is then streamed once more, in chunks
hashed by `preprocessing_num_workers` processes, and checked against earlier training rows for exact and near
duplicates (`data.duplicates`). Then the cost of training on the kept examples is
estimated (`train.estimate`) and, unless skipped, measured by a probe of a few real steps (`sftlab.probe`).
The result is a `Report`: `to_dict()` is JSON (every number), `write_report` writes data_report.md, .json and the
figures, `summary_lines` is the short printed version. The estimate is also recorded in the run's output_dir
(`sftlab_estimate.json`) so the model card of the real run can say how close it was.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sftlab.config import Config, save_config
from sftlab.data.dataset import stream_rows, tokenize_files
from sftlab.data.duplicates import DuplicateCounts, DuplicateIndex, Place, fingerprint_rows, write_deduplicated
from sftlab.data.stats import SplitStats, row_tokens
from sftlab.errors import ConfigError, DataError
from sftlab.logs import log
from sftlab.outputs import ESTIMATE_FILE, write_json
from sftlab.train.estimate import CostEstimate, add_probe, estimate_cost, process_rss

PROBE_STEPS = 3  # the first on the longest examples (peak memory, warm-up), the others on typical ones (time)
TYPICAL_DRAWS = 64  # random batches drawn per typical probe step; the one nearest the mean tokens per step is run
PROGRESS_EVERY = 20000
FINGERPRINT_ROWS = 512  # rows per chunk a duplicate-scan worker hashes
FINGERPRINT_IN_FLIGHT = 2  # chunks per worker queued at most
SPLITS = (("train", "train_file"), ("eval", "eval_file"), ("test", "test_file"))


@dataclass
class Report:
    settings: dict[str, Any]
    splits: dict[str, SplitStats] = field(default_factory=dict)
    duplicates: dict[str, DuplicateCounts] = field(default_factory=dict)  # train: within; eval/test: with train
    dedup: dict[str, Any] | None = None
    cost: CostEstimate | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "splits": {k: v.to_dict() for k, v in self.splits.items()},
            "duplicates": {k: v.to_dict() for k, v in self.duplicates.items()},
            "dedup": self.dedup,
            "cost": self.cost.to_dict() if self.cost else None,
            "timings": self.timings,
            "notes": self.notes,
        }

    def summary_lines(self) -> list[str]:
        out = []
        for name, s in self.splits.items():
            d = s.to_dict()
            why = f" ({', '.join(f'{k}: {v}' for k, v in d['dropped'].items())})" if d["dropped"] else ""
            out.append(f"[{name}] {d['rows_read']} rows: kept {d['kept']}, truncated {d['truncated']}, dropped "
                       f"{d['dropped_total']}{why}; tokens p95 {d['total_tokens']['p95']} / "
                       f"cutoff {d['cutoff_len']}; answers cut {d['answers_cut']} ({d['answer_tokens_lost']} "
                       f"tokens); trained {d['trained_tokens']} ({d['trained_share']:.1%}), of which markup "
                       f"{d['markup_share_of_trained']:.1%}")
        for name, c in self.duplicates.items():
            what = "duplicates within train" if name == "train" else f"{name} rows also in train"
            out.append(f"[{name}] {what}: {c.exact} exact, {c.near} near")
        if self.dedup:
            out.append(f"dedup: removed {self.dedup['removed']} rows -> {', '.join(self.dedup['files'])}")
        if self.cost:
            p = self.cost.plan
            line = (f"cost: {p.optimizer_steps} optimizer steps, {p.tokens_per_epoch} tokens/epoch, padding "
                    f"{p.padding_share:.1%}")
            peak = self.cost.peak_memory_bytes()
            if peak:
                line += f", peak memory ~{peak / 2**30:.2f} GiB"
            if self.cost.train_seconds is not None:
                line += f", train time ~{_duration(self.cost.train_seconds)}"
            out.append(line)
        return out


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


# ---- the data pass ----------------------------------------------------------------------------------------------
@dataclass
class ProbeRows:
    """The longest training rows (one optimizer step's worth) and a seeded random sample of the others, as
    (kept length, row data after column mapping), for the probe's data file; all of one format."""

    per_step: int
    fmt: str | None = None
    longest: list[tuple[int, dict]] = field(default_factory=list)
    sample: list[tuple[int, dict]] = field(default_factory=list)

    def rows(self) -> list[tuple[int, dict]]:
        return self.longest + self.sample


def probe_choice(row_lengths: np.ndarray, per_step: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices for the probe from each row's kept length (-1: dropped): the per_step longest (longest first,
    the earlier row first among equals: the warm-up step, and the peak memory), then for each later step a typical
    batch: of TYPICAL_DRAWS seeded random draws of per_step kept rows, the one whose tokens are closest to the
    run's mean tokens per step (so the measured seconds per token are those of the run's usual shapes)."""
    kept = np.flatnonzero(row_lengths >= 0)
    longest = kept[np.lexsort((kept, -row_lengths[kept]))][:per_step].tolist()
    if len(kept) == 0:
        return longest, []
    k = min(per_step, len(kept))
    target = float(row_lengths[kept].mean()) * k
    rng = np.random.default_rng(seed)
    sample: list[int] = []
    for _ in range(PROBE_STEPS - 1):
        draws = [rng.choice(kept, size=k, replace=False) for _ in range(TYPICAL_DRAWS)]
        best = min(draws, key=lambda b: abs(float(row_lengths[b].sum()) - target))
        sample += best.tolist()
    return longest, sample


def _tokenized_stats(name: str, files: list[str], cfg: Config, tokenizer, template, settings) -> SplitStats:
    """The split's numbers from the tokenized cache (tokenizing it, as training would, when it is not there yet);
    the per-row reference when the cache cannot say (no example kept, or an entry without per-row facts)."""
    d = cfg.data
    try:
        ex, summary = tokenize_files(files, name, tokenizer, template, settings, max_samples=d.max_samples,
                                     num_workers=d.preprocessing_num_workers, cache_dir=d.data_cache_dir,
                                     overwrite_cache=d.overwrite_cache)
        facts = ex.row_facts()
    except DataError as e:
        if "no example left" not in str(e):
            raise
        facts = None
    if facts is None:
        return _reference_stats(name, files, cfg, tokenizer, template, settings)
    return SplitStats.from_cache(name, d.cutoff_len, facts, ex.lengths(), ex.trained_counts(), summary.formats,
                                 summary.dropped)


def _reference_stats(name: str, files: list[str], cfg: Config, tokenizer, template, settings) -> SplitStats:
    stats = SplitStats(name, cfg.data.cutoff_len)
    for fmt, row in stream_rows(files, settings.dataset_format, settings.column_mapping, cfg.data.max_samples,
                                settings.options):
        stats.add(fmt, row_tokens(fmt, row, tokenizer, template, settings))
    return stats


def _fingerprinted(pairs, options, pool) -> Iterator[tuple[list, tuple[list[bytes], np.ndarray]]]:
    """(chunk of pairs, its fingerprints) in order; over the pool's workers with at most two chunks each in flight,
    so rows are read only as fast as they are hashed."""
    chunks = _chunks(pairs, FINGERPRINT_ROWS)
    if pool is None:
        for chunk in chunks:
            yield chunk, fingerprint_rows(chunk, options)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(fingerprint_rows, (chunk, options))))
        while len(pending) >= FINGERPRINT_IN_FLIGHT * pool.workers:
            c, job = pending.popleft()
            yield c, job.get()
    while pending:
        c, job = pending.popleft()
        yield c, job.get()


def _chunks(items, size: int):
    chunk: list = []
    for x in items:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _scan_duplicates(name: str, files: list[str], cfg: Config, settings, index: DuplicateIndex,
                     removal: dict[str, dict[int, str]], pool, wanted: set[int],
                     log: Callable[[str], None]) -> tuple[DuplicateCounts, dict[int, tuple[str, dict]], int]:
    """Exact and near duplicates of the split's rows (within train; eval/test against train), streaming; also the
    rows numbered in `wanted` (format, data). Returns (counts, wanted rows, rows read)."""
    dups = DuplicateCounts()
    picked: dict[int, tuple[str, dict]] = {}
    n = 0
    started = time.perf_counter()
    pairs = stream_rows(files, settings.dataset_format, settings.column_mapping, cfg.data.max_samples,
                        settings.options)
    for chunk, (digests, sigs) in _fingerprinted(pairs, settings.options, pool):
        for (fmt, row), digest, sig in zip(chunk, digests, sigs):
            if n in wanted:
                picked[n] = (fmt, row.data)
            n += 1
            place = Place(name, row.file, row.line)
            if name == "train":
                match = index.add_train_fingerprint(digest, sig, place)
                if match:
                    removal.setdefault(row.file, {})[row.line] = f"{match.kind} duplicate of {match.original}"
            else:
                match = index.check_fingerprint(digest, sig, place)
                if match:
                    o = match.original
                    removal.setdefault(o.file, {}).setdefault(o.line, f"{match.kind} match of {name} row {place}")
            if match:
                dups.add(match)
        if n // PROGRESS_EVERY != (n - len(chunk)) // PROGRESS_EVERY:
            log(f"[{name}] duplicates: {n} rows ({time.perf_counter() - started:.0f} s)")
    return dups, picked, n


def _probe_rows(stats: SplitStats, picked: dict[int, tuple[str, dict]], longest: list[int], sample: list[int],
                per_step: int) -> ProbeRows:
    rows = ProbeRows(per_step)
    row_len = _row_lengths(stats)
    for target, indices in ((rows.longest, longest), (rows.sample, sample)):
        for i in indices:
            fmt, data = picked[i]
            rows.fmt = rows.fmt or fmt
            if fmt == rows.fmt:  # the probe's file has one format
                target.append((int(row_len[i]), data))
    return rows


def _row_lengths(stats: SplitStats) -> np.ndarray:
    """Each row's kept length, -1 for dropped rows (from the per-row facts' kept flags, or the reference's)."""
    out = np.full(stats.rows_read, -1, dtype=np.int64)
    out[np.asarray(stats.kept_rows, dtype=np.int64)] = np.asarray(stats.kept_lengths, dtype=np.int64)
    return out


def _scan_splits(cfg: Config, tokenizer, template, settings, index: DuplicateIndex, removal: dict[str, dict[int, str]],
                 report: Report, probe: bool, log: Callable[[str], None]) -> ProbeRows | None:
    """Each split's statistics (from the tokenized cache) and duplicates into `report`; the probe's rows."""
    d, t = cfg.data, cfg.training
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    pool = _fingerprint_pool(d.preprocessing_num_workers or 0)
    probe_rows = None
    try:
        for name, attr in SPLITS:
            files = getattr(d, attr) or []
            if not files:
                continue
            t0 = time.perf_counter()
            stats = _tokenized_stats(name, files, cfg, tokenizer, template, settings)
            report.timings[f"{name}_tokens_seconds"] = round(time.perf_counter() - t0, 2)
            log(f"[{name}] {stats.rows_read} rows: token statistics in {report.timings[f'{name}_tokens_seconds']} s")
            longest, sample = (probe_choice(_row_lengths(stats), per_step, t.seed) if probe and name == "train"
                               else ([], []))
            t0 = time.perf_counter()
            dups, picked, n = _scan_duplicates(name, files, cfg, settings, index, removal, pool,
                                               set(longest) | set(sample), log)
            if n != stats.rows_read:
                raise DataError(f"{name}: {n} rows read for duplicates but {stats.rows_read} tokenized (did the "
                                f"files change while the report ran?)", file=", ".join(files))
            report.timings[f"{name}_duplicates_seconds"] = round(time.perf_counter() - t0, 2)
            log(f"[{name}] duplicates in {report.timings[f'{name}_duplicates_seconds']} s")
            report.splits[name], report.duplicates[name] = stats, dups
            if name == "train" and probe:
                probe_rows = _probe_rows(stats, picked, longest, sample, per_step)
    finally:
        if pool is not None:
            pool.terminate()
    return probe_rows


def _settings(cfg: Config, template) -> dict[str, Any]:
    d, t, f = cfg.data, cfg.training, cfg.finetuning
    return {
        "model": cfg.model.model_name_or_path, "template": template.name, "train_on": d.train_on,
        "cutoff_len": d.cutoff_len, "truncation": d.truncation, "packing": d.packing,
        "train_file": d.train_file or [], "eval_file": d.eval_file or [], "test_file": d.test_file or [],
        "finetuning_type": f.finetuning_type, "bf16": bool(t.bf16),
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps, "output_dir": t.output_dir,
    }


def data_report(cfg: Config, out_dir: str | None = None, dedup: bool = False, probe: bool = True,
                near_threshold: float = 0.8, log: Callable[[str], None] = lambda s: None) -> Report:
    """The report for training with `cfg` (see the module docstring). `dedup` writes cleaned copies of the training
    files to `out_dir`/dedup; `probe` runs a few real training steps to measure time and peak memory."""
    from sftlab.data.tokenize import check_template_tokens
    from sftlab.models.load import load_tokenizer, resolve_model_path
    from sftlab.data.templates import resolve_template
    from sftlab.data.splits import encode_settings

    d = cfg.data
    if not d.train_file:
        raise ConfigError("data report: pass --train_file (or a config with train_file)")
    if dedup and not out_dir:
        raise ConfigError("data report: --dedup needs --out DIR for the cleaned copies")
    started = time.perf_counter()
    path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(path)
    template = resolve_template(cfg, tokenizer, path)
    check_template_tokens(tokenizer, template)
    settings = encode_settings(cfg)
    process_bytes = process_rss()
    report = Report(_settings(cfg, template))
    if d.rqa_context == "retrieved":
        report.notes.append("rqa_context=retrieved: rows are reported with their gold passages, not retrieved ones")
    if getattr(d, "streaming", False):
        report.notes.append("streaming=true: training tokenizes as it reads; the report tokenized the files into the "
                            "data cache for its statistics (training does not use that cache)")
    if d.val_size:
        report.notes.append(f"val_size={d.val_size}: the eval split is drawn from these training rows at random; "
                            "the train figures include them")
    index = DuplicateIndex(threshold=near_threshold)
    removal: dict[str, dict[int, str]] = {}
    probe_rows = _scan_splits(cfg, tokenizer, template, settings, index, removal, report, probe, log)
    if dedup:
        report.dedup = _write_dedup(d.train_file, removal, Path(out_dir) / "dedup")
    train = report.splits["train"]
    if train.kept:
        t0 = time.perf_counter()
        report.cost = estimate_cost(cfg, train.kept_lengths, train.kept_trained, process_bytes)
        report.timings["estimate_seconds"] = round(time.perf_counter() - t0, 2)
        if probe and probe_rows is not None and probe_rows.longest:
            t0 = time.perf_counter()
            log("probe: running a few training steps")
            result = run_probe(cfg, probe_rows)
            report.timings["probe_seconds"] = round(time.perf_counter() - t0, 2)
            if result is not None:
                add_probe(report.cost, result)
            else:
                report.notes.append("the probe failed; see the printed error. No time estimate.")
        record_estimate(cfg, report)
    report.timings["total_seconds"] = round(time.perf_counter() - started, 2)
    return report


def _fingerprint_pool(workers: int):
    """Worker processes for the duplicate scan's hashing (none for preprocessing_num_workers <= 1)."""
    if workers <= 1:
        return None
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(workers)
    pool.workers = workers
    return pool


def _write_dedup(train_files: list[str], removal: dict[str, dict[int, str]], out: Path) -> dict[str, Any]:
    files, removed, reasons = [], 0, []
    for path in train_files:
        lines = removal.get(path, {})
        target, kept = write_deduplicated(path, set(lines), out)
        files.append(str(target))
        removed += len(lines)
        reasons += [{"row": f"{path}:{n}", "why": why} for n, why in sorted(lines.items())]
    return {"files": files, "removed": removed, "rows": reasons}


# ---- the probe ----------------------------------------------------------------------------------------------------
def run_probe(cfg: Config, rows: ProbeRows) -> dict[str, Any] | None:
    """Run `sftlab.probe` in a child process on the probe rows; per-step seconds and tokens, peak RSS."""
    items = rows.rows()
    per_step = rows.per_step
    steps = min(PROBE_STEPS, max(len(items) // per_step, 1))
    tmp = Path(tempfile.mkdtemp(prefix="sftlab-probe-"))
    try:
        data = tmp / "probe.jsonl"
        with open(data, "w", encoding="utf-8") as fh:
            for _, row in items[:steps * per_step]:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        conf = tmp / "config.yaml"
        save_config(cfg, str(conf))
        out = tmp / "probe.json"
        flags = {"train_file": str(data), "output_dir": str(tmp / "run"), "max_steps": steps,
                 "save_strategy": "no", "eval_strategy": "no", "do_eval": "false", "do_predict": "false",
                 "eval_file": "null", "test_file": "null", "val_size": 0, "train_sampling_strategy": "sequential",
                 "overwrite_output_dir": "true", "plot_loss": "false", "max_samples": "null",
                 "column_mapping": "{}", "dataset_format": rows.fmt, "load_best_model_at_end": "false",
                 "logging_steps": 1, "resume_from_checkpoint": "null", "packing": "false" if not cfg.data.packing else "true"}
        argv = [str(conf)] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(Path(__file__).parent.parent),
                                                                       os.environ.get("PYTHONPATH", "")] if p))
        proc = subprocess.Popen([sys.executable, "-m", "sftlab.probe", str(out), *argv], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = proc.communicate()
        if proc.returncode != 0 or not out.is_file():
            print(output[-3000:], file=sys.stderr)
            return None
        result = json.loads(out.read_text())
        lengths = [n for n, _ in items[:steps * per_step]]
        result["steps"] = [{"seconds": round(s, 4), "tokens": sum(lengths[i * per_step:(i + 1) * per_step])}
                           for i, s in enumerate(result.pop("step_seconds"))]
        result["data_tokens"] = sum(lengths)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the estimate kept for the real run --------------------------------------------------------------------------
def estimate_key(cfg: Config) -> dict[str, Any]:
    """The settings an estimate depends on: the real run compares only against an estimate made for them."""
    d, t, f = cfg.data, cfg.training, cfg.finetuning
    return {"model": cfg.model.model_name_or_path, "train_file": d.train_file, "cutoff_len": d.cutoff_len,
            "packing": d.packing, "finetuning_type": f.finetuning_type, "bf16": bool(t.bf16),
            "batch": t.per_device_train_batch_size, "grad_accum": t.gradient_accumulation_steps,
            "max_samples": d.max_samples, "epochs": t.num_train_epochs, "max_steps": t.max_steps}


def record_estimate(cfg: Config, report: Report, source: str | None = None) -> None:
    cost = report.cost
    if cost is None:
        return
    try:
        Path(cfg.training.output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(cfg.training.output_dir) / ESTIMATE_FILE, {
            "key": estimate_key(cfg), "peak_memory_bytes": cost.peak_memory_bytes(),
            "train_seconds": cost.train_seconds, "optimizer_steps": cost.plan.optimizer_steps,
            "source": source or ("sftlab data report" + (" with probe" if cost.probe else " (no probe)")),
        })
    except OSError:
        report.notes.append(f"could not record the estimate in {cfg.training.output_dir}")


# ---- writing ----------------------------------------------------------------------------------------------------
def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _plot_lengths(stats: SplitStats, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = stats.histogram()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=90)
    ax.bar(h["edges"][:-1], h["counts"], width=h["bin_width"], align="edge", color="#6baed6", edgecolor="#08519c")
    ax.axvline(stats.cutoff_len, color="#d94801", linewidth=2, label=f"cutoff_len {stats.cutoff_len}")
    ax.set_xlabel("tokens per row (before truncation)")
    ax.set_ylabel("rows")
    ax.set_title(f"{stats.split}: {stats.rows_read} rows, {stats.over_cutoff} over cutoff_len")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_memory(cost: CostEstimate, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = cost.memory
    parts = [("process", m.process), ("weights", m.weights), ("gradients", m.gradients),
             ("optimizer", m.optimizer), ("activations", m.activations), ("LM head chunk", m.loss_head),
             ("data", m.data)]
    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=90)
    left = 0.0
    colors = ["#bdbdbd", "#3182bd", "#6baed6", "#9ecae1", "#fd8d3c", "#fdae6b", "#a1d99b"]
    for (name, n), c in zip(parts, colors):
        ax.barh([0], [n / 2**30], left=left, color=c, label=f"{name} {n / 2**30:.2f}")
        left += n / 2**30
    peak = cost.peak_memory_bytes()
    if cost.probe and peak:
        ax.axvline(peak / 2**30, color="#d94801", linewidth=2, label=f"probe-measured {peak / 2**30:.2f}")
    ax.set_yticks([])
    ax.set_xlabel("GiB")
    ax.set_title("estimated peak memory")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _dist_row(name: str, d: dict) -> str:
    return f"| {name} | {d['mean']} | {d['median']} | {d['p95']} | {d['max']} |"


def report_markdown(report: Report, figures: dict[str, str]) -> str:
    data = report.to_dict()
    s = data["settings"]
    lines = ["# sftlab data report", "",
             f"Model `{s['model']}`, template `{s['template']}`, train_on={s['train_on']}, "
             f"cutoff_len={s['cutoff_len']}, truncation={s['truncation']}, packing={s['packing']}, "
             f"{s['finetuning_type']}, bf16={s['bf16']}.", ""]
    lines += [f"- {n}" for n in report.notes] + ([""] if report.notes else [])
    for name, d in data["splits"].items():
        lines += [f"## {name}: {', '.join(s[name + '_file'])}", "",
                  f"- rows read {d['rows_read']}, kept {d['kept']}, truncated {d['truncated']}, dropped "
                  f"{d['dropped_total']}" + (f" ({', '.join(f'{k}: {v}' for k, v in d['dropped'].items())})"
                                             if d['dropped'] else ""),
                  f"- formats: {', '.join(f'{k} {v}' for k, v in d['formats'].items())}; assistant turns per row: "
                  f"{', '.join(f'{k}: {v}' for k, v in d['turns_per_row'].items())}",
                  f"- rows over cutoff_len: {d['rows_over_cutoff']}; answers cut: {d['answers_cut']} "
                  f"({d['answer_tokens_lost']} answer tokens lost, {d['prompt_tokens_lost']} prompt tokens lost; "
                  f"dropped rows held {d['dropped_row_tokens']} tokens)",
                  f"- kept: {d['tokens']} tokens, {d['trained_tokens']} trained ({d['trained_share']:.1%}); of the "
                  f"trained tokens {d['answer_text_tokens']} are answer text and {d['markup_tokens']} template "
                  f"markup ({d['markup_share_of_trained']:.1%})", "",
                  "| tokens per row (before truncation) | mean | median | p95 | max |", "| --- | --- | --- | --- | --- |",
                  _dist_row("prompt (not trained)", d["prompt_tokens"]),
                  _dist_row("answer (trained)", d["answer_tokens"]), _dist_row("total", d["total_tokens"]), ""]
        if name in figures:
            lines += [f"![{name} lengths]({figures[name]})", ""]
    lines += ["## Duplicates and contamination", "",
              "Text of every message, lower-cased, whitespace collapsed; near = estimated Jaccard of word "
              "3-shingles >= the threshold (MinHash LSH).", "", "| split | exact | near | first examples |",
              "| --- | --- | --- | --- |"]
    for name, c in data["duplicates"].items():
        what = "within train" if name == "train" else f"{name} rows also in train"
        ex = "<br>".join(f"{m['kind']}: {m['row']} = {m['original']}" + (f" ({m['similarity']})" if m["kind"] == "near" else "")
                         for m in c["examples"]) or "-"
        lines.append(f"| {what} | {c['exact']} | {c['near']} | {ex} |")
    lines.append("")
    if report.dedup:
        lines += [f"Cleaned copies (`--dedup`): {', '.join(report.dedup['files'])}; {report.dedup['removed']} rows "
                  "removed:", ""] + [f"- {r['row']}: {r['why']}" for r in report.dedup["rows"][:50]] + [""]
    c = report.cost
    if c:
        p = c.plan
        lines += ["## Cost", "", f"- batching: {p.batching}",
                  f"- {p.examples} examples -> {p.rows} rows, {p.batches_per_epoch} batches/epoch, "
                  f"{p.steps_per_epoch} optimizer steps/epoch, {p.optimizer_steps} optimizer steps in all",
                  f"- tokens per epoch {p.tokens_per_epoch} ({p.computed_tokens_per_epoch} computed, padding "
                  f"{p.padding_share:.1%}); largest forward pass {p.largest_forward_tokens} tokens", ""]
        if c.memory:
            m = c.memory
            lines += ["| memory | estimate |", "| --- | --- |"] + [
                f"| {k} | {_gib(v)} |" for k, v in (("process (torch, transformers)", m.process), ("weights", m.weights),
                                                     ("gradients", m.gradients), ("optimizer state", m.optimizer),
                                                     ("activations, largest forward", m.activations),
                                                     ("LM head + loss chunk", m.loss_head),
                                                     ("tokenized data", m.data), ("total (analytic)", m.total))]
            if c.probe:
                lines.append(f"| peak measured by the probe (+ the rest of the data) | {_gib(c.peak_memory_bytes())} |")
            lines.append("")
        elif c.memory_note:
            lines += [f"- {c.memory_note}", ""]
        if "memory" in figures:
            lines += [f"![memory]({figures['memory']})", ""]
        if c.probe:
            steps = ", ".join(f"{s['seconds']:.2f} s / {s['tokens']} tokens" for s in c.probe["steps"])
            lines += [f"- probe: {len(c.probe['steps'])} real optimizer steps ({steps}); peak RSS "
                      f"{_gib(c.probe['peak_rss'])}"]
        if c.train_seconds is not None:
            lines += [f"- estimated training time (train_runtime): {_duration(c.train_seconds)} "
                      f"({c.train_seconds} s)"]
        lines += [f"- {n}" for n in c.notes] + [""]
    lines += ["## Report timings", "", ", ".join(f"{k} {v}" for k, v in report.timings.items()), ""]
    return "\n".join(lines)


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """data_report.md, data_report.json and the PNG figures in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for name, stats in report.splits.items():
        if stats.rows_read:
            figures[name] = f"lengths_{name}.png"
            _plot_lengths(stats, out / figures[name])
    if report.cost and report.cost.memory:
        figures["memory"] = "memory.png"
        _plot_memory(report.cost, out / figures["memory"])
    for k, v in figures.items():
        paths[k] = out / v
    write_json(out / "data_report.json", report.to_dict())
    md = out / "data_report.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(report_markdown(report, figures), encoding="utf-8")
    os.replace(tmp, md)
    paths.update(json=out / "data_report.json", markdown=md)
    return paths


def ensure_run_estimate(cfg: Config, examples: list[dict]) -> None:
    """Before training: keep the estimate `sftlab data report` recorded for these settings, else record the
    analytic one (memory and steps; no time without a probe), so the model card can compare."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    path = Path(cfg.training.output_dir) / ESTIMATE_FILE
    key = estimate_key(cfg)
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("key") == json.loads(json.dumps(key)):
            return
    except (OSError, json.JSONDecodeError):
        pass

    try:
        from sftlab.data.store import example_lengths, example_trained_counts

        # From the stored lengths and counts: reading a million examples here would map them all into memory.
        lengths = example_lengths(examples).tolist()
        trained = example_trained_counts(examples).tolist()
        report = Report({})
        report.cost = estimate_cost(cfg, lengths, trained, process_rss(), data_in_process=True)
        record_estimate(cfg, report, source="sftlab train (analytic, before loading the model)")
    except Exception as e:  # an estimate must never stop a training run
        log.warning(f"no cost estimate for the model card: {type(e).__name__}: {e}")
