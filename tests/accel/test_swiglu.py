"""sftlab.accel.swiglu against the gated MLP it replaces: bit-identical outputs and gradients with torch's ops,
less kept for backward, and the module's own forward where the function does not apply. (The native elementwise
kernel, which rounds once where torch's bf16 ops round twice, is tested in test_native_swiglu.py.)"""

from __future__ import annotations

import pytest
import torch

import sftlab.accel.swiglu as S
from sftlab.accel.swiglu import swiglu, use_fused_swiglu
from tests.helpers import tiny_llama_config


@pytest.fixture(autouse=True)
def torch_ops(monkeypatch):
    """These tests compare op for op with torch's own; the native kernel is off here."""
    monkeypatch.setattr(S, "_native", lambda gate, up: None)


def test_swiglu_against_the_formula_in_fp64():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    torch.testing.assert_close(swiglu(gate, up), gate * torch.sigmoid(gate) * up)


def _mlp(seed=0):
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    return LlamaMLP(tiny_llama_config(50))


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_mlp_is_bit_identical_to_llama_mlp(autocast):
    ref, mlp = _mlp(), _mlp()
    assert use_fused_swiglu(mlp) == 1 and use_fused_swiglu(mlp) == 0
    x = torch.randn(2, 9, ref.hidden_size)
    grad = torch.randn(2, 9, ref.hidden_size)
    results = []
    for m in (ref, mlp):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        y.backward(grad)
        results.append([y.detach(), xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _kept_intermediates(mlp) -> int:
    """Elements of (tokens x intermediate) tensors autograd holds for backward after one 4-token forward."""
    params = {p.data_ptr() for p in mlp.parameters()}
    kept = {}

    def pack(t):
        if t.shape[-1] == mlp.intermediate_size and t.data_ptr() not in params:
            kept[t.data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(torch.randn(4, mlp.hidden_size, requires_grad=True))
    return sum(kept.values())


def test_fused_mlp_keeps_two_activations_not_three():
    """What autograd holds for backward after a forward: gate and up, not silu(gate) as well."""
    sizes = []
    for fuse in (False, True):
        mlp = _mlp()
        if fuse:
            use_fused_swiglu(mlp)
        sizes.append(_kept_intermediates(mlp))
    assert sizes == [4 * 4 * mlp.intermediate_size, 3 * 4 * mlp.intermediate_size]  # g, silu(g), u, h -> g, u, h


def test_other_activations_keep_their_forward():
    mlp = _mlp()
    mlp.act_fn = torch.nn.GELU()
    assert use_fused_swiglu(mlp) == 0
    assert swiglu(torch.randn(3, 4), torch.randn(4)).shape == (3, 4)  # broadcasting: plain ops


@pytest.mark.parametrize("kind", ["lora", "plain", "lora_bias", "frozen_mlp"])
@pytest.mark.parametrize("autocast", [False, True])
def test_mlp_with_fused_down_projection_is_bit_identical(kind, autocast, monkeypatch):
    """With the projections on sftlab's fused linear path, the MLP runs silu * up and the down projection as one
    function (product recomputed in backward): the same bits as the module's own forward over the same linears."""
    from tests.accel.test_linear import _batch, _fuse, _loss_and_grads, _lora_model, _plain_model

    results = []
    for fuse_mlp in (False, True):
        model = _plain_model() if kind in ("plain", "frozen_mlp") else _lora_model(bias=kind == "lora_bias")
        if kind == "frozen_mlp":  # gradients reach the MLPs' inputs, none of their weights
            for layer in model.model.layers:
                layer.mlp.requires_grad_(False)
        _fuse(model)
        if fuse_mlp:
            assert use_fused_swiglu(model) == 2
            assert _down_fused_calls(model, monkeypatch) == 2
        results.append(_loss_and_grads(model, _batch(), autocast))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def _down_fused_calls(model, monkeypatch) -> int:
    """How many MLP calls of one forward take the fused swiglu + down function."""
    calls = []
    original = S._SwiGLUDown.apply
    monkeypatch.setattr(S._SwiGLUDown, "apply", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    monkeypatch.setattr(S._SwiGLUDown, "apply", original)
    return len(calls)


def test_mlp_with_fused_down_projection_keeps_two_activations():
    """gate and up only: the product that feeds the down projection is not kept either."""
    from tests.accel.test_linear import _fuse, _plain_model

    model = _plain_model()
    _fuse(model)
    use_fused_swiglu(model)
    mlp = model.model.layers[0].mlp
    assert _kept_intermediates(mlp) == 2 * 4 * mlp.intermediate_size
