"""Multi-token end-of-turn markers (LocalRQA's `</s>` on a tokenizer without it) stop generation as text."""

from __future__ import annotations

from sftlab.config import GeneratingArguments
from sftlab.eval.generate import generate_batched


def test_generation_stops_at_a_multi_token_string(tmp_path, smol_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path / "m", smol_tokenizer_dir, tie_word_embeddings=False, initializer_range=0.2)
    model, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    prompt = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    gen = GeneratingArguments(max_new_tokens=12)
    free = generate_batched(model, tok, [prompt], gen, stop_token_ids=[])
    text = free.texts[0]
    assert len(free.sequences[0]) == 12
    # A marker made of two consecutive generated tokens, so it is certainly multi-token.
    marker = tok.decode(free.sequences[0][4:6])
    assert len(tok(marker, add_special_tokens=False)["input_ids"]) >= 2 or len(marker) > 1
    stopped = generate_batched(model, tok, [prompt], gen, stop_token_ids=[], stop_strings=[marker])
    assert marker not in stopped.texts[0]
    assert text.startswith(stopped.texts[0])
    assert len(stopped.sequences[0]) < 12  # generation ended early, not only the text cut
