"""Exported GGUF files run by llama.cpp itself (llama-cpp-python, built from source by the test set-up).

The prompt is built the way llama-cpp-python's chat completion builds it: the GGUF's own `tokenizer.chat_template`
through its Jinja2ChatFormatter, tokenized by llama.cpp with special tokens parsed. Generation is llama.cpp's greedy
sampler, stopping at llama.cpp's end-of-generation tokens. Both are compared with sftlab's `encode_prompt` and its
batched greedy `predict` generation on the same merged model."""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp  # installed by the Makefile set-up; missing, this module fails rather than skips
import pytest

from sftlab.cli import main
from sftlab.config import GeneratingArguments, ModelArguments
from sftlab.data.templates import Message
from sftlab.data.tokenize import encode_prompt, multi_token_stop_strings, stop_token_ids

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = [json.loads(line)["instruction"] for line in open(REPO / "examples/demo/test.jsonl")][:3]


def open_gguf(path, exact_cache: bool = False):
    """llama.cpp with its defaults, or with an f32 KV cache (its default f16 cache rounds keys and values: a random
    tiny model's near-tied greedy choices then differ from fp32 torch while the model itself is right)."""
    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if exact_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=2, verbose=False, seed=0, **kv)


def client_prompt_ids(llm, messages: list[Message]) -> list[int]:
    """What Llama.create_chat_completion feeds llama.cpp for `messages` with the GGUF's chat template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"], eos_token=llm._model.token_get_text(eos),
        bos_token=llm._model.token_get_text(bos), stop_token_ids=[eos],
    )
    result = formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def client_greedy(llm, prompt_ids: list[int], max_new: int) -> tuple[list[int], int | None]:
    """llama.cpp's greedy tokens, and the end-of-generation token it stopped at (None: ran to max_new)."""
    out: list[int] = []
    for tok in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
            return out, tok
        out.append(tok)
        if len(out) >= max_new:
            return out, None
    return out, None


def sftlab_greedy(model_dir: str, conversations, max_new: int):
    """sftlab predict's generation: merged model, encode_prompt ids, generate_batched, template stop ids."""
    from sftlab.eval.generate import generate_batched
    from sftlab.models.load import load_model, load_tokenizer
    from sftlab.data.templates import resolve_template
    from sftlab.config import parse_config

    cfg = parse_config(["--model_name_or_path", model_dir])
    tok = load_tokenizer(model_dir)
    template = resolve_template(cfg, tok, model_dir)
    model, _ = load_model(ModelArguments(model_name_or_path=model_dir), None, for_training=False)
    prompts = [encode_prompt(tok, template, c) for c in conversations]
    stops = stop_token_ids(tok, template)
    gen = GeneratingArguments(max_new_tokens=max_new)
    res = generate_batched(model, tok, prompts, gen, stops, batch_size=4,
                           stop_strings=multi_token_stop_strings(tok, template))
    return prompts, res, stops, tok, template


def export(model_dir, out, *extra):
    assert main(["export", "--model", str(model_dir), "--format", "gguf", "--out", str(out), *extra]) == 0
    return out


# ---- a tiny random model, three templates ----------------------------------------------------------------------
TEMPLATE_FLAGS = {
    "tokenizer": [],
    "chatml": ["--template", "chatml"],
    "prefix": ["--user_prefix", "<s>[INST]", "--assistant_prefix", "[/INST]"],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer_dir):
    from tests.helpers import make_tiny_model_dir

    # A wider initialisation than the default gives decisive logits, so greedy choices are not near-ties.
    return make_tiny_model_dir(tmp_path_factory.mktemp("llama_cpp") / "tiny", smol_tokenizer_dir,
                               initializer_range=0.2, tie_word_embeddings=False)


