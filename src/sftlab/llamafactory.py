"""LLaMA-Factory configurations carried over: its option names, its `stage`, its template names.

`translate` runs on the raw option dict before sftlab's own checks: options with an sftlab meaning become sftlab's
(`train_on_prompt` -> train_on all, `mask_history` -> train_on last_turn, `default_system` -> system,
`neat_packing` -> packing, template names -> the template with that format), `stage: sft` is accepted and any
other stage refused, and LLaMA-Factory options that mean nothing here are dropped and listed in one warning line.
Anything else unknown is left for sftlab's did-you-mean error. Dataset names are resolved by
`sftlab.data.dataset_info`.
"""

from __future__ import annotations

import sys
from typing import Any

from sftlab.errors import ConfigError

# LLaMA-Factory template names whose format is one of sftlab's built-in templates.
SAME_FORMAT = {"chatml": "chatml", "llama2": "llama2", "mistral": "mistral", "alpaca": "alpaca", "empty": "plain"}
# Model-family templates: the model's own tokenizer carries the same chat template, so sftlab renders with that.
FAMILY_TEMPLATES = {
    "baichuan", "baichuan2", "bloom", "chatglm3", "cohere", "cpm", "cpm3", "dbrx", "deepseek", "deepseek3",
    "deepseekcoder", "deepseekr1", "default", "exaone", "falcon", "gemma", "gemma2", "gemma3", "glm4", "granite3",
    "hunyuan", "intern", "intern2", "intern_vl", "llama3", "llama4", "mimo", "minicpm_v", "mistral_small", "olmo",
    "openchat", "openchat-3.6", "phi", "phi_small", "phi4", "qwen", "qwen2_audio", "qwen2_vl", "qwen3",
    "qwen3_nothink", "seed_coder", "skywork_o1", "smollm", "smollm2", "solar", "starchat", "telechat", "vicuna",
    "xverse", "yayi", "yi", "yi_vl", "yuan", "zephyr", "ziya",
}
# LLaMA-Factory options with no meaning in sftlab: accepted, listed in one warning, otherwise ignored.
MEANINGLESS = {
    # model loading and acceleration
    "adapter_folder", "use_fast_tokenizer", "resize_vocab", "split_special_tokens", "add_tokens",
    "add_special_tokens", "model_revision", "low_cpu_mem_usage", "rope_scaling", "flash_attn", "shift_attn",
    "mixture_of_depths", "use_unsloth", "use_unsloth_gc", "enable_liger_kernel", "moe_aux_loss_coef",
    "disable_gradient_checkpointing", "use_reentrant_gc", "upcast_layernorm", "upcast_lmhead_output",
    "train_from_scratch", "infer_backend", "offload_folder", "use_cache", "infer_dtype", "hf_hub_token",
    "ms_hub_token", "om_hub_token", "print_param_status", "use_kv_cache", "model_max_length",
    "quantization_method", "quantization_bit", "quantization_type", "double_quantization",
    "quantization_device_map", "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank",
    "vllm_config", "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config",
    # multimodal
    "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
    "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate", "media_dir",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model",
    # data loading
    "mix_strategy", "interleave_probs", "streaming", "buffer_size", "eval_num_beams", "ignore_pad_token_for_loss",
    "tokenized_path", "enable_thinking", "data_shared_file_system", "eval_on_each_dataset",
    # finetuning methods sftlab does not have
    "pure_bf16", "use_badam", "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval",
    "badam_update_ratio", "badam_mask_mode", "badam_verbose", "use_galore", "galore_target", "galore_rank",
    "galore_update_interval", "galore_scale", "galore_proj_type", "galore_layerwise", "use_apollo",
    "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
    "apollo_scale_type", "apollo_layerwise", "apollo_scale_front", "pissa_init", "pissa_iter", "pissa_convert",
    "use_rslora", "use_dora", "loraplus_lr_ratio", "loraplus_lr_embedding", "additional_target",
    "create_new_adapter", "use_llama_pro", "freeze_extra_modules", "freeze_trainable_modules",
    "disable_shuffling", "include_effective_tokens_per_second", "use_swanlab", "swanlab_project",
    "swanlab_workspace", "swanlab_run_name", "swanlab_mode", "swanlab_api_key", "swanlab_logdir",
    "swanlab_lark_webhook_url", "swanlab_lark_secret", "early_stopping_steps", "use_muon", "use_mca",
    # other stages and export
    "pref_beta", "pref_ftx", "pref_loss", "pref_bco_weight", "dpo_label_smoothing", "kto_chosen_weight",
    "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target",
    "ppo_whiten_rewards", "ref_model", "ref_model_adapters", "ref_model_quantization_bit", "reward_model",
    "reward_model_adapters", "reward_model_quantization_bit", "reward_model_type", "ld_alpha",
    "export_dir", "export_size", "export_device", "export_quantization_bit", "export_quantization_dataset",
    "export_quantization_nsamples", "export_quantization_maxlen", "export_legacy_format", "export_hub_model_id",
    "skip_special_tokens", "default_tool",
}


