"""compute_sft_loss against the naive full-logits cross-entropy, on a tiny fp32 Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.collator import SFTCollator
from sftlab.errors import ConfigError
from sftlab.train.loss import compute_sft_loss
from tests.helpers import tiny_llama_config

VOCAB = 300


def _model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, attn_implementation="sdpa", **overrides))
    return model.float().train()


def _batch(seed: int = 1, lengths=(11, 7, 16, 3)) -> dict:
    """A right-padded batch with a masked prompt of random length in every example."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = int(torch.randint(0, n, (1,), generator=g))
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return SFTCollator(pad_token_id=0)(feats)


def _naive(model, batch, softcap: float | None = None) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(a: dict, b: dict, rtol: float = 1e-5):
    """Elementwise rtol, with an absolute floor of rtol x the tensor's largest entry: fp32 sums taken in a
    different order differ by ~1e-7 of the scale, which is far above rtol for near-zero entries."""
    assert a.keys() == b.keys() and a
    for name in a:
        atol = rtol * float(b[name].abs().max())
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 4096])
@pytest.mark.parametrize("recompute", [True, False])
def test_matches_naive_loss_and_grads(chunk_size, recompute):
    model, batch = _model(), _batch()
    ref = _naive(model, batch)
    ref.backward()
    ref_grads = _grads(model)

    parts = compute_sft_loss(model, batch, chunk_size=chunk_size, recompute_chunks=recompute)
    parts.loss_sum.backward()
    assert parts.n_correct is None
    assert int(parts.n_tokens) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(parts.loss_sum, ref, rtol=1e-5, atol=0)
    _assert_grads_close(_grads(model), ref_grads)


def test_n_correct_matches_naive_argmax():
    model, batch = _model(), _batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pred = logits.argmax(-1)
    # Make every other trained target the model's own prediction so the count is far from zero.
    labels = batch["labels"].clone()
    trained = labels[:, 1:] != -100
    flip = trained & (torch.arange(trained.shape[1]) % 2 == 0)
    labels[:, 1:][flip] = pred[:, :-1][flip]
    batch = dict(batch, labels=labels, shift_labels=torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100))
    expected = int(((pred[:, :-1] == labels[:, 1:]) & trained).sum())
    assert expected >= int(flip.sum()) > 0

    with torch.no_grad():
        parts = compute_sft_loss(model, batch, chunk_size=3, return_correct=True)
    assert int(parts.n_correct) == expected


def test_zero_trained_tokens_gives_connected_zero():
    model, batch = _model(), _batch()
    batch = dict(batch, labels=torch.full_like(batch["labels"], -100))
    batch["shift_labels"] = batch["labels"].clone()
    parts = compute_sft_loss(model, batch, return_correct=True)
    assert parts.loss_sum.requires_grad and parts.loss_sum.item() == 0.0
    assert int(parts.n_tokens) == 0 and int(parts.n_correct) == 0
    parts.loss_sum.backward()
    grads = _grads(model)
    assert len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        assert torch.isfinite(g).all() and not g.any(), name


def test_derives_shift_labels_when_missing():
    model, batch = _model(), _batch()
    ref = compute_sft_loss(model, batch).loss_sum
    no_shift = {k: v for k, v in batch.items() if k != "shift_labels"}
    torch.testing.assert_close(compute_sft_loss(model, no_shift).loss_sum, ref, rtol=1e-6, atol=0)


def test_lora_model_gradients_reach_only_adapters():
    from peft import LoraConfig, get_peft_model

    base, batch = _model(), _batch()
    # init_lora_weights=False: non-zero B, so lora_A gets a non-zero gradient too.
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ref = _naive(model, batch)
    ref.backward()
    ref_grads = _grads(model)

    parts = compute_sft_loss(model, batch, chunk_size=7)
    parts.loss_sum.backward()
    got = _grads(model)
    torch.testing.assert_close(parts.loss_sum, ref, rtol=1e-5, atol=0)
    _assert_grads_close(got, ref_grads)
    assert got and all("lora_A" in n or "lora_B" in n for n in got)
    assert any("lora_A" in n for n in got) and any("lora_B" in n for n in got)
    assert all(g.abs().sum() > 0 for g in got.values())
    # Adapters must actually be active: the LoRA model's loss differs from the bare base model's.
    with model.disable_adapter():
        assert not torch.isclose(compute_sft_loss(model, batch).loss_sum, parts.loss_sum)


