"""What a run leaves behind besides weights: results JSON, the loss plot and the model card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sftlab.files import write_atomically


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def read_log(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def _smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction, so early points are not dragged towards zero. The default
    weight grows with the number of points: a short run is barely smoothed, a long one up to 0.9."""
    if weight is None:
        weight = min(0.9, max(0.0, 1.0 - 5.0 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(output_dir: str | Path) -> Path | None:
    """training_loss.png: raw and smoothed training loss, and eval loss when there is one."""
    log = read_log(output_dir)
    train = [(r["step"], r["loss"]) for r in log if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in log if r.get("eval_loss") is not None]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train loss (raw)")
        ax.plot(steps, _smooth(list(losses)), color="#08519c", linewidth=2, label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#d94801", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("sftlab training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / "training_loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


ESTIMATE_FILE = "sftlab_estimate.json"  # written by `sftlab data report` or, failing that, before training


def _closeness(estimate: float | None, measured: float | None) -> str:
    if not estimate or not measured:
        return "-"
    return f"{(estimate - measured) / measured:+.0%}"


def estimate_vs_run(output_dir: Path, metrics: dict[str, Any]) -> list[str]:
    """Model-card lines comparing the recorded cost estimate with what this run measured."""
    path = Path(output_dir) / ESTIMATE_FILE
    if not path.is_file():
        return []
    try:
        est = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    peak_mb = metrics.get("train_peak_rss_mb")
    est_mb = est["peak_memory_bytes"] / 2**20 if est.get("peak_memory_bytes") else None
    runtime = metrics.get("train_runtime")
    rows = [("peak memory (MiB, RSS)", est_mb, peak_mb), ("train_runtime (s)", est.get("train_seconds"), runtime)]
    lines = ["## Estimate vs this run", "", f"Estimated by {est.get('source', 'sftlab')} before training.", "",
             "| | estimate | measured | estimate off by |", "| --- | --- | --- | --- |"]
    for name, e, m in rows:
        lines.append(f"| {name} | {'-' if e is None else round(e, 1)} | {'-' if m is None else round(m, 1)} | "
                     f"{_closeness(e, m)} |")
    return lines + [""]


def write_model_card(output_dir: str | Path, cfg, base_model: str, template_name: str, metrics: dict[str, Any],
                     data_summaries: list[str]) -> Path:
    """README.md: what was trained on what, how, with which result, and how to load it without sftlab."""
    out = Path(output_dir)
    ft = cfg.finetuning.finetuning_type
    t = cfg.training
    hp = {
        "finetuning_type": ft,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type),
        "warmup_steps": t.warmup_steps,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "cutoff_len": cfg.data.cutoff_len,
        "packing": cfg.data.packing,
        "bf16": t.bf16,
        "seed": t.seed,
    }
    if ft == "lora":
        hp.update(lora_rank=cfg.finetuning.lora_rank, lora_alpha=cfg.finetuning.lora_alpha or 2 * cfg.finetuning.lora_rank,
                  lora_dropout=cfg.finetuning.lora_dropout, lora_target=",".join(cfg.finetuning.lora_target))
    lines = [
        "---",
        "library_name: " + ("peft" if ft == "lora" else "transformers"),
        f"base_model: {base_model}",
        "tags: [sftlab, sft]",
        "---",
        "",
        f"# {out.name}",
        "",
        f"Fine-tuned with sftlab from `{cfg.model.model_name_or_path}` "
        f"(weights loaded from `{base_model}`).",
        "",
        "## Data",
        f"- train: {', '.join(cfg.data.train_file or []) or '-'}",
        f"- eval: {', '.join(cfg.data.eval_file or []) or ('split off train, val_size=' + str(cfg.data.val_size) if cfg.data.val_size else '-')}",
        f"- template: `{template_name}` (saved as `sftlab_template.json`); trained tokens: `train_on={cfg.data.train_on}`",
        "",
        *[f"    {s}" for s in data_summaries],
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "| --- | --- |",
        *[f"| {k} | {_fmt(v)} |" for k, v in hp.items()],
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))],
        "",
    ]
    lines += estimate_vs_run(out, metrics)
    if (out / "training_loss.png").is_file():
        lines += ["![training loss](training_loss.png)", ""]
    lines += ["## Use it", "", "```python"]
    if ft == "lora":
        lines += [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{out}")  # base: {base_model}',
            f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
            "model = model.merge_and_unload()  # optional: a plain transformers model",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{out}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
        ]
    lines += [
        "```",
        "",
        "With sftlab, the saved template is used automatically:",
        "",
        "```bash",
        f"sftlab chat --model {out}",
        f"sftlab predict {out} --test_file data.jsonl",
        *([f"sftlab export --model {out} --out {out}-merged"] if ft == "lora" else []),
        "```",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
