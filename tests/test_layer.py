"""sb_ref.StickBreakingSelfAttention: shapes, causality, remainder modes, GQA, packed sequences, training."""
import pytest
import torch

import sb_ref
from reference import attention as reference_attention

MODES = ["self", "bias", "none"]


def make_layer(mode="self", heads=4, kv_heads=None, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return sb_ref.StickBreakingSelfAttention(32, heads, num_kv_heads=kv_heads, remainder=mode, **kw).to(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_shapes(mode, kv_heads):
    layer = make_layer(mode, kv_heads=kv_heads, dtype=torch.float32)
    assert layer(torch.randn(3, 17, 32)).shape == (3, 17, 32)
    assert layer.k_proj.out_features == (kv_heads or 4) * 8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attend_current", [False, True])
def test_causality_changing_token_t_changes_nothing_before_t(mode, attend_current):
    layer = make_layer(mode, attend_current=attend_current)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 12] += torch.randn(32, dtype=torch.float64)
    y2 = layer(x2)
    assert torch.equal(y[:, :12], y2[:, :12])
    assert not torch.allclose(y[:, 12:], y2[:, 12:])


@pytest.mark.parametrize("mode", MODES)
def test_every_parameter_gets_a_gradient(mode):
    layer = make_layer(mode, kv_heads=2, dtype=torch.float32, bias=True)
    layer(torch.randn(2, 16, 32)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (layer.remainder_bias is not None) == (mode == "bias")


@pytest.mark.parametrize("mode", MODES)
def test_remainder_modes_train(mode):
    """A few optimiser steps on a fixed regression target lower the loss in every mode."""
    layer = make_layer(mode, dtype=torch.float32)
    x, target = torch.randn(4, 12, 32), torch.randn(4, 12, 32)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("mode", MODES)
def test_matches_the_formula_from_the_reference(mode):
    layer = make_layer(mode, kv_heads=2)
    if mode == "bias":
        torch.nn.init.normal_(layer.remainder_bias)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    B, T, _ = x.shape
    q = layer.q_proj(x).view(B, T, 4, 8).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, 2, 8).transpose(1, 2)
    o, rem = reference_attention(q, k, v)
    if mode == "self":
        o = o + rem[..., None] * v.repeat_interleave(2, 1)
    elif mode == "bias":
        o = o + rem[..., None] * layer.remainder_bias[None, :, None, :]
    expected = layer.out_proj(o.transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_packed_sequences_equal_separate_runs():
    layer = make_layer("self", kv_heads=2)
    a, b = torch.randn(1, 5, 32, dtype=torch.float64), torch.randn(1, 1, 32, dtype=torch.float64)
    packed = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 6]))
    torch.testing.assert_close(packed[:, :5], layer(a), rtol=0, atol=1e-13)
    torch.testing.assert_close(packed[:, 5:], layer(b), rtol=0, atol=1e-13)
