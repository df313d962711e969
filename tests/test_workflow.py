"""The training workflow through the real `sftlab` entry point, on a tiny random model with the real tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftlab.cli import main


def write_data(tmp_path: Path, n: int = 24) -> tuple[str, str]:
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"The sum is {2 * i + 1}."} for i in range(n)]
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows[: n - 6]) + "\n")
    ev.write_text("\n".join(json.dumps(r) for r in rows[n - 6:]) + "\n")
    return str(train), str(ev)


def base_args(model_dir, train, out, *extra):
    return ["train", "--model_name_or_path", model_dir, "--train_file", train, "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1",
            "--bf16", "false", "--learning_rate", "1e-2", "--warmup_steps", "2", "--lr_scheduler_type", "linear",
            "--data_cache_dir", str(Path(out).parent / "cache"), *extra]


def read_log(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One LoRA run of 6 steps with evaluation, shared by the tests below."""
    from tests.helpers import make_tiny_model_dir
    from sftlab.models.bundled import bundled_tokenizer_dir

    tmp = tmp_path_factory.mktemp("lora")
    model_dir = make_tiny_model_dir(tmp / "tiny", str(bundled_tokenizer_dir()))
    train, ev = write_data(tmp)
    out = tmp / "out"
    rc = main(base_args(model_dir, train, out, "--eval_file", ev, "--eval_strategy", "steps", "--eval_steps", "3"))
    assert rc == 0
    return dict(model_dir=model_dir, train=train, eval=ev, out=out, tmp=tmp)


