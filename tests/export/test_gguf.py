"""`sftlab export --format gguf` on a tiny model: what the file holds, the round trip back into sftlab through the
bundled model's loader (transformers' GGUF reader, an independent implementation of the tensor layout), and bad
input refused before any work with nothing left behind. llama.cpp itself runs the files in test_llama_cpp.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sftlab.cli import main
from sftlab.export import gguf as gguf_export


def export(model_dir, out, *extra) -> int:
    return main(["export", "--model", str(model_dir), "--format", "gguf", "--out", str(out), *extra])


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".gguf"))


def test_f32_export_round_trips_exactly_through_the_gguf_loader(tmp_path, tiny_model_dir, cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.data.templates import load_saved_template
    from sftlab.models.load import resolve_model_path

    out = tmp_path / "exp" / "tiny.gguf"
    assert export(tiny_model_dir, out, "--quantization", "f32", "--template", "chatml") == 0
    back = resolve_model_path(str(out))
    x = torch.tensor([[5, 100, 2000, 7, 9, 300, 49000]])
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    b = AutoModelForCausalLM.from_pretrained(back)
    assert torch.equal(a(x).logits, b(x).logits)  # q/k reordering undone by transformers' own inverse
    ta, tb = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(back)
    text = "Hello world 12345 <|im_start|>user\nWhat's up?<|im_end|>\n  two  spaces\tünïcödé 😀"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    saved = load_saved_template(back, tb)
    assert saved is not None and saved.name == "chatml" and saved.user_format.startswith("<|im_start|>user")
    assert leftovers(out.parent) == ["tiny.gguf"]
    assert gguf_export.read_sftlab_template(out)["name"] == "chatml"
    # `sftlab predict FILE.gguf`: one command back, with the template from the file (chatml has no default system
    # prompt, the tokenizer's own template would add SmolLM's).
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"instruction": "Name a color.", "output": "red"}) + "\n")
    assert main(["predict", str(out), "--test_file", str(test_file), "--max_new_tokens", "3",
                 "--output_dir", str(tmp_path / "pred")]) == 0
    row = json.loads((tmp_path / "pred" / "generated_predictions.jsonl").read_text())
    assert row["prompt"].startswith("<|im_start|>user\nName a color.<|im_end|>") and "SmolLM" not in row["prompt"]


def test_a_gguf_from_elsewhere_has_no_sftlab_template():
    from sftlab.models.bundled import bundled_gguf_path

    assert gguf_export.read_sftlab_template(bundled_gguf_path()) is None


def test_f16_file_holds_f16_matrices_f32_norms_and_the_training_template(tmp_path, tiny_model_dir, cache):
    import gguf

    out = tmp_path / "tiny.gguf"
    assert export(tiny_model_dir, out, "--system", "Be brief.") == 0
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied to the embedding
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.ggml.eos_token_id") == 2
    template = json.loads(field("sftlab.template"))
    assert template["name"] == "tokenizer" and template["default_system"] == "Be brief."
    assert "Be brief." in field("tokenizer.chat_template")
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert modelfile.splitlines()[1] == "FROM ./tiny.gguf" and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_unsupported_architecture_is_refused_before_loading(tmp_path, tiny_model_dir, cache, capsys, monkeypatch):
    cfg = Path(tiny_model_dir) / "config.json"
    data = json.loads(cfg.read_text())
    data["architectures"] = ["GemmaForCausalLM"]
    cfg.write_text(json.dumps(data))
    monkeypatch.setattr("sftlab.models.load.load_model", _must_not_run)
    out = tmp_path / "out" / "m.gguf"
    assert export(tiny_model_dir, out) == 2
    err = capsys.readouterr().err
    assert "config.json: architecture GemmaForCausalLM cannot be exported" in err and "LlamaForCausalLM" in err
    assert leftovers(out.parent) == []


def test_missing_tokenizer_file_is_named(tmp_path, tiny_model_dir, cache, capsys, monkeypatch):
    os.unlink(Path(tiny_model_dir) / "tokenizer.json")
    monkeypatch.setattr("sftlab.models.load.load_model", _must_not_run)
    assert export(tiny_model_dir, tmp_path / "m.gguf") == 2
    assert f"{Path(tiny_model_dir) / 'tokenizer.json'}: missing" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_unwritable_output_and_unknown_type_are_refused(tmp_path, tiny_model_dir, cache, capsys, monkeypatch):
    monkeypatch.setattr("sftlab.models.load.load_model", _must_not_run)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert export(tiny_model_dir, blocker / "m.gguf") == 2
    assert f"--out: cannot write to {blocker}" in capsys.readouterr().err
    assert export(tiny_model_dir, tmp_path / "m.gguf", "--quantization", "q3_x") == 2
    assert "--quantization: unknown type 'q3_x'" in capsys.readouterr().err
    assert export(tiny_model_dir, tmp_path) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_failure_while_writing_leaves_no_file(tmp_path, tiny_model_dir, cache, monkeypatch):
    def broken(*args, **kwargs):
        yield "token_embd.weight", __import__("numpy").zeros((2, 2), dtype="float32")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "_gguf_tensors", broken)
    (tmp_path / "o").mkdir()
    with pytest.raises(OSError, match="disk full"):
        export(tiny_model_dir, tmp_path / "o" / "m.gguf")
    assert leftovers(tmp_path / "o") == []


def test_pre_tokenizers_are_mapped_from_tokenizer_json(tmp_path):
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, gpt2]}
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_export._LLAMA3}, "behavior": "Isolated", "invert": False},
        {**gpt2, "use_regex": False}]}
    for pre, name in ((gpt2, "gpt-2"), (smollm, "smollm"), (llama3, "llama-bpe")):
        assert gguf_export.PRE_TOKENIZERS[tuple(gguf_export._pre_tokenizer_regexes(pre))] == name
    assert gguf_export._pre_tokenizer_regexes({**gpt2, "add_prefix_space": True}) is None
    assert gguf_export._pre_tokenizer_regexes({"type": "Whitespace"}) is None


def test_sentencepiece_tokenizers_are_refused_by_name(tmp_path, sp_tokenizer):
    from sftlab.errors import ConfigError

    sp_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="only byte-level BPE tokenizers"):
        gguf_export._check_tokenizer(tmp_path)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")
