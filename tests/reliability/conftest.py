"""Shared pieces of the reliability tests: a tiny Llama with a ~860-token SentencePiece-style tokenizer (so a
training step takes milliseconds and a checkpoint ~1.5 MB), an alpaca data file, the `sftlab train` command line,
and uninterrupted reference runs that interrupted/distributed runs are compared against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 10
SAVE_STEPS = 4


def child_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m sftlab` subprocesses: offline, one thread each (the machine has 2 cores)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process runs use one intra-op thread, like the subprocesses, so the machine is not oversubscribed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    from tests.helpers import build_sp_tokenizer, make_tiny_model_dir

    root = tmp_path_factory.mktemp("rel-model")
    build_sp_tokenizer(root / "tok")
    return make_tiny_model_dir(root / "tiny", str(root / "tok"))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rel-data") / "train.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(48):
            fh.write(json.dumps({"instruction": f"Say number {i} twice", "output": f"{i} {i}, and {i * 7} more"}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("rel-cache"))


def train_argv(model: str, data: str, out: str, cache: str, *, finetuning_type: str = "full", **extra) -> list[str]:
    """The `sftlab train` flags shared by every run that is compared with another (fp32, fixed seed)."""
    argv = ["--model_name_or_path", model, "--template", "alpaca", "--train_file", data, "--output_dir", out,
            "--data_cache_dir", cache, "--max_steps", str(MAX_STEPS), "--save_steps", str(SAVE_STEPS),
            "--logging_steps", "1", "--per_device_train_batch_size", "4", "--bf16", "false",
            "--learning_rate", "1e-3", "--plot_loss", "false", "--seed", "7", "--finetuning_type", finetuning_type]
    if finetuning_type == "lora":
        # Dropout makes the result depend on the restored RNG state, not only on data order and optimizer.
        argv += ["--lora_rank", "4", "--lora_dropout", "0.2"]
    for k, v in extra.items():
        argv += [f"--{k}", str(v)]
    return argv


def run_inprocess(argv: list[str]) -> int:
    """`sftlab train ARGV` through the CLI's own entry function, in this process."""
    from sftlab.cli import main

    return main(["train", *argv])


def spawn(argv: list[str], **env: str) -> subprocess.Popen:
    """`python -m sftlab train ARGV` as a child process (stdout and stderr to one pipe)."""
    return subprocess.Popen([sys.executable, "-m", "sftlab", "train", *argv], cwd=str(REPO), env=child_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def weights(out_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    out = Path(out_dir)
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (out / name).is_file():
            return load_file(str(out / name))
    raise AssertionError(f"no weights in {out}: {sorted(os.listdir(out))}")


def max_abs_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), "different tensors"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def log_records(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "trainer_log.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def step_losses(out_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log_records(out_dir) if "loss" in r}


@pytest.fixture(scope="session")
def reference(tmp_path_factory, model_dir, data_file, cache_dir):
    """Uninterrupted in-process runs, one per fine-tuning type, computed on first use."""
    done: dict[str, str] = {}

    def get(finetuning_type: str) -> str:
        if finetuning_type not in done:
            out = str(tmp_path_factory.mktemp(f"ref-{finetuning_type}"))
            assert run_inprocess(train_argv(model_dir, data_file, out, cache_dir, finetuning_type=finetuning_type)) == 0
            done[finetuning_type] = out
        return done[finetuning_type]

    return get