def test_output_files_present_and_sane(lora_run):
    out = lora_run["out"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "sftlab_template.json",
                 "sftlab_config.yaml", "train_results.json", "trainer_log.jsonl", "training_loss.png", "README.md",
                 "eval_results.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()  # LoRA saves the adapter only
    res = json.loads((out / "train_results.json").read_text())
    for k in ("train_loss", "train_runtime", "train_samples_per_second", "train_tokens_per_second",
              "train_target_tokens_per_second"):
        assert k in res and res[k] > 0, k
    # 6 steps x 2 rows: non-pad tokens >= trained tokens, both counted.
    assert res["train_tokens"] > res["train_trained_tokens"] > 0
    log = read_log(out)
    train_lines = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    for r in train_lines:
        for k in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "elapsed", "remaining"):
            assert k in r and r[k] is not None, k
        assert r["loss"] > 0 and r["tokens_per_second"] > 0
    # Warm-up then linear decay (the lr used at each step): 0, 0.005, peak 0.01, then down by 0.0025 a step.
    lrs = [r["learning_rate"] for r in train_lines]
    assert lrs == pytest.approx([0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025])
    evals = [r for r in log if "eval_loss" in r]
    assert len(evals) >= 2 and all(r["eval_loss"] > 0 for r in evals)
    assert (out / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "train_on=completion" in card and "AutoPeftModelForCausalLM" in card
    assert (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoint-3" / "model.safetensors").exists()
    assert (out / "checkpoint-3" / "sftlab_template.json").is_file()  # the template travels with checkpoints
    assert (out / "checkpoint-3" / "sftlab_config.yaml").is_file()
    # The saved config reruns the job: it parses back to the same options.
    from sftlab.config import parse_config

    cfg = parse_config([str(out / "sftlab_config.yaml")])
    assert cfg.training.max_steps == 6 and cfg.finetuning.finetuning_type == "lora"


def test_resume_continues_at_the_right_step_with_the_same_lr(lora_run):
    tmp, out = lora_run["tmp"], lora_run["out"]
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    rc = main(base_args(lora_run["model_dir"], lora_run["train"], resumed, "--eval_file", lora_run["eval"],
                        "--eval_strategy", "steps", "--eval_steps", "3"))
    assert rc == 0
    full = {r["step"]: r for r in read_log(out) if "loss" in r}
    again = {r["step"]: r for r in read_log(resumed) if "loss" in r}
    assert sorted(again) == [4, 5, 6]  # picked up the newest checkpoint automatically
    for s in (4, 5, 6):
        assert again[s]["learning_rate"] == pytest.approx(full[s]["learning_rate"], rel=1e-9)
        assert again[s]["loss"] == pytest.approx(full[s]["loss"], rel=1e-4)


def test_lora_changes_adapter_not_base_and_merge_is_exact(lora_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = lora_run["out"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: training moved it
    base = AutoModelForCausalLM.from_pretrained(lora_run["model_dir"])
    original = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, str(out))
    for k, v in peft_model.get_base_model().state_dict().items():
        if "lora_" in k:
            continue
        key = k.replace("base_layer.", "")
        assert torch.equal(v, original[key]), k
    ids = torch.tensor([[1, 5, 17, 300, 2000, 44, 9]])
    with torch.no_grad():
        adapted = peft_model(ids).logits
        assert not torch.allclose(adapted, AutoModelForCausalLM.from_pretrained(lora_run["model_dir"])(ids).logits)
    # sftlab export merges into a plain transformers model with the same logits.
    merged_dir = tmp_path / "merged"
    assert main(["export", "--model", str(out), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert (merged_dir / "sftlab_template.json").is_file()


def test_full_finetuning_changes_all_weights(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    train, _ = write_data(tmp_path)
    out = tmp_path / "full"
    args = base_args(tiny_model_dir, train, out, "--finetuning_type", "full")
    args[args.index("--max_steps") + 1] = "2"
    assert main(args) == 0
    after = load_file(str(out / "model.safetensors"))
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)


def test_freeze_trains_only_the_last_layers(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    train, _ = write_data(tmp_path)
    out = tmp_path / "freeze"
    args = base_args(tiny_model_dir, train, out, "--finetuning_type", "freeze", "--freeze_trainable_layers", "1")
    args[args.index("--max_steps") + 1] = "2"
    assert main(args) == 0
    after = load_file(str(out / "model.safetensors"))
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


def test_unknown_flag_and_unwritable_output_dir_fail_fast(tmp_path, tiny_model_dir, capsys):
    train, _ = write_data(tmp_path)
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--train_file", train, "--lerning_rate", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown option '--lerning_rate'" in err and "did you mean '--learning_rate'" in err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    t0 = time.time()
    # The model path does not exist: a failure about output_dir proves the check ran before any model loading.
    rc = main(["train", "--model_name_or_path", str(tmp_path / "no-model"), "--train_file", train,
               "--output_dir", str(blocker / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "output_dir: cannot write to" in err and time.time() - t0 < 10


def test_help_lists_every_argument_with_help_text():
    out = subprocess.run([sys.executable, "-m", "sftlab", "train", "-h"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("--train_on", "--cutoff_len", "--lora_rank", "--learning_rate", "--gradient_accumulation_steps",
                 "--full_dataset_index_path", "--max_new_tokens"):
        assert name in out.stdout, name
    assert "Which tokens are trained" in out.stdout


def test_freeze_with_bf16_saves_frozen_layers_unchanged(tmp_path, tiny_model_dir):
    """bf16 autocast must not round the frozen layers that a freeze run writes back into model.safetensors."""
    from safetensors.torch import load_file

    train, _ = write_data(tmp_path)
    out = tmp_path / "freeze-bf16"
    args = base_args(tiny_model_dir, train, out, "--finetuning_type", "freeze", "--freeze_trainable_layers", "1")
    args[args.index("--max_steps") + 1] = "1"
    args[args.index("--bf16") + 1] = "true"
    assert main(args) == 0
    after = load_file(str(out / "model.safetensors"))
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    for k in before:
        if k.startswith("model.layers.0."):
            assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_gradient_checkpointing_changes_memory_not_the_losses(tmp_path, tiny_model_dir, finetuning_type):
    """With bf16 and the CPU fast paths (fused linears sharing cast inputs, fused norms, varlen attention), the
    recomputation of gradient checkpointing must give the same step losses as storing the activations."""
    train, _ = write_data(tmp_path)
    losses = {}
    for ckpt in ("false", "true"):
        out = tmp_path / f"{finetuning_type}-{ckpt}"
        args = base_args(tiny_model_dir, train, out, "--finetuning_type", finetuning_type,
                         "--gradient_checkpointing", ckpt, "--save_strategy", "no")
        args[args.index("--bf16") + 1] = "true"
        args[args.index("--max_steps") + 1] = "3"
        assert main(args) == 0
        losses[ckpt] = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-3)
