"""Sharded training (FSDP2) on 2 CPU ranks (gloo), switched on as Trainer users switch it on: `torchrun ... -m sftlab
train ... --fsdp full_shard --fsdp_config examples/distributed/fsdp_config.json`.

Each run is compared with an independent 1-process run of the same global batch (4 rows per step): FSDP gathers
every layer's weights for its forward and backward and reduce-scatters the gradients, so up to float summation order
the steps are those of one process. Also checked: each rank holds half the parameters and half of AdamW's state,
checkpoints are distributed checkpoints (one shard file per rank) published atomically, a SIGKILLed run resumes to
the same weights, a simulated two-node launch trains like one process, and a rank that fails stops every rank."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.reliability.conftest import (
    MAX_STEPS, REPO, SAVE_STEPS, child_env, log_records, max_abs_diff, run_inprocess, train_argv, weights,
)

FSDP_CONFIG = str(REPO / "examples" / "distributed" / "fsdp_config.json")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TOLERANCE = 1e-5  # fp32; measured differences are ~3e-8 (summation order of the reduce-scatter)

# Loaded by every Python process started with SFTLAB_TEST_SITE on PYTHONPATH: when SFTLAB_FAIL_RANK names this
# process's rank, its SFTTrainer.training_step raises at step SFTLAB_FAIL_STEP (an exception injected on one rank).
FAIL_SITE = r'''
import os, sys
if os.environ.get("SFTLAB_FAIL_RANK") == os.environ.get("RANK", "-"):
    import importlib.abc, importlib.util

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "sftlab.train.trainer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                step = module.SFTTrainer.training_step

                def failing_step(self, *a, **k):
                    if self.state.global_step + 1 == int(os.environ["SFTLAB_FAIL_STEP"]):
                        raise RuntimeError(f"injected failure on rank {os.environ['RANK']}")
                    return step(self, *a, **k)

                module.SFTTrainer.training_step = failing_step
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


def fsdp_argv(model_dir: str, data_file: str, out: Path, cache: str, **extra) -> list[str]:
    """2 ranks x 2 rows = the reference's 1 process x 4 rows per step."""
    return ["-m", "sftlab", "train",
            *train_argv(model_dir, data_file, str(out), cache, per_device_train_batch_size=2, **extra),
            "--fsdp", "full_shard", "--fsdp_config", FSDP_CONFIG]


