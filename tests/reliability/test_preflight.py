"""Mistakes that can be known before training fail in the first seconds, before the model is loaded, with exit code
2 and one clear line. The model directory used here has a valid config and tokenizer but garbage weights, and
`load_model` is replaced by a tripwire: any case that got as far as loading the model would fail differently."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.reliability.conftest import REPO, child_env, run_inprocess


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory, model_dir) -> str:
    """The tiny model with its weights replaced by junk: loading it could only fail."""
    d = tmp_path_factory.mktemp("poisoned") / "model"
    shutil.copytree(model_dir, d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    return str(d)


@pytest.fixture()
def tripwire(monkeypatch):
    import sftlab.models.load as load

    def load_model(*a, **k):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(load, "load_model", load_model)


def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--template", "alpaca", "--train_file", data, "--output_dir", out,
            "--max_steps", "2", "--bf16", "false", "--plot_loss", "false", *extra]


def test_unwritable_output_dir_fails_fast_through_the_real_cli(tmp_path, poisoned_model, data_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a directory cannot be created below a file, not even by root
    out = blocker / "run"
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sftlab", "train", *_argv(poisoned_model, data_file, str(out))],
                       cwd=str(REPO), env=child_env(), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    print(f"\nunwritable output_dir: exit {r.returncode} after {seconds:.1f} s (process start included)")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"sftlab train: error: output_dir: cannot write to {out}: Not a directory"
    assert "Traceback" not in r.stderr and "Loading weights" not in r.stdout + r.stderr


CASES = {
    "missing train file": (lambda d, t: ["--train_file", str(t / "nope.jsonl")],
                           "train_file: file not found: {t}/nope.jsonl"),
    "val_size with eval_file": (lambda d, t: ["--val_size", "0.1", "--eval_file", d],
                                "val_size and eval_file both given"),
    "best model without eval data": (lambda d, t: ["--load_best_model_at_end", "true", "--eval_strategy", "steps",
                                                   "--save_strategy", "steps"],
                                     "load_best_model_at_end needs evaluation data"),
    "unknown option": (lambda d, t: ["--learning_rat", "1e-4"], "unknown option '--learning_rat'"),
    "bad finetuning type": (lambda d, t: ["--finetuning_type", "qlora"], "finetuning_type: unknown value 'qlora'"),
    "negative padding multiple": (lambda d, t: ["--pad_tokens_to_multiple_of", "-8"],
                                  "pad_tokens_to_multiple_of: -8 must be >= 0"),
    "zero loss chunk": (lambda d, t: ["--loss_chunk_size", "0"], "loss_chunk_size: 0 must be >= 1"),
    "template without its tokens": (lambda d, t: ["--template", "chatml"],
                                    "end-of-turn marker '<|im_end|>' is not a single token"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistakes_fail_before_the_model_loads(case, tmp_path, poisoned_model, data_file, tripwire, capsys):
    extra, expected = CASES[case]
    argv = _argv(poisoned_model, data_file, str(tmp_path / "out"), *extra(data_file, tmp_path))
    started = time.monotonic()
    assert run_inprocess(argv) == 2
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\n{case}: exit 2 after {seconds:.2f} s in-process")
    assert err.startswith("sftlab train: error: ") and err.count("\n") == 1, err
    assert expected.format(t=tmp_path) in err


def test_bad_row_is_named_before_the_model_loads(tmp_path, poisoned_model, tripwire, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e", "output": None}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert run_inprocess(_argv(poisoned_model, str(data), str(tmp_path / "out"),
                               "--data_cache_dir", str(tmp_path / "cache"))) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 3, field 'output': missing (or null)" in err
