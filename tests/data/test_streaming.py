"""Streaming (sftlab.data.streaming) against independent computations: the lazy readers give the rows
`loader.read_rows` gives; a pass over the stream gives the per-row reference's examples (`dataset.encode_row`)
token for token with the same drop and truncation counts; (rank, worker) shards cover every row exactly once;
packs on the fly are `packing.pack_examples` of consecutive windows; a stream restarted at a recorded position
continues with the same items; a bad row in a DataLoader worker surfaces as its DataError; and through
`sftlab train`, a streaming run SIGKILLed after a checkpoint and rerun ends with the weights of an uninterrupted
run."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
import torch

from sftlab.config import build_config
from sftlab.data.dataset import EncodeSettings
from sftlab.data.formats import FormatOptions
from sftlab.data.loader import read_rows
from sftlab.data.packing import pack_examples
from sftlab.data.streaming import (
    ERROR_KEY, POSITION_KEY, Position, StreamTracker, StreamingExamples, read_file,
)
from sftlab.data.templates import _finalize, load_template, prefix_template
from sftlab.errors import ConfigError, DataError
from tests.data.test_batched import make_row, reference, write_rows
from tests.reliability.conftest import (  # noqa: F401  (fixtures)
    _one_thread, cache_dir, max_abs_diff, model_dir, run_inprocess, train_argv, weights,
)

STREAM_FORMATS = ("alpaca", "sharegpt", "messages")


def settings(train_on="completion", cutoff=96, truncation="keep_answer"):
    return EncodeSettings(train_on, cutoff, truncation, None, {}, FormatOptions())


def one_pass(ds: StreamingExamples, shard=0, shards=1, start=Position()) -> list[dict]:
    return [item for item, _ in ds.one_pass(shard, shards, start)]


def mixed_files(tmp_path, n=80):
    return [write_rows(tmp_path / f"{fmt}.jsonl", fmt, n, seed=i + 1) for i, fmt in enumerate(STREAM_FORMATS)]


# ---- readers ------------------------------------------------------------------------------------------------
def test_lazy_readers_give_the_rows_read_rows_gives(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(4)
    rows = [make_row("messages", rng) for _ in range(40)]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 7 == 0 else "") for i, r in enumerate(rows)))
    pq_path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pq_path, row_group_size=9)  # several row groups
    flat = [{"instruction": f"q {i}, \"quoted\"", "input": "" if i % 3 else f"ctx\nline {i}", "output": f"a {i}"}
            for i in range(30)]
    csv_path = tmp_path / "a.csv"
    import csv

    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["instruction", "input", "output"])
        w.writeheader()
        w.writerows(flat)
    for path in (arr, jl, pq_path):
        want = read_rows(str(path))
        got = [r for _, r in read_file(str(path))]
        assert [(r.data, r.line) for r in got] == [(r.data, r.line) for r in want], path.name
        # From a start index, and only the rows a shard owns.
        assert [r.data for _, r in read_file(str(path), 13, lambda i: i % 3 == 1)] == [
            r.data for k, r in enumerate(want) if k >= 13 and k % 3 == 1]
    got = [r.data for _, r in read_file(str(csv_path))]
    assert got == [{**r, "input": r["input"] or None} for r in flat]  # an empty cell is a missing field
    assert [r.data for r in read_rows(str(csv_path))] == got


def test_reader_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n' * 3 + '{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 4: malformed JSON"):
        list(read_file(str(p)))
    assert [i for i, _ in read_file(str(p), owns=lambda i: i % 2 == 0)] == [0, 2]  # row 3 is another shard's
    c = tmp_path / "bad.csv"
    c.write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"bad.csv, line 3: 3 cells but the header names 2 columns"):
        list(read_file(str(c)))
    a = tmp_path / "bad.json"
    a.write_text('[{"instruction": "a", "output": "b"}, 7]')
    with pytest.raises(DataError, match=r"row 2 is a int, expected an object"):
        list(read_file(str(a)))


# ---- examples: the reference's, token for token -------------------------------------------------------------
def test_a_pass_gives_the_reference_examples_and_counts(tmp_path, smol_tokenizer, sp_tokenizer):
    files = mixed_files(tmp_path, 50)
    cases = [
        (smol_tokenizer, load_template(None, smol_tokenizer), settings("completion", 96, "keep_answer")),
        (smol_tokenizer, load_template("llama2", smol_tokenizer), settings("last_turn", 40, "keep_answer")),
        (sp_tokenizer, load_template("chatml", sp_tokenizer), settings("all", 80, "drop")),
        (sp_tokenizer, _finalize(prefix_template("<s>[INST]", "[/INST]", " ", "</s>"), sp_tokenizer),
         settings("completion", 8192, "keep_answer")),
    ]
    for tok, template, s in cases:
        want, dropped, truncated = reference(files, tok, template, s)
        ds = StreamingExamples(files, tok, template, s, encode_rows=16)
        got = one_pass(ds)
        assert len(got) == len(want) and got == want
        st = ds.stats
        assert (st.rows_read, dict(st.dropped), st.truncated) == (150, dropped, truncated)
        assert st.formats == {fmt: 50 for fmt in STREAM_FORMATS}
    # The cases above cut rows and dropped some: both paths were exercised.
    assert truncated == 0 and reference(files, smol_tokenizer, load_template("llama2", smol_tokenizer),
                                        settings("last_turn", 40))[2] > 0
    assert reference(files, sp_tokenizer, load_template("chatml", sp_tokenizer),
                     settings("all", 80, "drop"))[1].get("too long", 0) > 0


def test_every_file_type_streams_the_same_examples(tmp_path, smol_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(9)
    rows = [make_row("sharegpt", rng) for _ in range(50)]
    jl = write_rows(tmp_path / "s.jsonl", "sharegpt", 50, seed=9)
    arr = tmp_path / "s.json"
    arr.write_text(json.dumps(rows))
    pqp = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqp, row_group_size=16)
    template, s = load_template("chatml", smol_tokenizer), settings()
    want = reference([jl], smol_tokenizer, template, s)[0]
    for path in (jl, str(arr), str(pqp)):
        assert one_pass(StreamingExamples([path], smol_tokenizer, template, s)) == want, path


# ---- shards, packs, positions -------------------------------------------------------------------------------
def _loader_items(ds: StreamingExamples, workers: int, passes: int = 1) -> list[dict]:
    """Items of the stream through a DataLoader with ``workers`` processes, until every shard began pass ``passes``."""
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=lambda f: f[0])
    items, started = [], set()
    for item in loader:
        assert ERROR_KEY not in item, item.get(ERROR_KEY)
        shard, shards, epoch = item[POSITION_KEY][:3]
        if epoch >= passes:
            started.add(shard)
            if len(started) == workers:
                break
            continue
        items.append(item)
    return items


def test_two_ranks_by_two_workers_see_every_row_exactly_once_per_pass(tmp_path, smol_tokenizer):
    files = mixed_files(tmp_path, 45)
    template, s = load_template(None, smol_tokenizer), settings()
    want = reference(files, smol_tokenizer, template, s)[0]
    seen, examples, shards_seen = Counter(), [], set()
    for rank in range(2):
        ds = StreamingExamples(files, smol_tokenizer, template, s, rank=rank, world_size=2)
        for item in _loader_items(ds, workers=2):
            shard, shards, epoch, f, row, _ = item[POSITION_KEY]
            assert shards == 4 and epoch == 0
            shards_seen.add(shard)
            seen[(f, row - 1)] += 1  # the position after an example is its row + 1
            examples.append({"input_ids": item["input_ids"], "labels": item["labels"]})
    assert shards_seen == {0, 1, 2, 3}
    assert sorted(seen) == [(f, r) for f in range(3) for r in range(45)] and set(seen.values()) == {1}
    key = lambda e: (e["input_ids"], e["labels"])  # noqa: E731
    assert sorted(examples, key=key) == sorted(want, key=key)


def test_packs_on_the_fly_are_the_packs_of_consecutive_windows(tmp_path, smol_tokenizer):
    files = mixed_files(tmp_path, 40)
    template, s = load_template("chatml", smol_tokenizer), settings("completion", 160)
    want = reference(files, smol_tokenizer, template, s)[0]
    window = 25
    expected = [p for k in range(0, len(want), window) for p in pack_examples(want[k:k + window], 160)]
    ds = StreamingExamples(files, smol_tokenizer, template, s, packing=True, pack_window=window)
    got = one_pass(ds)
    assert got == expected
    assert len(got) < len(want) and all(len(p["input_ids"]) <= 160 for p in got)


@pytest.mark.parametrize("packing", [False, True])
def test_restarting_at_a_recorded_position_continues_with_the_same_items(tmp_path, smol_tokenizer, packing):
    files = mixed_files(tmp_path, 20)
    template, s = load_template("chatml", smol_tokenizer), settings("completion", 160)
    ds = StreamingExamples(files, smol_tokenizer, template, s, packing=packing, pack_window=7)
    n_pass = len(one_pass(ds, 1, 2))
    straight = list(itertools.islice(ds.shard_items(1, 2), 2 * n_pass + 5))  # into the third pass
    assert straight[n_pass][1].epoch == 1 and [i for i, _ in straight[:n_pass]] == [i for i, _ in
                                                                                 straight[n_pass:2 * n_pass]]
    for k in (0, 3, n_pass - 1, n_pass, n_pass + 4):
        resumed = list(itertools.islice(ds.shard_items(1, 2, straight[k][1]), len(straight) - k - 1))
        assert resumed == straight[k + 1:], f"restart after item {k}"


def test_tracker_keeps_positions_and_restores_them(tmp_path, smol_tokenizer):
    files = mixed_files(tmp_path, 10)
    ds = StreamingExamples(files, smol_tokenizer, load_template("chatml", smol_tokenizer), settings(), packing=True,
                           pack_window=4)
    tracker = StreamTracker(ds)
    batch = {"input_ids": torch.zeros(1, 2), POSITION_KEY: torch.tensor([1, 2, 3, 1, 5, 2])}
    assert POSITION_KEY not in tracker.observe(batch)
    tracker.save(str(tmp_path), rank=0)
    again = StreamTracker(StreamingExamples(files, None, None, settings()))
    assert again.restore(str(tmp_path), rank=0) and not again.restore(str(tmp_path), rank=1)
    assert again.dataset.start == {1: Position(3, 1, 5, 2)} and again.dataset.num_shards_at_start == 2
    assert again.dataset.batches_before == 1
    with pytest.raises(DataError, match="split over 2 shards"):
        again.dataset._check_shards(4)


# ---- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', r"line 57: malformed JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}),
     r"line 57, field 'messages\[1\]\.content': missing"),
])
def test_a_bad_row_in_a_worker_stops_with_its_error(tmp_path, smol_tokenizer, bad, message):
    from sftlab.data.collator import SFTCollator
    from sftlab.train.trainer import CountingCollator

    rng = random.Random(2)
    lines = [json.dumps(make_row("messages", rng)) for _ in range(80)]
    lines[56] = bad
    p = tmp_path / "stream.jsonl"
    p.write_text("\n".join(lines) + "\n")
    ds = StreamingExamples([str(p)], smol_tokenizer, load_template("chatml", smol_tokenizer), settings())
    tracker = StreamTracker(ds)
    collate = CountingCollator(SFTCollator(pad_token_id=0))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    with pytest.raises(DataError, match=rf"stream.jsonl, {message}") as err:
        for batch in loader:
            tracker.observe(batch)
    assert err.value.file == str(p) and err.value.line == 57
    assert "Traceback" not in str(err.value)


def test_streaming_options_are_checked_when_parsed(tmp_path):
    f = write_rows(tmp_path / "a.jsonl", "alpaca", 3, seed=1)
    with pytest.raises(ConfigError, match=r"streaming: true needs max_steps"):
        build_config({"train_file": f, "streaming": True})
    with pytest.raises(ConfigError, match=r"val_size cannot be split off a stream"):
        build_config({"train_file": f, "streaming": True, "max_steps": 5, "val_size": 0.1})
    cfg = build_config({"train_file": f, "streaming": "true", "max_steps": 5})
    assert cfg.data.streaming is True
    assert build_config({"train_file": f}).data.streaming is False


# ---- through `sftlab train` --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stream-data") / "train.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(30):
            fh.write(json.dumps({"instruction": f"Say number {i} twice", "output": f"{i} {i}, and {i * 7} more"}) + "\n")
    return str(path)


STREAM_SAVE_STEPS = 3  # odd: the resumed run's first batch is the second worker's turn


def _stream_argv(model_dir, data, out, cache):
    argv = train_argv(model_dir, data, out, cache, finetuning_type="full", streaming="true", packing="true",
                      cutoff_len=64, dataloader_num_workers=2)
    at = argv.index("--save_steps")
    return argv[:at + 1] + [str(STREAM_SAVE_STEPS)] + argv[at + 2:]


def test_sigkill_then_rerun_resumes_the_stream_exactly(tmp_path, model_dir, stream_file, cache_dir, capsys):
    from tests.reliability.test_resume import _kill_after_first_checkpoint

    ref = tmp_path / "ref"
    assert run_inprocess(_stream_argv(model_dir, stream_file, str(ref), cache_dir)) == 0
    out = tmp_path / "run"
    argv = _stream_argv(model_dir, stream_file, str(out), cache_dir)
    capsys.readouterr()
    _kill_after_first_checkpoint(argv, out, step=STREAM_SAVE_STEPS)
    state = json.loads((out / f"checkpoint-{STREAM_SAVE_STEPS}" / "stream_state_0.json").read_text())
    assert sorted(state["shards"]) == ["0", "1"] and state["batches"] == STREAM_SAVE_STEPS  # a position per worker
    assert run_inprocess(argv) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "[train, streamed] rows read" in printed
    diff = max_abs_diff(weights(out), weights(ref))
    print(f"max |w_resumed - w_reference| = {diff:.3g}")
    assert diff == 0.0


def test_a_bad_row_stops_sftlab_train_with_its_place(tmp_path, model_dir, stream_file, cache_dir, capsys):
    lines = open(stream_file).read().splitlines()
    lines[20] = json.dumps({"instruction": "no output here"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    assert run_inprocess(_stream_argv(model_dir, str(bad), str(tmp_path / "o"), cache_dir)) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 21, field 'output': missing" in err and "Traceback" not in err
