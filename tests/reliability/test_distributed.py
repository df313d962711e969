"""Data-parallel training on CPU (gloo) with 2 processes, launched exactly as a user would: `torchrun
--nproc_per_node 2 -m sftlab train ...` and `accelerate launch --multi_gpu --num_processes 2 -m sftlab train ...`.

2 processes x 2 rows per step must train exactly like 1 process x 4 rows: the distributed sampler gives rank r the
r-th half of each global batch of the same shuffled order, and the loss is divided by the trained-token count of the
whole step across ranks and multiplied by the world size (DDP averages gradients), so losses, gradient norms and
weights agree up to float summation order. Tokenization happens once, on rank 0; rank 1 reads the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import os
from pathlib import Path


from tests.reliability.conftest import (
    MAX_STEPS, REPO, SAVE_STEPS, child_env, log_records, max_abs_diff, train_argv, weights,
)

# Loaded by every Python process started with this directory on PYTHONPATH (torchrun's agent too); it records, per
# rank, each call of tokenize_files and of stream_rows (reading the data files, i.e. really tokenizing).
PROBE = r'''
import os, sys
if os.environ.get("SFTLAB_PROBE_DIR"):
    import importlib.abc, importlib.util

    def _record(what):
        path = os.path.join(os.environ["SFTLAB_PROBE_DIR"], f"{what}.rank{os.environ.get('RANK', '-')}.{os.getpid()}")
        with open(path, "a") as fh:
            fh.write("x\n")

    def _patch(mod):
        stream_rows, tokenize_files = mod.stream_rows, mod.tokenize_files
        def probe_stream_rows(*a, **k):
            _record("stream_rows")
            return stream_rows(*a, **k)
        def probe_tokenize_files(*a, **k):
            _record("tokenize_files")
            return tokenize_files(*a, **k)
        mod.stream_rows, mod.tokenize_files = probe_stream_rows, probe_tokenize_files

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "sftlab.data.dataset":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                _patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


def _launch(cmd: list[str], probe_dir: Path, tmp_path: Path) -> str:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(PROBE)
    # The probe first, then this checkout's source when the caller put it on the path (else the installed sftlab).
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = child_env(PYTHONPATH=path, SFTLAB_PROBE_DIR=str(probe_dir))
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout + r.stderr


def _calls(probe_dir: Path, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in probe_dir.glob(f"{what}.rank*"):
        rank = p.name.split(".")[1]
        out[rank] = out.get(rank, 0) + p.read_text().count("x")
    return out


def _compare_with_one_process(out: Path, ref: str, label: str) -> None:
    """Per-step loss and gradient norm, and the final weights, against the 1-process run."""
    one = {r["step"]: r for r in log_records(ref) if "loss" in r}
    two = {r["step"]: r for r in log_records(out) if "loss" in r}
    assert sorted(two) == list(range(1, MAX_STEPS + 1))
    dloss = max(abs(one[s]["loss"] - two[s]["loss"]) for s in one)
    dnorm = max(abs(one[s]["grad_norm"] - two[s]["grad_norm"]) / one[s]["grad_norm"] for s in one)
    dw = max_abs_diff(weights(out), weights(ref))
    print(f"\n{label}: max |loss diff| {dloss:.2e}, max rel grad-norm diff {dnorm:.2e}, max |weight diff| {dw:.2e}")
    assert dloss < 1e-5
    assert dnorm < 1e-5  # a gradient twice or half as large (wrong world-size scaling) would show here
    assert dw < 1e-5


def test_torchrun_then_accelerate_resume_match_one_process(tmp_path, model_dir, data_file, reference, capsys):
    ref = reference("full")  # 1 process x 4 rows per step
    out = tmp_path / "ddp"
    cache = tmp_path / "fresh-cache"  # empty: someone has to tokenize
    probe = tmp_path / "probe"
    probe.mkdir()
    argv = train_argv(model_dir, data_file, str(out), str(cache), per_device_train_batch_size=2)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    log = _launch([torchrun, "--nproc_per_node", "2", "-m", "sftlab", "train", *argv], probe, tmp_path)

    # Both ranks asked for the data; only rank 0 read and tokenized the files, rank 1 got the cache.
    assert _calls(probe, "tokenize_files") == {"rank0": 1, "rank1": 1}, log[-3000:]
    assert _calls(probe, "stream_rows") == {"rank0": 1}
    assert len(list(cache.iterdir())) == 1
    # One checkpoint directory for both ranks, with each rank's RNG state, and no staging directory left.
    ckpt = out / f"checkpoint-{SAVE_STEPS}"
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "optimizer.pt"} <= set(
        p.name for p in ckpt.iterdir())
    assert not list(out.glob("tmp-*"))
    with capsys.disabled():
        _compare_with_one_process(out, ref, "torchrun 2x2 vs 1x4")

    # accelerate launch, resuming the 2-process run as if it had been killed right after checkpoint-SAVE_STEPS.
    for p in out.iterdir():
        if p.name.startswith("checkpoint-") and p.name != ckpt.name:
            shutil.rmtree(p)
        elif p.name not in (ckpt.name, "trainer_log.jsonl"):
            (shutil.rmtree if p.is_dir() else Path.unlink)(p)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    log = _launch([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sftlab", "train", *argv], probe,
                  tmp_path)
    assert f"resuming from {ckpt}" in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    with capsys.disabled():
        _compare_with_one_process(out, ref, "accelerate launch 2x2 (resumed at step 4) vs 1x4")


def test_torchrun_streaming_two_ranks_match_one_process(tmp_path, model_dir, data_file, capsys):
    """`streaming: true` shards rows by rank itself (its DataLoader is not wrapped by accelerate): rank r reads rows
    i % 2 == r, so 2 ranks x 2 rows per step see the rows 1 process x 4 rows sees, in the same steps."""
    from tests.reliability.conftest import run_inprocess

    one = tmp_path / "one"
    assert run_inprocess(train_argv(model_dir, data_file, str(one), str(tmp_path / "c1"), streaming="true")) == 0
    out = tmp_path / "two"
    argv = train_argv(model_dir, data_file, str(out), str(tmp_path / "c2"), streaming="true",
                      per_device_train_batch_size=2)
    probe = tmp_path / "probe"
    probe.mkdir()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    log = _launch([torchrun, "--nproc_per_node", "2", "-m", "sftlab", "train", *argv], probe, tmp_path)
    assert "[train, streamed] rows read" in log
    # Nothing was tokenized ahead, and each rank recorded its own stream position in the checkpoint.
    assert _calls(probe, "tokenize_files") == {} and not (tmp_path / "c2").exists()
    assert {"stream_state_0.json", "stream_state_1.json"} <= {p.name for p in (out / f"checkpoint-{SAVE_STEPS}").iterdir()}
    with capsys.disabled():
        _compare_with_one_process(out, str(one), "torchrun streaming 2x2 vs 1x4")


def _scores(path: Path) -> dict:
    """A results file without its timings (which no two runs share)."""
    return {k: v for k, v in json.loads(path.read_text()).items()
            if not any(t in k for t in ("runtime", "per_second", "_time"))}


def test_torchrun_eval_and_predict_count_each_row_once(tmp_path, reference, capsys):
    """7 eval rows, 2 per batch, 2 ranks: accelerate gives rank 1 a last batch of row 6 and a repeat of row 0 so
    both ranks run 2 batches. Loss, perplexity, accuracy and trained tokens must be those of the 1-process run over
    the 7 rows, and each row is generated and written once."""
    from sftlab.cli import main

    model = reference("full")  # trained 10 steps: next-token accuracy is not 0
    rows = tmp_path / "eval7.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Say number {i} twice", "output": f"{i} {i}" + " more" * i})
                            + "\n" for i in range(7)))

    def argv(out: str) -> list[str]:
        return [model, "--eval_file", str(rows), "--test_file", str(rows), "--predict_with_generate", "true",
                "--per_device_eval_batch_size", "2", "--max_new_tokens", "4", "--bf16", "false",
                "--output_dir", out, "--data_cache_dir", str(tmp_path / f"cache-{Path(out).name}")]

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["predict", *argv(str(one))]) == 0
    probe = tmp_path / "probe"
    probe.mkdir()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    _launch([torchrun, "--nproc_per_node", "2", "-m", "sftlab", "predict", *argv(str(two))], probe, tmp_path)

    ref, got = _scores(one / "eval_results.json"), _scores(two / "eval_results.json")
    with capsys.disabled():
        print(f"\neval 1 process: {ref}\neval 2 ranks:   {got}")
    assert sorted(got) == sorted(ref)
    assert {"eval_loss", "eval_perplexity", "eval_accuracy", "eval_trained_tokens", "eval_rouge-l"} <= set(ref)
    assert 0 < ref["eval_accuracy"] < 1
    assert got["eval_trained_tokens"] == ref["eval_trained_tokens"]
    for k, v in ref.items():
        assert abs(got[k] - v) <= 1e-6 * max(1.0, abs(v)), (k, got[k], v)
    assert _scores(two / "predict_results.json") == _scores(one / "predict_results.json")
    for name in ("generated_predictions.jsonl", "eval_predictions.jsonl"):
        lines = (two / name).read_text().splitlines()
        assert len(lines) == 7 and lines == (one / name).read_text().splitlines(), name
