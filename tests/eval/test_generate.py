"""generate_batched against a hand-written greedy loop (full forward pass per step, no cache, no padding)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from sftlab.config import GeneratingArguments
from sftlab.eval.generate import generate_batched, pad_token_id, write_predictions

PROMPT_TEXTS = [
    "What is the capital of France? Please answer in one word and explain why.",
    "hi",
    "Numbers like 12345 appear here.",
    "Supervised fine-tuning trains a language model on demonstrations written by people who know the task.",
    "The quick brown fox",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import make_tiny_model_dir

    # Untied, wider-initialised weights: a tied random model just repeats its input token, which would make the
    # stop-token test meaningless; larger logit gaps also keep greedy argmax far from ties.
    path = make_tiny_model_dir(
        tmp_path_factory.mktemp("gen") / "m", smol_tokenizer_dir, tie_word_embeddings=False, initializer_range=0.2
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok


def manual_greedy(model, ids: list[int], steps: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [tok(t).input_ids for t in PROMPT_TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths -> real padding
    side, pad = tok.padding_side, tok.pad_token

    res = generate_batched(model, tok, prompts, GeneratingArguments(max_new_tokens=6), stop_token_ids=[], batch_size=2)

    expected = [manual_greedy(model, p, 6) for p in prompts]
    assert res.sequences == expected
    assert res.texts == [tok.decode(e, skip_special_tokens=True).strip() for e in expected]
    assert res.new_tokens == 6 * len(prompts)
    assert res.seconds > 0 and res.tokens_per_second == pytest.approx(res.new_tokens / res.seconds)
    # The caller's tokenizer is left as it was.
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_stops_at_first_stop_token_without_affecting_other_rows(tiny):
    model, tok = tiny
    prompts = [tok(t).input_ids for t in PROMPT_TEXTS[:3]]
    free = [manual_greedy(model, p, 10) for p in prompts]
    # Stop id: the token row 0 produces at step k, first time it appears there (so the cut must be at k).
    k = next(i for i in range(2, 10) if free[0][i] not in free[0][:i])
    stop = free[0][k]

    res = generate_batched(
        model, tok, prompts, GeneratingArguments(max_new_tokens=10), stop_token_ids=[stop], batch_size=3
    )

    def cut(seq):
        return seq[: seq.index(stop)] if stop in seq else seq

    assert res.sequences[0] == free[0][:k]
    # Rows that never produce the stop id keep generating all 10 tokens in the same batch.
    assert res.sequences[1:] == [cut(s) for s in free[1:]]
    assert res.new_tokens == sum(len(cut(s)) + (stop in s) for s in free)


def test_any_of_several_stop_ids_stops(tiny):
    model, tok = tiny
    prompt = tok(PROMPT_TEXTS[4]).input_ids
    free = manual_greedy(model, prompt, 8)
    k = next(i for i in range(3, 8) if free[i] not in free[:i])
    never = next(t for t in range(10, 100) if t not in free)
    res = generate_batched(model, tok, [prompt], GeneratingArguments(max_new_tokens=8), [never, free[k]])
    assert res.sequences == [free[:k]]


def test_topk1_sampling_equals_greedy_and_mode_is_restored(tiny):
    model, tok = tiny
    prompts = [tok(t).input_ids for t in PROMPT_TEXTS[:2]]
    model.train()
    args = GeneratingArguments(max_new_tokens=5, do_sample=True, top_k=1, temperature=0.7)
    res = generate_batched(model, tok, prompts, args, stop_token_ids=[])
    assert model.training  # put back the way the caller had it
    model.eval()
    assert res.sequences == [manual_greedy(model, p, 5) for p in prompts]


def test_peft_wrapped_model(tiny):
    from peft import LoraConfig, get_peft_model

    base, tok = tiny
    import copy

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    prompts = [tok(t).input_ids for t in PROMPT_TEXTS[1:4]]
    res = generate_batched(peft_model, tok, prompts, GeneratingArguments(max_new_tokens=4), [], batch_size=8)
    # Fresh LoRA adapters start with B = 0, so the wrapped model must generate exactly what the base does.
    assert res.sequences == [manual_greedy(base, p, 4) for p in prompts]


def test_pad_falls_back_to_eos():
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None), [9]) == 9


def test_empty_prompt_rejected(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batched(model, tok, [[1, 2], []], GeneratingArguments(max_new_tokens=2), [])


def test_write_predictions(tmp_path):
    out = tmp_path / "sub" / "generated_predictions.jsonl"
    write_predictions(out, ["p1", "问题"], ["a1", "答案"], ["l1", "标签 \"q\""])
    raw = out.read_text(encoding="utf-8")
    assert "问题" in raw and "\\u" not in raw  # not ASCII-escaped
    rows = [json.loads(line) for line in raw.splitlines()]
    assert rows == [
        {"prompt": "p1", "predict": "a1", "label": "l1"},
        {"prompt": "问题", "predict": "答案", "label": "标签 \"q\""},
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left behind
    with pytest.raises(ValueError):
        write_predictions(out, ["p"], [], ["l"])
