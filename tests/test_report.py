"""`sftlab data report` on a data set built here with known duplicates, overlap, truncations and markup share: every
number is checked against a computation made here from the tokenizer alone; then the CLI through the real entry
point, and the probe on a tiny model followed by the real run it estimated."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab.config import parse_config
from sftlab.report import data_report, write_report

CUTOFF = 160
# Markup around an alpaca row under chatml (no default system): everything that is not the row's own text.
HEAD, MID, END, AFTER = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", "\n"


def _words(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def build_rows() -> dict:
    """Unique rows of random words (no shared 3-shingles to speak of), then known copies."""
    rng = random.Random(7)
    vocab = [f"w{a}{b}" for a in "bcdfghjklmnp" for b in "aeiou"]  # 60 words
    unique = []
    for i in range(30):
        # rows 0, 10, 20: answers longer than CUTOFF; rows 1, 2, 6: long enough that one changed word leaves a
        # Jaccard similarity of 3-shingles near 0.9
        answer_words = 150 if i % 10 == 0 else 50 if i in (1, 2, 6) else rng.randint(10, 40)
        unique.append({"instruction": _words(rng, vocab, rng.randint(5, 15)), "output": _words(rng, vocab, answer_words)})
    exact = [  # the same text after lower-casing and collapsing whitespace
        {"instruction": unique[3]["instruction"].upper(), "output": unique[3]["output"]},
        {"instruction": unique[4]["instruction"].replace(" ", "\t "), "output": unique[4]["output"].replace(" ", "  ")},
    ]

    def one_word_changed(row):
        words = row["output"].split()
        words[len(words) // 2] = "zzchanged"
        return {"instruction": row["instruction"], "output": " ".join(words)}

    near = [one_word_changed(unique[1]), one_word_changed(unique[2])]
    fresh = {"instruction": "an entirely new question here", "output": "with an answer nobody trained on"}
    return {
        "train": unique + exact + near,
        "eval": [dict(unique[5]), one_word_changed(unique[6]), fresh],
        "test": [{"instruction": unique[7]["instruction"].replace(" ", "\n"), "output": unique[7]["output"].upper()}],
    }


def _n(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def expected_split(tok, rows: list[dict]) -> dict:
    """Token counts from the tokenizer alone: the row's pieces are tokenized apart (chatml's markers and newlines
    are token boundaries for this tokenizer, checked below), and keep_answer truncation is applied as documented:
    the prompt cut from the left to max(cutoff - rest, cutoff // 2) tokens, the rest (answer, end-of-turn, newline)
    from the right."""
    prompt, answer, total = [], [], []
    kept_tokens = trained = markup = truncated = cut = lost = 0
    for r in rows:
        p = _n(tok, HEAD) + _n(tok, r["instruction"]) + _n(tok, MID)
        a = _n(tok, r["output"]) + _n(tok, END)  # trained: the answer and its end-of-turn marker
        rest = a + _n(tok, AFTER)  # the newline after the turn is not trained
        whole = HEAD + r["instruction"] + MID + r["output"] + END + AFTER
        assert _n(tok, whole) == p + rest, "piecewise tokenization must equal the whole for this test's data"
        prompt.append(p + _n(tok, AFTER))
        answer.append(a)
        total.append(p + rest)
        if p + rest <= CUTOFF:
            kept_tokens += p + rest
            trained += a
            markup += 1  # <|im_end|>
            continue
        truncated += 1
        keep_prompt = min(p, max(CUTOFF - rest, CUTOFF // 2))
        keep_rest = CUTOFF - keep_prompt
        kept_answer = min(a, keep_rest)
        kept_tokens += CUTOFF
        trained += kept_answer
        markup += int(keep_rest >= a)  # the marker survives only if the whole answer does
        cut += kept_answer < a
        lost += a - kept_answer
    return {"prompt": prompt, "answer": answer, "total": total, "tokens": kept_tokens, "trained": trained,
            "markup": markup, "truncated": truncated, "cut": cut, "lost": lost}


def _dist(xs: list[int]) -> dict:
    s = sorted(xs)
    return {"mean": round(statistics.fmean(s), 2), "median": statistics.median(s),
            "p95": s[math.ceil(0.95 * len(s)) - 1], "max": s[-1]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def data_files(tmp_path):
    rows = build_rows()
    return rows, {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in rows.items()}


def _cfg(model_dir, files, out, *extra):
    return parse_config(["--model_name_or_path", model_dir, "--train_file", files["train"], "--eval_file",
                         files["eval"], "--test_file", files["test"], "--template", "chatml", "--cutoff_len",
                         str(CUTOFF), "--output_dir", str(out), "--bf16", "false",
                         "--per_device_train_batch_size", "4", *extra])


def test_report_numbers_equal_the_expected_ones(tmp_path, tiny_model_dir, smol_tokenizer, data_files):
    rows, files = data_files
    report = data_report(_cfg(tiny_model_dir, files, tmp_path / "run"), out_dir=str(tmp_path / "rep"),
                         dedup=True, probe=False)
    got = report.to_dict()
    for split in ("train", "eval", "test"):
        want = expected_split(smol_tokenizer, rows[split])
        s = got["splits"][split]
        n = len(rows[split])
        assert (s["rows_read"], s["kept"], s["dropped_total"]) == (n, n, 0)
        assert s["formats"] == {"alpaca": n} and s["turns_per_row"] == {"1": n}
        assert s["prompt_tokens"] == _dist(want["prompt"])
        assert s["answer_tokens"] == _dist(want["answer"])
        assert s["total_tokens"] == _dist(want["total"])
        assert (s["truncated"], s["answers_cut"], s["answer_tokens_lost"]) == (want["truncated"], want["cut"],
                                                                               want["lost"])
        assert (s["tokens"], s["trained_tokens"], s["markup_tokens"]) == (want["tokens"], want["trained"],
                                                                         want["markup"])
        assert s["markup_share_of_trained"] == round(want["markup"] / want["trained"], 4)
        assert sum(s["histogram"]["counts"]) == n
    assert got["splits"]["train"]["truncated"] == 3  # the three 150-word answers

    train = "train.jsonl"
    dups = got["duplicates"]
    assert (dups["train"]["exact"], dups["train"]["near"]) == (2, 2)
    assert [(m["kind"], Path(m["row"]).name, Path(m["original"]).name) for m in dups["train"]["examples"]] == [
        ("exact", f"{train}:31", f"{train}:4"), ("exact", f"{train}:32", f"{train}:5"),
        ("near", f"{train}:33", f"{train}:2"), ("near", f"{train}:34", f"{train}:3")]
    assert (dups["eval"]["exact"], dups["eval"]["near"]) == (1, 1)
    assert [(m["kind"], Path(m["row"]).name, Path(m["original"]).name) for m in dups["eval"]["examples"]] == [
        ("exact", "eval.jsonl:1", f"{train}:6"), ("near", "eval.jsonl:2", f"{train}:7")]
    assert (dups["test"]["exact"], dups["test"]["near"]) == (1, 0)

    # --dedup: the four copies and the three training rows that the eval/test sets repeat are gone; input kept.
    cleaned = [json.loads(l) for l in Path(report.dedup["files"][0]).read_text().splitlines()]
    removed = {31, 32, 33, 34, 6, 7, 8}
    assert cleaned == [r for i, r in enumerate(rows["train"], start=1) if i not in removed]
    assert report.dedup["removed"] == 7
    assert len(Path(files["train"]).read_text().splitlines()) == len(rows["train"])

    # Cost: 34 examples in batches of 4, padding-free on CPU (one row per batch, padded to a multiple of 64).
    plan = got["cost"]["plan"]
    assert plan["examples"] == 34 and plan["batches_per_epoch"] == 9 and plan["optimizer_steps"] == 9
    assert plan["tokens_per_epoch"] == got["splits"]["train"]["tokens"]

    paths = write_report(report, tmp_path / "rep")
    assert json.loads(paths["json"].read_text())["splits"]["train"]["kept"] == 34
    md = paths["markdown"].read_text()
    assert "answers cut: 3" in md and "![train lengths](lengths_train.png)" in md
    assert all(paths[k].stat().st_size > 1000 for k in ("train", "eval", "test", "memory"))


def test_dropped_rows_are_counted_with_their_reason(tmp_path, tiny_model_dir, smol_tokenizer, data_files):
    rows, files = data_files
    report = data_report(_cfg(tiny_model_dir, files, tmp_path / "run", "--truncation", "drop"), probe=False)
    s = report.to_dict()["splits"]["train"]
    want = expected_split(smol_tokenizer, rows["train"])
    assert s["dropped"] == {"too long": 3} and s["kept"] == 31 and s["truncated"] == 0
    assert s["dropped_row_tokens"] == sum(t for t in want["total"] if t > CUTOFF)


def test_cli_writes_the_report(tmp_path, tiny_model_dir, data_files):
    _, files = data_files
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ntrain_file: {files['train']}\neval_file: {files['eval']}\n"
                   f"template: chatml\ncutoff_len: {CUTOFF}\nbf16: false\noutput_dir: {tmp_path / 'run'}\n")
    src = Path(__file__).resolve().parent.parent / "src"
    proc = subprocess.run([sys.executable, "-m", "sftlab", "data", "report", str(cfg), "--out", str(tmp_path / "d"),
                           "--no_probe", "--per_device_train_batch_size", "2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(src)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[train] 34 rows: kept 34, truncated 3" in proc.stdout
    assert "[train] duplicates within train: 2 exact, 2 near" in proc.stdout
    assert "[eval] eval rows also in train: 1 exact, 1 near" in proc.stdout
    assert "17 optimizer steps" in proc.stdout  # --per_device_train_batch_size 2: flags as in sftlab train
    data = json.loads((tmp_path / "d" / "data_report.json").read_text())
    assert data["cost"]["probe"] is None and data["cost"]["plan"]["optimizer_steps"] == 17
    assert (tmp_path / "d" / "data_report.md").is_file() and (tmp_path / "run" / "sftlab_estimate.json").is_file()


def test_cli_refuses_dedup_of_an_unsupported_file(tmp_path, tiny_model_dir):
    from sftlab.cli import main

    f = tmp_path / "d.csv"
    f.write_text("instruction,output\nq,a\nq,a\n")
    code = main(["data", "report", "--model_name_or_path", tiny_model_dir, "--train_file", str(f), "--out",
                 str(tmp_path / "o"), "--dedup", "--no_probe", "--output_dir", str(tmp_path / "run")])
    assert code == 2


def test_probe_then_the_real_run_it_estimated(tmp_path, tiny_model_dir, data_files):
    """The probe runs real steps in a child process; the run that follows finds the estimate in its output_dir and its
    model card compares it with what it measured; the optimizer steps are those the plan said."""
    from sftlab.cli import main

    _, files = data_files
    run = tmp_path / "run"
    flags = ["--model_name_or_path", tiny_model_dir, "--train_file", files["train"], "--template", "chatml",
             "--cutoff_len", str(CUTOFF), "--output_dir", str(run), "--bf16", "false",
             "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--save_strategy", "no",
             "--data_cache_dir", str(tmp_path / "cache")]
    report = data_report(parse_config(flags), probe=True)
    probe = report.cost.probe
    assert probe is not None, report.notes
    assert [s["tokens"] for s in probe["steps"][:1]] == [CUTOFF * 3 + sorted(
        report.splits["train"].kept_lengths)[-4]]  # step 1: the four longest rows (three cut to CUTOFF)
    assert len(probe["steps"]) == 3 and all(s["seconds"] > 0 for s in probe["steps"])
    assert probe["peak_rss"] > report.cost.memory.process and report.cost.train_seconds > 0
    assert json.loads((run / "sftlab_estimate.json").read_text())["source"] == "sftlab data report with probe"

    assert main(["train", *flags]) == 0
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == report.cost.plan.optimizer_steps == 9
    card = (run / "README.md").read_text()
    assert "## Estimate vs this run" in card and "sftlab data report with probe" in card
    row = next(l for l in card.splitlines() if l.startswith("| peak memory"))
    assert row.count("|") == 5 and "| - |" not in row


def test_report_reads_the_training_cache_and_hashes_in_workers(tmp_path, tiny_model_dir, smol_tokenizer, data_files,
                                                                monkeypatch):
    """The duplicate scan over two worker processes gives the numbers of the serial one; the tokenized entries the
    first report wrote are those the second one and training map (training after a report tokenizes nothing)."""
    import sftlab.data.dataset as dataset
    import sftlab.report as report_module
    from sftlab.data.splits import build_splits
    from sftlab.data.templates import load_template

    _, files = data_files
    serial = data_report(_cfg(tiny_model_dir, files, tmp_path / "a", "--data_cache_dir", str(tmp_path / "c")),
                         probe=False).to_dict()

    def tokenized_again(*a, **k):
        raise AssertionError("tokenized again instead of mapping the cache")

    monkeypatch.setattr(dataset, "encode_stream", tokenized_again)
    monkeypatch.setattr(report_module, "FINGERPRINT_ROWS", 5)  # several chunks in flight, answered in order
    cfg = _cfg(tiny_model_dir, files, tmp_path / "b", "--data_cache_dir", str(tmp_path / "c"),
               "--preprocessing_num_workers", "2")
    parallel = data_report(cfg, probe=False).to_dict()
    assert parallel["splits"] == serial["splits"] and parallel["duplicates"] == serial["duplicates"]
    assert (parallel["duplicates"]["train"]["exact"], parallel["duplicates"]["eval"]["near"]) == (2, 1)
    splits = build_splits(cfg, smol_tokenizer, load_template("chatml", smol_tokenizer))
    assert len(splits.train) == parallel["splits"]["train"]["kept"] == 34


def test_probe_batches_are_the_longest_then_typical_ones():
    """Step 1: the longest rows (earlier first among equals); later steps: batches whose tokens are near the mean
    tokens per step, never a dropped row."""
    import numpy as np

    from sftlab.report import PROBE_STEPS, probe_choice

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 900, size=500)
    lengths[[7, 9]] = 2000
    lengths[[3, 100, 200]] = -1  # dropped
    longest, sample = probe_choice(lengths, 4, seed=1)
    kept = lengths[lengths >= 0]
    assert longest[:2] == [7, 9] and sorted(lengths[longest]) == sorted(kept)[-4:]
    assert len(sample) == 4 * (PROBE_STEPS - 1) and not {3, 100, 200} & set(sample)
    for step in range(PROBE_STEPS - 1):
        tokens = lengths[sample[4 * step:4 * step + 4]].sum()
        assert abs(tokens - 4 * kept.mean()) < 0.05 * 4 * kept.mean()
    assert probe_choice(lengths, 4, seed=1) == (longest, sample)
