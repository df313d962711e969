"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks against one process, with sftlab's own command line.

DeepSpeed is not a dependency of sftlab. This script makes (once) a virtual environment of its own,
benchmarks/.venv-deepspeed (gitignored), that sees the shared environment's packages through a .pth file and adds
only DeepSpeed and the few packages it imports (pinned below, installed without their dependency tree, so torch
stays the local CPU build). Then, on the test suite's tiny Llama (2 layers, hidden 64, ~860-token tokenizer), fp32,
10 steps of 4 rows:

* one process, 4 rows per step (the reference);
* `torchrun --nproc_per_node 2 -m sftlab train ... --per_device_train_batch_size 2 --deepspeed ds_zero2.json`;
* the same with `ds_zero3.json` (the configs of examples/distributed/, as users run them).

Written to benchmarks/results/deepspeed_zero.{json,md}: the max |weight difference| of the final model and the max
|loss difference| per step against the reference, and what each rank holds of the optimizer state: the tensor bytes
in its `zero_pp_rank_R_mp_rank_00_optim_states.pt` of the last checkpoint (fp32 master partition + both Adam
moments) against the reference's `optimizer.pt` (both moments of every parameter, one process).

    python benchmarks/deepspeed_zero.py            # ~2-4 min once DeepSpeed's shm op is built (first use: +1-5 min)

DeepSpeed JIT-builds its shared-memory collective op with g++ on first use (~/.cache/torch_extensions); a run
killed during that build leaves a `lock` file there that makes the next run wait forever: delete it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = ["deepspeed==0.19.8", "hjson==3.1.0", "py-cpuinfo==9.0.0", "ninja==1.13.2", "msgpack==1.2.4",
             "einops==0.8.2"]
STEPS, ROWS_PER_STEP = 10, 4
STAGES = {"zero2": "ds_zero2.json", "zero3": "ds_zero3.json"}


# ---- environment ----------------------------------------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    """The DeepSpeed environment's python: a venv whose site-packages holds DeepSpeed and sees the shared ones."""
    python = venv / "bin" / "python"
    if python.exists() and _run_ok([str(python), "-c", "import deepspeed"]):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "shared-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip comes from the shared environment (through the .pth); the packages go into the venv's own site-packages.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", *DEEPSPEED],
                   check=True)
    return python


def _run_ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


# ---- the runs -------------------------------------------------------------------------------------------------
def make_inputs(workdir: Path) -> tuple[str, str]:
    """The test suite's tiny Llama and an alpaca file of 48 rows."""
    sys.path.insert(0, str(REPO))
    from tests.helpers import build_sp_tokenizer, make_tiny_model_dir

    build_sp_tokenizer(workdir / "tok")
    model = make_tiny_model_dir(workdir / "tiny", str(workdir / "tok"))
    data = workdir / "train.jsonl"
    with open(data, "w") as fh:
        for i in range(48):
            row = {"instruction": f"Say number {i} twice", "output": f"{i} {i}, and {i * 7} more"}
            fh.write(json.dumps(row) + "\n")
    return model, str(data)


def train_args(model: str, data: str, out: Path, cache: Path, batch: int) -> list[str]:
    return ["-m", "sftlab", "train", "--model_name_or_path", model, "--template", "alpaca", "--train_file", data,
            "--output_dir", str(out), "--data_cache_dir", str(cache), "--max_steps", str(STEPS),
            "--save_steps", str(STEPS), "--logging_steps", "1", "--per_device_train_batch_size", str(batch),
            "--bf16", "false", "--learning_rate", "1e-3", "--plot_loss", "false", "--seed", "7",
            "--finetuning_type", "full"]


def launch(cmd: list[str], timeout: float, out: Path, reuse: bool) -> float | None:
    """Runs one training command; with --reuse, a finished output of an earlier run is kept (wall time None)."""
    if reuse and (out / "model.safetensors").is_file() and (out / f"checkpoint-{STEPS}").is_dir():
        return None
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[deepspeed_zero] failed (exit {proc.returncode}): {' '.join(cmd)}")
    return time.time() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- what the runs left ---------------------------------------------------------------------------------------
def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) checkpoint object."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def optimizer_bytes(checkpoint: Path) -> dict[str, int]:
    """File -> tensor bytes of the optimizer state in a checkpoint (ZeRO: one file per rank)."""
    import torch

    files = sorted(checkpoint.rglob("*optim_states.pt")) or [checkpoint / "optimizer.pt"]
    return {str(f.relative_to(checkpoint)): tensor_bytes(torch.load(f, map_location="cpu", weights_only=False))
            for f in files}