def torchrun(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([TORCHRUN, *args], cwd=str(REPO), env=child_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"the launch hung:\n{output[-5000:]}")
    assert proc.returncode == 0, output[-6000:]
    return output


def held_bytes(output: str) -> dict[int, tuple[int, int]]:
    """rank -> (parameter bytes, optimizer-state bytes), from the lines each rank prints after its first step."""
    found = re.findall(r"\[sftlab\] rank (\d+) holds (\d+) bytes of parameters and (\d+) bytes of optimizer state",
                       output)
    return {int(rank): (int(p), int(s)) for rank, p, s in found}


def check_like_one_process(out: Path, ref: str, label: str) -> float:
    one = {r["step"]: r["loss"] for r in log_records(ref) if "loss" in r}
    two = {r["step"]: r["loss"] for r in log_records(out) if "loss" in r}
    assert sorted(two) == list(range(1, MAX_STEPS + 1))
    dloss = max(abs(one[s] - two[s]) for s in one)
    dw = max_abs_diff(weights(out), weights(ref))
    print(f"\n{label}: max |loss diff| {dloss:.2e}, max |weight diff| {dw:.2e}")
    assert dloss < TOLERANCE and dw < TOLERANCE
    return dw


def check_halved(output: str, model) -> None:
    """Each rank holds half of the parameters and of AdamW's two moments (a 1-process run holds all of them)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    held = held_bytes(output)
    assert sorted(held) == [0, 1], output[-3000:]
    for rank, (p, s) in held.items():
        print(f"rank {rank}: {p} of {params} parameter bytes, {s} bytes of optimizer state "
              f"(one process: {2 * trainable} + step counters)")
        assert abs(p - params / 2) <= 0.01 * params
        assert abs(s - trainable) <= 0.01 * trainable + 1024  # exp_avg + exp_avg_sq, halved; plus step scalars


def test_fsdp_full_finetuning_killed_and_rerun_matches_one_process(tmp_path, model_dir, data_file, cache_dir,
                                                                   reference, capsys):
    """Full fine-tuning, 2 ranks: SIGKILL of the launcher after the first checkpoint, the same command again, and
    the result is the 1-process run's; checkpoints are distributed checkpoints; the output loads in transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    args = ["--nproc_per_node", "2", *fsdp_argv(model_dir, data_file, out, cache_dir)]
    proc = torchrun(args)
    ckpt = out / f"checkpoint-{SAVE_STEPS}"
    deadline = time.monotonic() + 300
    while not (ckpt / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.communicate()[0][-5000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)  # the launcher only: its workers must not train on without it
    proc.communicate()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "workers outlived their launcher"
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())

    output = finish(torchrun(args))
    assert f"resuming from {out / f'checkpoint-{newest}'}" in output
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    ref = reference("full")
    with capsys.disabled():
        check_like_one_process(out, ref, f"FSDP2 2x2 killed after checkpoint-{newest} and rerun vs 1x4, full FT")
        check_halved(output, AutoModelForCausalLM.from_pretrained(model_dir))
    # Checkpoints are distributed checkpoints: a shard file per rank for the model and for the optimizer; nothing
    # half-written is left.
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert (ckpt / part / ".metadata").is_file()
    assert not (ckpt / "model.safetensors").exists() and not list(out.glob("tmp-*"))
    # The final output is an ordinary transformers directory: plain from_pretrained, the reference's logits.
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    ours = AutoModelForCausalLM.from_pretrained(str(out))
    theirs = AutoModelForCausalLM.from_pretrained(ref)
    assert float((ours(ids).logits - theirs(ids).logits).abs().max()) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_launch_lora_matches_one_process(tmp_path, model_dir, data_file, cache_dir, capsys):
    """Two torchrun launchers as on two machines (c10d rendezvous on localhost), one rank each, LoRA with FSDP2
    across them; the adapter equals a 1-process run's and loads in plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # No LoRA dropout: its random masks are drawn per rank, so 2 ranks cannot draw what 1 process draws.
    lora = dict(finetuning_type="lora", lora_dropout=0.0)
    ref = tmp_path / "one-process"
    assert run_inprocess(train_argv(model_dir, data_file, str(ref), cache_dir, **lora)) == 0
    out = tmp_path / "two-nodes"
    port = _free_port()
    nodes = [torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sftlab-test",
                       *fsdp_argv(model_dir, data_file, out, cache_dir, **lora)]) for rank in (0, 1)]
    output = "".join(finish(p) for p in nodes)
    with capsys.disabled():
        check_like_one_process(out, str(ref), "two 1-rank nodes (FSDP2) vs 1x4, LoRA")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out),
                                          is_trainable=True)
        check_halved(output, model)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path, model_dir, data_file, cache_dir):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAIL_SITE)
    out = tmp_path / "fails"
    proc = torchrun(["--nproc_per_node", "2", *fsdp_argv(model_dir, data_file, out, cache_dir)],
                    PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                    SFTLAB_FAIL_RANK="1", SFTLAB_FAIL_STEP="3")
    started = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("rank 0 hung after rank 1 failed:\n" + proc.communicate()[0][-5000:])
    print(f"\nlauncher exited {proc.returncode} after {time.monotonic() - started:.1f} s")
    assert proc.returncode != 0
    assert "injected failure on rank 1" in output
    assert "rank      : 1" in output  # torchrun names the failing rank as the root cause
    assert not (out / "model.safetensors").exists()