def _flag(raw: dict[str, Any], key: str) -> bool:
    v = raw.pop(key)
    return v is True or (isinstance(v, str) and v.lower() in ("true", "yes", "1"))


def _train_on(raw: dict[str, Any]) -> None:
    """train_on_prompt -> train_on all; mask_history -> train_on last_turn (each only where it is set true)."""
    wanted = []
    if "train_on_prompt" in raw and _flag(raw, "train_on_prompt"):
        wanted.append(("train_on_prompt", "all"))
    if "mask_history" in raw and _flag(raw, "mask_history"):
        wanted.append(("mask_history", "last_turn"))
    if len(wanted) == 2:
        raise ConfigError("train_on_prompt and mask_history are both true: sftlab trains either every token "
                          "(train_on all) or the last answer only (train_on last_turn); choose one")
    if wanted:
        name, value = wanted[0]
        if raw.get("train_on", value) != value:
            raise ConfigError(f"{name}: true conflicts with train_on: {raw['train_on']}; set only one of them")
        raw["train_on"] = value


def _template(raw: dict[str, Any], notes: list[str]) -> None:
    from sftlab.data.templates import BUILTIN

    name = raw.get("template")
    if not isinstance(name, str) or name in BUILTIN or name in ("tokenizer", "default", "prefix"):
        return
    if name in SAME_FORMAT:
        raw["template"] = SAME_FORMAT[name]
        notes.append(f"template '{name}' (LLaMA-Factory): using sftlab's '{SAME_FORMAT[name]}', the same format")
    elif name in FAMILY_TEMPLATES:
        raw["template"] = "tokenizer"
        notes.append(f"template '{name}' (LLaMA-Factory): using the model tokenizer's own chat template")


def _tool_format(raw: dict[str, Any], notes: list[str]) -> None:
    value = raw.get("tool_format")
    if value in (None, "auto", "template", "builtin"):
        return
    raw["tool_format"] = "builtin" if value == "qwen" else "auto"
    notes.append(f"tool_format '{value}' (LLaMA-Factory): using tool_format {raw['tool_format']}")


def translate(raw: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """Options in LLaMA-Factory's terms -> sftlab's (see the module docstring); prints what it changed."""
    raw = dict(raw)
    notes: list[str] = []
    stage = raw.pop("stage", None)
    if stage is not None and str(stage).lower() != "sft":
        raise ConfigError(f"stage: '{stage}' is not supported; sftlab does supervised fine-tuning only (stage: sft)")
    _train_on(raw)
    if "default_system" in raw:
        value = raw.pop("default_system")
        raw.setdefault("system", value)
    if "neat_packing" in raw:
        if _flag(raw, "neat_packing"):
            raw["packing"] = True  # sftlab's packing always keeps attention inside each example
    _template(raw, notes)
    _tool_format(raw, notes)
    ignored = sorted(k for k in raw if k in MEANINGLESS and k not in known)
    for k in ignored:
        raw.pop(k)
    if ignored:
        notes.append(f"warning: LLaMA-Factory options with no meaning in sftlab, ignored: {', '.join(ignored)}")
    for note in notes:
        print(f"[sftlab] {note}", file=sys.stderr, flush=True)
    return raw