@pytest.mark.parametrize("name", sorted(TEMPLATE_FLAGS))
def test_llama_cpp_builds_the_training_prompt_and_generates_the_same_tokens(name, tiny_dir, tmp_path):
    from sftlab.data.templates import save_template
    from sftlab.config import parse_config
    from sftlab.models.load import load_tokenizer
    from sftlab.data.templates import resolve_template

    # The model directory carries the template it "was trained with", as an sftlab output does.
    model_dir = tmp_path / "m"
    import shutil

    shutil.copytree(tiny_dir, model_dir)
    tok = load_tokenizer(str(model_dir))
    save_template(resolve_template(parse_config(["--model_name_or_path", str(model_dir), *TEMPLATE_FLAGS[name]]),
                                   tok, str(model_dir)), model_dir)
    path = export(model_dir, tmp_path / "tiny.gguf", "--quantization", "f32")
    conversations = [
        [Message("user", "What is the capital of Japan?")],
        [Message("system", "Answer in JSON."), Message("user", "Spell 'music' backwards.")],
        [Message("user", "Hi"), Message("assistant", "Hello! How can I help?"), Message("user", "Name a color.")],
    ]
    prompts, res, _, _, _ = sftlab_greedy(str(model_dir), conversations, max_new=24)
    llm = open_gguf(path, exact_cache=True)
    for conv, prompt, want in zip(conversations, prompts, res.sequences):
        assert client_prompt_ids(llm, conv) == prompt, (name, conv)
        got, _ = client_greedy(llm, prompt, 24)
        assert got == want, (name, conv)


# ---- the bundled SmolLM2 after a few LoRA steps --------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm_lora(tmp_path_factory):
    return train_smollm_lora(tmp_path_factory.mktemp("smollm") / "lora")


def train_smollm_lora(out: Path) -> Path:
    """A few LoRA steps of the bundled SmolLM2 on the demo data (also used by benchmarks/gguf_quantization.py)."""
    from sftlab.config import parse_config
    from sftlab.workflow import run_sft

    cfg = parse_config([], overrides=dict(
        model_name_or_path="smollm2-135m-instruct", finetuning_type="lora", lora_rank=8, lora_target=["all"],
        train_file=str(REPO / "examples/demo/train.jsonl"), output_dir=str(out), cutoff_len=96, max_steps=4,
        per_device_train_batch_size=8, learning_rate=1e-3, do_train=True, save_strategy="no", logging_steps=1,
        seed=0,
    ))
    run_sft(cfg)
    return out


def test_smollm2_lora_f16_gguf_prompts_generates_and_stops_like_sftlab(smollm_lora, tmp_path):
    path = export(smollm_lora, tmp_path / "smollm.gguf")  # f16, the default
    conversations = [[Message("user", q)] for q in QUESTIONS]
    prompts, res, stops, tok, _ = sftlab_greedy(str(smollm_lora), conversations, max_new=48)
    llm = open_gguf(path)
    stopped = 0
    for conv, prompt, want in zip(conversations, prompts, res.sequences):
        assert client_prompt_ids(llm, conv) == prompt
        got, eog = client_greedy(llm, prompt, 48)
        assert got == want, (conv, tok.decode(got), tok.decode(want))
        if len(want) < 48:  # sftlab stopped at the trained end-of-turn token: llama.cpp stops at the same token
            assert eog in stops and tok.convert_ids_to_tokens(eog) == "<|im_end|>"
            stopped += 1
    assert stopped >= 1  # the stop itself was compared, not only truncated runs
    # The chat API as an application calls it: the GGUF's template, stopping on its own.
    reply = llm.create_chat_completion([{"role": "user", "content": QUESTIONS[0]}], temperature=0.0,
                                       repeat_penalty=1.0, max_tokens=48)
    assert reply["choices"][0]["message"]["content"].strip() == res.texts[0]


@pytest.mark.parametrize("quantization", ["q8_0", "q4_k_m"])
def test_quantized_files_load_and_answer(quantization, smollm_lora, tmp_path):
    import gguf

    path = export(smollm_lora, tmp_path / f"smollm-{quantization}.gguf", "--quantization", quantization)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"q8_0": "Q8_0", "q4_k_m": "Q4_K"}[quantization] in types  # the quantizer's own types
    assert json.loads(gguf.GGUFReader(str(path)).fields["sftlab.template"].contents())["name"] == "tokenizer"
    llm = open_gguf(path)
    reply = llm.create_chat_completion([{"role": "user", "content": QUESTIONS[0]}], temperature=0.0,
                                       repeat_penalty=1.0, max_tokens=32)
    assert reply["choices"][0]["message"]["content"].strip()
