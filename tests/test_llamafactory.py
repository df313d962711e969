"""LLaMA-Factory configurations: its own example config and demo data train unchanged (but for the model path)
through the real entry point; its option names are translated, other stages refused, options meaningless here
listed in one warning line, and real typos still get did-you-mean."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.config import parse_config
from sftlab.errors import ConfigError

ASSETS = Path(__file__).parent / "assets" / "llamafactory"
EXAMPLE = "examples/train_lora/llama3_lora_sft.yaml"


@pytest.fixture()
def lf_root(tmp_path, monkeypatch):
    """A LLaMA-Factory checkout's layout (examples/, data/) as the working directory."""
    root = tmp_path / "LLaMA-Factory"
    shutil.copytree(ASSETS, root)
    monkeypatch.chdir(root)
    return root


def test_llamafactory_example_config_trains_unchanged(lf_root, tmp_path, capsys, smol_tokenizer_dir):
    from tests.helpers import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "tiny", smol_tokenizer_dir)
    before = hashlib.sha256((lf_root / EXAMPLE).read_bytes()).hexdigest()
    assert main(["train", EXAMPLE, "--model_name_or_path", model]) == 0
    err = capsys.readouterr().err
    assert "template 'llama3' (LLaMA-Factory): using the model tokenizer's own chat template" in err
    out_dir = lf_root / "saves/llama3-8b/lora/sft"
    assert (out_dir / "adapter_model.safetensors").is_file()
    saved = (out_dir / "sftlab_config.yaml").read_text()
    # identity (6 rows) + alpaca_en_demo (6 rows), 3 epochs of 12 rows at 1 x 8 per step: 2 steps an epoch.
    state = json.loads((out_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["num_train_epochs"] == 3
    assert "data/identity.json" in saved and "data/alpaca_en_demo.json" in saved
    assert hashlib.sha256((lf_root / EXAMPLE).read_bytes()).hexdigest() == before


def test_stage_sft_accepted_other_stages_refused(lf_root):
    cfg = parse_config(["--stage", "sft", "--dataset", "identity"])
    assert cfg.data.train_file == ["data/identity.json"]
    with pytest.raises(ConfigError, match="stage: 'dpo' is not supported; sftlab does supervised fine-tuning only"):
        parse_config(["--stage", "dpo", "--dataset", "identity"])


@pytest.mark.parametrize("flags,expected", [
    (["--train_on_prompt", "true"], {"train_on": "all"}),
    (["--mask_history", "true"], {"train_on": "last_turn"}),
    (["--train_on_prompt", "false", "--mask_history", "false"], {"train_on": "completion"}),
    (["--default_system", "Be brief."], {"system": "Be brief."}),
    (["--neat_packing", "true"], {"packing": True}),
    (["--template", "qwen"], {"template": "tokenizer"}),
    (["--template", "empty"], {"template": "plain"}),
    (["--template", "chatml"], {"template": "chatml"}),
    (["--tool_format", "qwen"], {"tool_format": "builtin"}),
])
def test_llamafactory_options_with_an_sftlab_meaning(flags, expected):
    cfg = parse_config(flags)
    assert {k: getattr(cfg.data, k) for k in expected} == expected


def test_conflicting_translations_are_errors():
    with pytest.raises(ConfigError, match="train_on_prompt and mask_history are both true"):
        parse_config(["--train_on_prompt", "true", "--mask_history", "true"])
    with pytest.raises(ConfigError, match="mask_history: true conflicts with train_on: all"):
        parse_config(["--mask_history", "true", "--train_on", "all"])


def test_meaningless_options_one_warning_line_and_typos_still_fail(tmp_path, capsys):
    cfg_file = tmp_path / "lf.yaml"
    cfg_file.write_text("stage: sft\nflash_attn: auto\nenable_liger_kernel: true\nquantization_bit: 4\n"
                        "lora_rank: 8\n")
    cfg = parse_config([str(cfg_file)])
    assert cfg.finetuning.lora_rank == 8
    lines = [l for l in capsys.readouterr().err.splitlines() if "LLaMA-Factory" in l]
    assert lines == ["[sftlab] warning: LLaMA-Factory options with no meaning in sftlab, ignored: "
                     "enable_liger_kernel, flash_attn, quantization_bit"]
    with pytest.raises(ConfigError, match="unknown option '--lora_rnak'; did you mean '--lora_rank'"):
        parse_config(["--lora_rnak", "8"])
