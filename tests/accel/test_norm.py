"""sftlab.accel.norm against transformers' own RMSNorm: same outputs and gradients, original path where the
fused one does not apply."""

from __future__ import annotations

import pytest
import torch

from sftlab.accel.norm import rms_norm, use_fused_rms_norms
from tests.helpers import tiny_llama_config


def test_rms_norm_function_against_the_formula_in_fp64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, generator=g).add_(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))
    expected = w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected)


@pytest.mark.parametrize("trained_weight", [False, True])
def test_fused_norm_matches_llama_rmsnorm(trained_weight):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ref, norm = LlamaRMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        norm.weight.copy_(ref.weight)
    for m in (ref, norm):
        m.weight.requires_grad_(trained_weight)
    assert use_fused_rms_norms(norm) == 1 and use_fused_rms_norms(norm) == 0
    x = torch.randn(3, 7, 16) * 4
    grad = torch.randn(3, 7, 16)
    outs = []
    for m in (ref, norm):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the training setting: the norm stays fp32 anyway
            y = m(xi)
        y.backward(grad)
        outs.append((y.detach(), xi.grad, m.weight.grad))
    assert outs[1][0].dtype == torch.float32
    for a, b in zip(outs[1], outs[0]):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_dtypes_and_unknown_norms_keep_their_forward():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(50))
    assert use_fused_rms_norms(model) == 2 * 2 + 1  # two per layer and the final norm
    norm = model.model.norm
    x = torch.randn(2, 3, norm.weight.shape[0]).bfloat16()
    with torch.no_grad():
        expected = norm._sftlab_original_forward(x)
        got = norm(x)  # bf16 input: transformers' own path, bit for bit
    assert got.dtype == expected.dtype and torch.equal(got, expected)

    class GemmaLikeRMSNorm(torch.nn.Module):  # 1 + w: not in the known set
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))
            self.variance_epsilon = 1e-6

    assert use_fused_rms_norms(GemmaLikeRMSNorm()) == 0
