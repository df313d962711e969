"""Find, load and prepare the model: local directory, .gguf file, cached hub id or the bundled default; then LoRA,
full or freeze fine-tuning. An sftlab output directory holding a LoRA adapter loads as base model + adapter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sftlab.config import FinetuningArguments, ModelArguments
from sftlab.errors import ConfigError
from sftlab.logs import log
from sftlab.files import default_cache_dir
from sftlab.models.bundled import BUNDLED_NAMES, bundled_model_dir, convert_gguf


def resolve_model_path(name_or_path: str | None, cache_dir: str | None = None) -> str:
    """A local directory holding the model (converting GGUF and locating cached hub models as needed)."""
    if not name_or_path or name_or_path.lower() in BUNDLED_NAMES:
        return str(bundled_model_dir(cache_dir))
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"model_name_or_path: GGUF file not found: {p}")
        st = p.stat()
        key = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        return str(convert_gguf(p, root / f"gguf-{p.stem}-{key}"))
    if p.is_dir():
        if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
            raise ConfigError(f"model_name_or_path: {p} has neither config.json nor adapter_config.json")
        return str(p)
    if p.exists():
        raise ConfigError(f"model_name_or_path: {p} is a file; give a model directory or a .gguf file")
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name_or_path, local_files_only=True)
        except Exception:
            raise ConfigError(
                f"model_name_or_path: '{name_or_path}' is not a local directory and is not in the Hugging Face "
                "cache; sftlab does not download models. Download it elsewhere and pass its directory."
            ) from None
    raise ConfigError(f"model_name_or_path: no such directory or file: {name_or_path}")


def adapter_base(path: str) -> str | None:
    """The base model an adapter directory was trained on, or None if `path` holds no adapter."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token serves.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(model_args: ModelArguments, finetuning: FinetuningArguments | None, for_training: bool,
               bf16: bool = False):
    """The model ready for training (adapter attached, trainable parameters set) or inference.

    Weights stay in fp32 for training (bf16 comes from autocast, the master weights stay exact); for inference they
    are cast to bf16 when `bf16` is set."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_args.model_name_or_path, model_args.cache_dir)
    adapter = model_args.adapter_name_or_path
    base_of_path = adapter_base(path)
    if base_of_path is not None:  # model_name_or_path is itself an adapter directory
        adapter, path = path, resolve_model_path(base_of_path, model_args.cache_dir)
    attn = model_args.attn_implementation
    if model_args.use_flash_attention:
        if torch.cuda.is_available() and _has_flash_attn():
            attn = "flash_attention_2"
        else:
            log.warning("--use_flash_attention: flash-attention is not available here (no CUDA or no flash_attn "
                        "package); using sdpa")
    if attn == "flash_attention_2" and not (torch.cuda.is_available() and _has_flash_attn()):
        raise ConfigError("attn_implementation=flash_attention_2 needs a CUDA GPU and the flash_attn package")
    dtype = torch.float32 if (for_training or not bf16) else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=model_args.trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=for_training)
        if not for_training:
            model = model.merge_and_unload()  # same logits, faster generation
        return model, path
    if for_training and finetuning is not None:
        model = prepare_for_finetuning(model, finetuning)
    return model, path


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def prepare_for_finetuning(model, ft: FinetuningArguments):
    if ft.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if ft.finetuning_type == "freeze":
        layers = _decoder_layers(model)
        n = ft.freeze_trainable_layers
        if not 0 < n <= len(layers):
            raise ConfigError(f"freeze_trainable_layers: {n} is not between 1 and the model's {len(layers)} layers")
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers[-n:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        return model
    # "lora" (the config accepts nothing else)
    from peft import LoraConfig, get_peft_model

    targets = ft.lora_target
    target_modules = "all-linear" if (not targets or targets == ["all"]) else list(targets)
    cfg = LoraConfig(
        r=ft.lora_rank,
        lora_alpha=ft.lora_alpha or 2 * ft.lora_rank,
        lora_dropout=ft.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise ConfigError(f"lora_target: {e}") from None


def _decoder_layers(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise ConfigError("finetuning_type=freeze: cannot find the decoder layers of this model")
    return list(layers)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
