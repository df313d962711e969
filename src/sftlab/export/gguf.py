"""`sftlab export --format gguf`: a trained model as one GGUF file that llama.cpp, Ollama and LM Studio run with the
chat template and end-of-turn token sftlab trained with.

Converter: the `gguf` package (llama.cpp's own Python library, pinned in the dependencies) names the tensors
(`TensorNameMap`), reads the merges (`SpecialVocab`) and writes the file (`GGUFWriter`); llama.cpp's quantizer
(`llama_model_quantize`, through llama-cpp-python) makes every quantized type from an f32 file. llama.cpp's script
`convert_hf_to_gguf.py` is not installed by any package, and it identifies tokenizers by hashing the output of a
fixed text; sftlab reads the pre-tokenizer from tokenizer.json instead, so a tokenizer it cannot map is refused
before any work rather than written with a guessed pre-tokenizer.

Everything that can be checked is checked first (`plan_export`: architecture, rope scaling, tokenizer file and
kind, quantization type, output path); the file is written under a temporary name and renamed, so a failed or
interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftlab.data.templates import Template
from sftlab.errors import ConfigError
from sftlab.models.bundled import TEMPLATE_KEY, read_sftlab_template

__all__ = ["ARCHITECTURES", "QUANTIZATIONS", "GGUFPlan", "export_gguf", "plan_export", "read_sftlab_template"]


# Hugging Face architecture -> GGUF architecture. Mistral is a Llama in GGUF (llama.cpp ignores its sliding window).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

# Types written here directly, and llama.cpp's quantizer types (name -> LLAMA_FTYPE_* constant of llama_cpp).
DIRECT_TYPES = ("f32", "f16")
QUANTIZER_TYPES = {
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
QUANTIZATIONS = DIRECT_TYPES + tuple(QUANTIZER_TYPES)

# Byte-level BPE pre-tokenizers as llama.cpp names them, keyed by the regex sequence tokenizer.json applies.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    (_GPT2,): "gpt-2",
    (r"\p{N}", _GPT2): "smollm",
    (_LLAMA3,): "llama-bpe",
    (_QWEN2,): "qwen2",
}


@dataclass
class GGUFPlan:
    """What an export will do, settled before any weight is read."""

    model: str  # what the user gave (output directory, model directory, bundled name)
    model_path: str  # the local directory it resolved to
    weights_path: str  # the directory holding config.json (an adapter's base model for LoRA outputs)
    tokenizer_path: str
    architecture: str  # GGUF architecture name
    pre_tokenizer: str
    quantization: str
    out: Path

    @property
    def modelfile(self) -> Path:
        return self.out.with_suffix(".Modelfile")


# ---- checks before any work --------------------------------------------------------------------------------------
def plan_export(model: str, out: str, quantization: str = "f16", cache_dir: str | None = None) -> GGUFPlan:
    """Check everything an export needs and say what it will do; raises ConfigError naming the problem."""
    from sftlab.models.load import adapter_base, resolve_model_path

    quantization = _check_quantization(quantization)
    out_path = _check_output(out)
    path = resolve_model_path(model, cache_dir)
    base = adapter_base(path)
    weights = resolve_model_path(base, cache_dir) if base is not None else path
    architecture = _check_architecture(Path(weights) / "config.json")
    pre = _check_tokenizer(Path(path))
    return GGUFPlan(model, path, weights, path, architecture, pre, quantization, out_path)


def _check_quantization(q: str) -> str:
    q = (q or "f16").lower()
    if q not in QUANTIZATIONS:
        raise ConfigError(f"--quantization: unknown type '{q}'; choose one of {', '.join(QUANTIZATIONS)}")
    if q in QUANTIZER_TYPES:
        _llama_cpp(q)
    return q


def _llama_cpp(why: str):
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(
            f"--quantization {why}: quantized types are made by llama.cpp's quantizer, which needs the "
            "llama-cpp-python package (pip install llama-cpp-python==0.3.36; see docs/GGUF.md); f16 and f32 need "
            "nothing more"
        ) from None
    return llama_cpp


def _check_output(out: str) -> Path:
    p = Path(out).expanduser()
    if p.is_dir():
        raise ConfigError(f"--out: {p} is a directory; give the file to write, e.g. {p / 'model.gguf'}")
    if p.suffix != ".gguf":
        raise ConfigError(f"--out: {p} should end in .gguf (llama.cpp and Ollama look for that name)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=p.name + ".", suffix=".probe", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--out: cannot write to {p.parent}: {e.strerror or e}") from None
    return p


def _check_architecture(config_file: Path) -> str:
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: missing; cannot tell the model's architecture")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    names = config.get("architectures") or [config.get("model_type", "?")]
    arch = ARCHITECTURES.get(names[0])
    if arch is None:
        raise ConfigError(
            f"{config_file}: architecture {names[0]} cannot be exported to GGUF by sftlab; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise ConfigError(f"{config_file}: rope scaling '{rope_type}' is not supported by the GGUF export")
    return arch


def _check_tokenizer(folder: Path) -> str:
    """The llama.cpp pre-tokenizer name of a byte-level BPE tokenizer.json."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{file}: missing; the GGUF export reads the vocabulary and merges from tokenizer.json")
    tok = json.loads(file.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConfigError(
            f"{file}: only byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen) can be exported to GGUF "
            "here; SentencePiece-style tokenizers (Llama 2, Mistral) are not supported yet"
        )
    if tok.get("normalizer") not in (None, {"type": "NFC"}):
        raise ConfigError(f"{file}: normalizer {tok['normalizer'].get('type')} has no llama.cpp equivalent")
    regexes = _pre_tokenizer_regexes(tok.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(tuple(regexes)) if regexes is not None else None
    if name is None:
        raise ConfigError(f"{file}: pre-tokenizer {json.dumps(tok.get('pre_tokenizer'))[:200]} matches none that "
                          f"llama.cpp knows ({', '.join(PRE_TOKENIZERS.values())})")
    return name


def _pre_tokenizer_regexes(pre: dict | None) -> list[str] | None:
    """The regexes a tokenizers pre-tokenizer splits with, in order; None for anything else."""
    if not pre:
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    out: list[str] = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                return None
            if step.get("use_regex", True):
                out.append(_GPT2)
        elif kind == "Digits" and step.get("individual_digits"):
            out.append(r"\p{N}")
        elif kind == "Split" and "Regex" in (step.get("pattern") or {}) and step.get("behavior") == "Isolated":
            out.append(step["pattern"]["Regex"])
        else:
            return None
    return out


# ---- the conversion ----------------------------------------------------------------------------------------------
def export_gguf(plan: GGUFPlan, model, tokenizer, template: Template) -> Path:
    """Write the GGUF (and, for quantized types, run llama.cpp's quantizer on an f32 file), atomically."""
    direct = plan.quantization if plan.quantization in DIRECT_TYPES else "f32"
    tmp = _temp_name(plan.out, ".tmp")
    tmp_q = _temp_name(plan.out, ".quant.tmp") if direct != plan.quantization else None
    try:
        _write(tmp, plan, model, tokenizer, template, direct)
        if tmp_q is not None:
            _quantize(tmp, tmp_q, plan.quantization)
            os.replace(tmp_q, plan.out)
        else:
            os.replace(tmp, plan.out)
    finally:
        for t in (tmp, tmp_q):
            if t is not None and t.exists():
                t.unlink()
    return plan.out


def _temp_name(out: Path, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix="." + out.name + ".", suffix=suffix, dir=out.parent)
    os.close(fd)
    return Path(name)


def _write(path: Path, plan: GGUFPlan, model, tokenizer, template: Template, dtype: str) -> None:
    import gguf

    config = model.config
    tensors = list(_gguf_tensors(model, plan.architecture, dtype))
    writer = gguf.GGUFWriter(str(path), plan.architecture)
    try:
        _add_hparams(writer, config, dtype)
        writer.add_string(TEMPLATE_KEY, json.dumps(template.to_dict(), ensure_ascii=False))  # before the vocabulary
        _add_vocab(writer, plan, tokenizer, template, config.vocab_size)
        for name, data in tensors:
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _add_hparams(writer, config, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") and Path(config._name_or_path).name or "sftlab model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _gguf_tensors(model, architecture: str, dtype: str):
    """(GGUF name, numpy array) for every weight; q/k rows reordered for llama.cpp's Llama rotary layout."""
    import gguf
    import numpy as np

    config = model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: no GGUF name for tensor {hf_name} of a {architecture} model")
        data = tensor.detach().float().cpu().numpy()
        if architecture == "llama" and hf_name.endswith("q_proj.weight"):
            data = _interleave_rotary(data, n_head)
        elif architecture == "llama" and hf_name.endswith("k_proj.weight"):
            data = _interleave_rotary(data, n_kv)
        # Norms and biases stay f32 (llama.cpp computes them in f32); matrices take the export type.
        if dtype == "f16" and data.ndim == 2:
            data = data.astype(np.float16)
        yield name, np.ascontiguousarray(data)


def _interleave_rotary(w, n_head: int):
    """Transformers rotates the two halves of each head (rotate_half); llama.cpp's Llama rotates adjacent pairs.
    Reorder each head's rows from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...] so both compute the same."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_vocab(writer, plan: GGUFPlan, tokenizer, template: Template, n_vocab: int) -> None:
    import gguf

    from sftlab.data.tokenize import stop_token_ids
    from sftlab.export.chat_template import to_jinja

    tokens, types = _tokens_and_types(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(plan.pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = gguf.SpecialVocab(plan.tokenizer_path, load_merges=True, n_vocab=n_vocab).merges
    writer.add_token_merges(merges)
    # sftlab's templates write BOS themselves where the model was trained with one; llama.cpp must not add another.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(int(tid))
    stops = stop_token_ids(tokenizer, template)
    end_of_turn = [t for t in stops if t != tokenizer.eos_token_id]
    if end_of_turn:  # the trained end-of-turn token ends generation in llama.cpp too (an end-of-generation token)
        writer.add_eot_token_id(int(end_of_turn[0]))
    writer.add_chat_template(to_jinja(template, tokenizer))


def _tokens_and_types(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise ConfigError(f"GGUF export: the tokenizer has {len(vocab)} tokens but the model's embedding only "
                          f"{n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i] if added[i].special else by_id[i].replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _quantize(src: Path, dst: Path, quantization: str) -> None:
    import ctypes

    llama_cpp = _llama_cpp(quantization)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[quantization])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ConfigError(f"llama.cpp's quantizer failed ({rc}) making {quantization} from {src}")
