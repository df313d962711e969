"""benchmarks/gpu_check.py must not rot while no GPU is lent: its --dry-run runs the same code on CPU with tiny
sizes (a random 2-layer Llama, sequence length 64), and the JSON it writes has every part, with the correctness
checks passing."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_part(tmp_path, capsys):
    # In this process (the script's dry run runs its parts in-process anyway): no second start-up of torch,
    # transformers and sftlab. The script sets one torch thread for its dry run; the suite's setting is restored.
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    threads = torch.get_num_threads()
    try:
        rc = gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work"), "--budget-s", "900"])
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert rc == 0, stdout[-3000:]
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
    assert "| tiny-random | 64 | lora | sftlab |" in stdout
