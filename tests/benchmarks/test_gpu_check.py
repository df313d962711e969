"""benchmarks/gpu_check.py must not rot while no GPU is lent: its --dry-run runs the same code on CPU with tiny
sizes (a random 2-layer Llama, sequence length 64), and the JSON it writes has every part, with the correctness
checks passing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                        "--workdir", str(tmp_path / "work"), "--budget-s", "900"],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["ok"] and report["skipped"] == []
    checks = {c["check"]: c for c in report["correctness"]}
    packing = checks["packing_and_bf16"]
    assert packing["attention"] == "sdpa" and packing["packed_ok"] and packing["bf16_ok"]
    assert packing["packed_vs_unpacked_rel_diff"] < 1e-4 and packing["trained_tokens"] > 0
    accumulation = checks["batch_x_accumulation"]
    assert accumulation["ok"] and accumulation["max_abs_update"] > 0
    runs = {(t["library"], t["mode"]): t for t in report["throughput"]}
    assert set(runs) == {(lib, mode) for lib in ("sftlab", "trl") for mode in ("lora", "full")}
    for t in runs.values():
        assert t["timed_steps"] == 1 and t["tokens"] > 0 and t["tokens_per_second"] > 0
        assert t["model_flops_per_second"] > 0
    assert "| tiny-random | 64 | lora | sftlab |" in r.stdout
