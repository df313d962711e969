"""Where models come from: a cached hub id (never a download), a .gguf file, clear errors otherwise."""

from __future__ import annotations

import pytest

from sftlab.errors import ConfigError
from sftlab.models.load import resolve_model_path


def test_hub_id_from_the_local_cache_and_a_clear_error_when_absent(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snap)
    (cache / "models--someorg--tiny" / "refs").mkdir(parents=True)
    (cache / "models--someorg--tiny" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_path("someorg/tiny") == str(snap)
    with pytest.raises(ConfigError, match="not in the Hugging Face cache; sftlab does not download"):
        resolve_model_path("someorg/not-there")
    with pytest.raises(ConfigError, match="no such directory or file"):
        resolve_model_path("./missing-model-dir")


def test_gguf_file_is_converted_once_and_loads(tmp_path, monkeypatch):
    """The bundled GGUF through the generic .gguf path: converted into the cache, then reused as it is."""
    from transformers import AutoConfig

    from sftlab.models.bundled import bundled_gguf_path

    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    first = resolve_model_path(str(bundled_gguf_path()))
    assert AutoConfig.from_pretrained(first).num_hidden_layers == 30
    marker = tmp_path / "cache"
    before = {p: p.stat().st_mtime_ns for p in marker.rglob("*.safetensors")}
    assert resolve_model_path(str(bundled_gguf_path())) == first  # no second conversion
    assert {p: p.stat().st_mtime_ns for p in marker.rglob("*.safetensors")} == before
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
