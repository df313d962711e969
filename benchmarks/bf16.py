"""bf16 autocast vs fp32 for sftlab's default LoRA training on this machine, side by side in one run.

Runs `sftlab train` on the demo data twice (same steps, seed and data), once with `--bf16 true` and once with
`--bf16 false`, each in its own process, and prints non-pad and trained tokens/s and their ratio. Results go to
benchmarks/results/bf16.json."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(bf16: bool, steps: int, finetuning_type: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"{finetuning_type}-bf16-{bf16}")
    cmd = [sys.executable, "-m", "sftlab", "train", os.path.join(ROOT, "examples/demo/demo.yaml"),
           "--output_dir", out, "--max_steps", str(steps), "--bf16", str(bf16).lower(),
           "--finetuning_type", finetuning_type, "--do_eval", "false", "--do_predict", "false",
           "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", str(steps), "--plot_loss", "false"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "train_results.json")) as fh:
        return json.load(fh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default="lora,full")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for mode in args.modes.split(","):
            res = {bf16: run(bf16, args.steps, mode, workdir) for bf16 in (False, True)}
            row = {
                "finetuning_type": mode,
                "fp32_tokens_per_second": res[False]["train_tokens_per_second"],
                "bf16_tokens_per_second": res[True]["train_tokens_per_second"],
                "fp32_train_loss": res[False]["train_loss"],
                "bf16_train_loss": res[True]["train_loss"],
            }
            row["speedup"] = round(row["bf16_tokens_per_second"] / row["fp32_tokens_per_second"], 2)
            rows.append(row)
            print(f"{mode}: fp32 {row['fp32_tokens_per_second']:.0f} tok/s, bf16 {row['bf16_tokens_per_second']:.0f} "
                  f"tok/s -> bf16 speed-up {row['speedup']:.2f}x (train loss {row['fp32_train_loss']:.4f} vs "
                  f"{row['bf16_train_loss']:.4f})", flush=True)
    os.makedirs(os.path.join(ROOT, "benchmarks/results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks/results/bf16.json"), "w") as fh:
        json.dump({"steps": args.steps, "load_average": os.getloadavg(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
