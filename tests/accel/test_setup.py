"""sftlab.accel.setup: the varlen attention on padding-free batches, bf16-stored frozen weights and the batch hook
against plain computations."""

from __future__ import annotations

import pytest
import torch

from sftlab.accel.attention import VARLEN_ATTENTION, register_varlen_attention
from sftlab.accel.setup import BatchHook, with_flat_batch_shape
from sftlab.data.collator import SFTCollator, mask_mode_for_attention
from sftlab.train.loss import compute_sft_loss
from tests.train.test_fast_paths import _features, _grads, _model


def test_varlen_flat_batch_matches_each_example_alone():
    """One padding-free row with varlen attention == summing each example run on its own (loss and grads)."""
    name = register_varlen_attention()
    assert mask_mode_for_attention(name) == "flatten"
    feats = _features()
    model = _model()
    ref = sum(compute_sft_loss(model, SFTCollator(0)([f]), chunk_size=4).loss_sum for f in feats)
    ref.backward()
    ref_grads = _grads(model)

    model.set_attn_implementation(name)
    batch = SFTCollator(0, mask_mode="flatten")(feats)
    assert batch["input_ids"].shape[0] == 1
    got = compute_sft_loss(model, batch, chunk_size=4).loss_sum
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got_grads = _grads(model)
    assert got_grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(got_grads[k], ref_grads[k], rtol=1e-4, atol=1e-5 * float(ref_grads[k].abs().max()))


def test_varlen_without_boundaries_is_plain_sdpa():
    """Padded batches and generation (no cu_seq_lens) go to sdpa with sdpa's mask: identical logits."""
    register_varlen_attention()
    feats = _features((6, 11, 3))
    batch = SFTCollator(0)(feats)
    model = _model().eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        model.set_attn_implementation(VARLEN_ATTENTION)
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_varlen_rejects_boundaries_that_do_not_cover_the_row():
    register_varlen_attention()
    model = _model(VARLEN_ATTENTION)
    batch = SFTCollator(0, mask_mode="flatten")(_features((5, 6)))
    batch["cu_seq_lens_q"] = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q covers 10 tokens"):
        compute_sft_loss(model, batch)


def test_bf16_frozen_linears_give_the_same_numbers_as_autocast():
    """accel.apply with store_frozen_in_bf16 stores frozen linear weights in bf16: under autocast the loss and the
    LoRA gradients are what autocast over fp32 weights gives (it rounds those weights to bf16 itself)."""
    from peft import LoraConfig, get_peft_model

    from sftlab.accel import AccelOptions, apply
    from sftlab.accel.linear import use_fused_linears
    from sftlab.accel.norm import use_fused_rms_norms
    from sftlab.accel.swiglu import use_fused_swiglu

    def lora_model():
        m = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))
        return m.train()

    batch = SFTCollator(0)(_features())
    ref_model, model = lora_model(), lora_model()
    done = apply(model, AccelOptions(store_frozen_in_bf16=True)).changes
    assert any("bf16" in line for line in done) and any("varlen" in line for line in done)
    assert any("native CPU kernels" in line for line in done)  # built (or found missing) before training
    # The fused functions (compared with peft / transformers in test_linear.py, test_norm.py, test_rotary.py) on
    # both, so only the storage differs.
    assert any("fused" in line for line in done)
    use_fused_linears(ref_model, skip=(ref_model.get_base_model().lm_head,))
    use_fused_rms_norms(ref_model)
    use_fused_swiglu(ref_model)
    base = model.get_base_model()
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.float32  # tied LM head stays fp32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    # Same (padded) batch layout for both, so only the weight storage differs.
    base.set_attn_implementation("sdpa")
    results = []
    for m in (ref_model, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compute_sft_loss(m, batch).loss_sum
        loss.backward()
        results.append((loss.detach(), _grads(m)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for k, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


@pytest.mark.parametrize("multiple", [7, 64])
def test_padding_a_pass_changes_no_loss_or_gradient(multiple):
    """The padding segment is attended by nothing and trains nothing: loss, trained-token count, accuracy and
    gradients are those of the unpadded batch (fp32), in training and in evaluation."""
    register_varlen_attention()
    batch = SFTCollator(0, mask_mode="flatten")(_features())  # 61 tokens
    model = _model(VARLEN_ATTENTION)
    ref = compute_sft_loss(model, batch)
    ref.loss_sum.backward()
    ref_grads = _grads(model)
    got = compute_sft_loss(model, with_flat_batch_shape(batch, multiple))
    got.loss_sum.backward()
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
    assert int(got.n_tokens) == int(ref.n_tokens)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-5 * float(ref_grads[k].abs().max()))
    with torch.no_grad():
        ev_ref = compute_sft_loss(model, batch, return_correct=True)
        ev = compute_sft_loss(model, with_flat_batch_shape(batch, multiple), return_correct=True)
    torch.testing.assert_close(ev.loss_sum, ev_ref.loss_sum, rtol=1e-5, atol=1e-5)
    assert int(ev.n_correct) == int(ev_ref.n_correct) and int(ev.n_tokens) == int(ev_ref.n_tokens)


def test_padding_reaches_the_model_as_a_multiple(monkeypatch):
    """What the decoder sees is padded; padded-row batches (no per-example attention) are left alone."""
    register_varlen_attention()
    seen = []
    model = _model(VARLEN_ATTENTION)
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        compute_sft_loss(model, BatchHook(model, pad_to_multiple_of=64)(SFTCollator(0, mask_mode="flatten")(_features())))
        plain = _model("sdpa")
        plain.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
        compute_sft_loss(plain, BatchHook(plain, pad_to_multiple_of=64)(SFTCollator(0)(_features())))
    finally:
        hook.remove()
    assert seen[0] == (1, 64)
    assert seen[1] == (5, 30)  # 5 rows padded to the longest example, as the collator made them
