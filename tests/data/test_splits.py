"""build_splits: the memory-mapped examples, the val_size split and the packs, against the list-based reference
(dataset.split_off, packing.pack_examples) on the same examples."""

from __future__ import annotations

import json
import random

from sftlab.config import parse_config
from sftlab.data.dataset import split_off, tokenize_files
from sftlab.data.packing import pack_examples
from sftlab.data.splits import build_splits, encode_settings, pack, split_examples
from sftlab.data.templates import load_template
from tests.data.test_batched import make_row


def write_rows(path, n, seed=0):
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(make_row("messages", rng)) + "\n" for _ in range(n)))
    return str(path)


def config(tmp_path, data, *extra):
    return parse_config(["--model_name_or_path", "unused", "--train_file", data, "--output_dir", str(tmp_path / "out"),
                         "--data_cache_dir", str(tmp_path / "cache"), "--template", "chatml", "--cutoff_len", "256", "--do_train", "true",
                         *extra])


def test_examples_are_mapped_from_disk_not_copied(tmp_path, smol_tokenizer):
    data = write_rows(tmp_path / "d.jsonl", 50)
    cfg = config(tmp_path, data)
    ex, _ = tokenize_files([data], "train", smol_tokenizer, load_template("chatml", smol_tokenizer),
                           encode_settings(cfg), cache_dir=str(tmp_path / "cache"))
    assert all(not a.flags.owndata and not a.flags.writeable for a in ex._ids + ex._labels)
    assert ex == [ex[i] for i in range(len(ex))] and ex[-1] == ex[len(ex) - 1]


def test_split_and_packs_equal_the_list_reference(tmp_path, smol_tokenizer):
    data = write_rows(tmp_path / "d.jsonl", 120)
    cfg = config(tmp_path, data)
    ex, _ = tokenize_files([data], "train", smol_tokenizer, load_template("chatml", smol_tokenizer),
                           encode_settings(cfg), cache_dir=str(tmp_path / "cache"))
    as_list = list(ex)
    train, held = split_examples(ex, 0.25, seed=3)
    want_train, want_held = split_off(as_list, 0.25, seed=3)
    assert list(train) == want_train and list(held) == want_held
    assert train.lengths().tolist() == [len(e["input_ids"]) for e in want_train]
    for capacity in (256, 1000):
        packed = pack(train, capacity)
        assert list(packed) == pack_examples(want_train, capacity)
        assert packed.lengths().tolist() == [len(p["input_ids"]) for p in packed]


def test_build_splits_val_size_and_packing(tmp_path, smol_tokenizer):
    data = write_rows(tmp_path / "d.jsonl", 80, seed=1)
    cfg = config(tmp_path, data, "--val_size", "0.2", "--packing", "true", "--seed", "5")
    splits = build_splits(cfg, smol_tokenizer, load_template("chatml", smol_tokenizer))
    ex, _ = tokenize_files([data], "train", smol_tokenizer, load_template("chatml", smol_tokenizer),
                           encode_settings(cfg), cache_dir=str(tmp_path / "cache"))
    want_train, want_eval = split_off(list(ex), 0.2, seed=5)
    assert list(splits.train) == pack_examples(want_train, 256)
    assert list(splits.eval) == pack_examples(want_eval, 256)
    assert [s.split for s in splits.summaries] == ["train"] and splits.summaries[0].rows_read == 80


def test_trained_counts_stored_beside_the_tokens(tmp_path, smol_tokenizer):
    data = write_rows(tmp_path / "d.jsonl", 60, seed=2)
    cfg = config(tmp_path, data)
    ex, _ = tokenize_files([data], "train", smol_tokenizer, load_template("chatml", smol_tokenizer),
                           encode_settings(cfg), cache_dir=str(tmp_path / "cache"))
    want = [sum(l != -100 for l in e["labels"]) for e in ex]
    assert ex.trained_counts().tolist() == want
    train, _ = split_examples(ex, 0.25, seed=3)
    assert train.trained_counts().tolist() == [sum(l != -100 for l in e["labels"]) for e in train]
    packed = pack(train, 256)
    assert packed.trained_counts().tolist() == [sum(l != -100 for l in p["labels"]) for p in packed]