def test_final_logit_softcapping_is_applied():
    model, batch = _model(), _batch()
    model.config.final_logit_softcapping = 0.5  # small cap, so it changes the loss a lot
    ref = _naive(model, batch, softcap=0.5)
    ref.backward()
    ref_grads = _grads(model)
    parts = compute_sft_loss(model, batch, chunk_size=4)
    parts.loss_sum.backward()
    torch.testing.assert_close(parts.loss_sum, ref, rtol=1e-5, atol=0)
    _assert_grads_close(_grads(model), ref_grads)
    assert not torch.isclose(ref, _naive(model, batch))


def test_lm_head_bias_is_used():
    model, batch = _model(tie_word_embeddings=False), _batch()
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0, 2.0)
    model.lm_head = head
    ref = _naive(model, batch)
    ref.backward()
    ref_grads = _grads(model)
    parts = compute_sft_loss(model, batch, chunk_size=6)
    parts.loss_sum.backward()
    torch.testing.assert_close(parts.loss_sum, ref, rtol=1e-5, atol=0)
    _assert_grads_close(_grads(model), ref_grads)
    assert "lm_head.bias" in ref_grads


def test_scaled_head_is_refused():
    model, batch = _model(), _batch()
    model.config.logit_scale = 0.25
    with pytest.raises(ConfigError, match="logit_scale"):
        compute_sft_loss(model, batch)


def test_peak_saved_memory_grows_less_than_full_logits():
    """Bytes kept for backward: chunked+recomputed loss stores no per-token vocabulary logits."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(8192, attn_implementation="sdpa")).train()

    def saved_bytes(fn) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total

    def batch(n):
        ids = torch.randint(3, 8192, (1, n))
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def naive(n):
        b = batch(n)
        return lambda: _naive(model, b)

    def chunked(n):
        b = batch(n)
        return lambda: compute_sft_loss(model, b, chunk_size=64)

    naive_growth = saved_bytes(naive(512)) - saved_bytes(naive(128))
    chunked_growth = saved_bytes(chunked(512)) - saved_bytes(chunked(128))
    # Full logits add ~ 3 x 384 x 8192 x 4 bytes; the chunked loss only grows with the backbone activations.
    assert chunked_growth * 4 < naive_growth


def test_works_with_gradient_checkpointing():
    model, batch = _model(), _batch()
    ref = _naive(model, batch)
    ref.backward()
    ref_grads = _grads(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    parts = compute_sft_loss(model, batch, chunk_size=8)
    parts.loss_sum.backward()
    torch.testing.assert_close(parts.loss_sum, ref, rtol=1e-5, atol=0)
    _assert_grads_close(_grads(model), ref_grads)


def test_flash_attention_refuses_layouts_it_would_get_wrong():
    from sftlab.data.collator import SFTCollator
    from sftlab.data.packing import pack_examples

    model = _model()
    model.config._attn_implementation = "flash_attention_2"  # only the guard runs; it raises before forward
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    packs = pack_examples(examples * 2, capacity=5)
    with pytest.raises(ConfigError, match="flatten"):
        compute_sft_loss(model, SFTCollator(0)(packs))
    with pytest.raises(ConfigError, match="4-D"):
        compute_sft_loss(model, SFTCollator(0, mask_mode="4d")(packs))


@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval"])
def test_head_runs_in_the_precision_of_the_forward(grad):
    """The Trainer (through accelerate) puts bf16 autocast around the model's forward only; the head, which runs
    after it, must still run under it, exactly as with the whole loss computed under autocast (not in fp32)."""
    model, batch = _model(), _batch()

    def loss_and_grads(fn):
        with torch.set_grad_enabled(grad):
            parts = fn()
        if grad:
            parts.loss_sum.backward()
            return parts.loss_sum.detach(), _grads(model)
        return parts.loss_sum, parts.n_correct

    def everything_under_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compute_sft_loss(model, batch, return_correct=not grad)

    ref = loss_and_grads(everything_under_autocast)
    fp32_head = loss_and_grads(lambda: compute_sft_loss(model, batch, return_correct=not grad))

    original = model.forward

    def forward_under_autocast(*args, **kwargs):  # what accelerate does to a prepared model with bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(*args, **kwargs)

    model.forward = forward_under_autocast
    got = loss_and_grads(lambda: compute_sft_loss(model, batch, return_correct=not grad))
    assert torch.equal(got[0], ref[0]) and not torch.equal(got[0], fp32_head[0])
    if grad:
        assert got[1].keys() == ref[1].keys()
        assert all(torch.equal(got[1][k], ref[1][k]) for k in ref[1])
    else:
        assert torch.equal(got[1], ref[1])