def compare(out: Path, ref: Path) -> dict:
    from safetensors.torch import load_file

    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    # DeepSpeed's consolidated save writes the tied LM head as a tensor of its own; it must equal the embedding.
    extra = sorted(set(ours) - set(theirs))
    if extra == ["lm_head.weight"] and "model.embed_tokens.weight" in theirs:
        theirs = dict(theirs, **{"lm_head.weight": theirs["model.embed_tokens.weight"]})
    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"[deepspeed_zero] {out}: tensors {sorted(set(ours) ^ set(theirs))} differ from the reference")
    dw = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "trainer_log.jsonl").read_text().splitlines())
               if "loss" in r} for d in (out, ref)]
    if sorted(losses[0]) != list(range(1, STEPS + 1)):
        raise SystemExit(f"[deepspeed_zero] {out}: logged steps {sorted(losses[0])}")
    dl = max(abs(losses[0][s] - losses[1][s]) for s in losses[1])
    return dict(max_weight_diff=dw, max_loss_diff=dl, tied_head_saved_apart=extra == ["lm_head.weight"])


def parameter_bytes(out: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(out / "model.safetensors")).values())


def report(results: dict, meta: dict) -> str:
    ref = results["one_process"]
    one = sum(ref["optimizer_bytes"].values())
    lines = [f"DeepSpeed {meta['deepspeed']} ZeRO on 2 CPU ranks (gloo) against 1 process, sftlab's own command "
             f"line; tiny Llama ({ref['parameter_bytes']:,} bytes of fp32 parameters), full fine-tuning, fp32, "
             f"{STEPS} steps of {ROWS_PER_STEP} rows (2 ranks x 2 rows against 1 x 4), torch {meta['torch']}, "
             f"{meta['cpu']}, load average {meta['load_start']:.1f} at the start.", "",
             "| run | wall s | max weight diff | max loss diff | optimizer-state bytes per rank | of 1 process |",
             "|---|---:|---:|---:|---:|---:|",
             f"| 1 process x 4 rows | {_wall(ref)} | - | - | {one:,} | 1.00 |"]
    for stage in STAGES:
        r = results[stage]
        per_rank = list(r["optimizer_bytes"].values())
        lines.append(f"| {stage}, 2 ranks x 2 rows | {_wall(r)} | {r['max_weight_diff']:.1e} "
                     f"| {r['max_loss_diff']:.1e} | {' / '.join(f'{b:,}' for b in per_rank)} "
                     f"| {' / '.join(f'{b / one:.2f}' for b in per_rank)} |")
    lines += ["", "Optimizer-state bytes are the tensors in each rank's `zero_pp_rank_R_mp_rank_00_optim_states.pt` "
              "(ZeRO keeps an fp32 master partition besides Adam's two moments: 3 x parameters / 2 per rank) and "
              "in the 1-process run's `optimizer.pt` (2 x parameters)."]
    return "\n".join(lines) + "\n"


def _wall(r: dict) -> str:
    return "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", default=str(REPO / "benchmarks" / ".venv-deepspeed"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "deepspeed_zero"))
    p.add_argument("--reuse", action="store_true", help="keep finished runs found in --workdir")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (the first builds DeepSpeed's op)")
    a = p.parse_args()
    python = ensure_venv(Path(a.venv))
    if Path(sys.prefix).resolve() != Path(a.venv).resolve():
        # The rest runs in the DeepSpeed environment: its checkpoints unpickle DeepSpeed's classes.
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="sftlab-deepspeed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, data = (str(workdir / "tiny"), str(workdir / "train.jsonl")) if a.reuse and (workdir / "tiny").is_dir() \
        else make_inputs(workdir)
    load_start = os.getloadavg()[0]
    results: dict = {}
    ref = workdir / "one_process"
    wall = launch([str(python), *train_args(model, data, ref, workdir / "cache", ROWS_PER_STEP)], a.timeout, ref,
                  a.reuse)
    results["one_process"] = dict(wall_s=wall, optimizer_bytes=optimizer_bytes(ref / f"checkpoint-{STEPS}"),
                                  parameter_bytes=parameter_bytes(ref))
    print(f"[deepspeed_zero] one process: {wall} s", flush=True)
    for stage, config in STAGES.items():
        out = workdir / stage
        cmd = [str(python), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), *train_args(model, data, out, workdir / "cache", ROWS_PER_STEP // 2),
               "--deepspeed", str(REPO / "examples" / "distributed" / config)]
        wall = launch(cmd, a.timeout, out, a.reuse)
        results[stage] = dict(wall_s=wall, **compare(out, ref),
                              optimizer_bytes=optimizer_bytes(out / f"checkpoint-{STEPS}"))
        print(f"[deepspeed_zero] {stage}: {results[stage]}", flush=True)
    import deepspeed
    import torch

    meta = dict(deepspeed=deepspeed.__version__, torch=torch.__version__, steps=STEPS, rows_per_step=ROWS_PER_STEP,
                load_start=load_start, cpu=_cpu_name())
    md = report(results, meta)
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(md)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


if __name__ == "__main__":
    main()
