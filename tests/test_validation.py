"""Every bad input of DESIGN.md raises ValueError/TypeError naming the argument, before any computation."""
import re

import pytest
import torch

import sb_ref

sba = sb_ref.stick_breaking_attention


def qkv(B=1, Hq=2, Hk=2, T=8, D=4, Dv=4, dtype=torch.float32):
    return torch.randn(B, Hq, T, D, dtype=dtype), torch.randn(B, Hk, T, D, dtype=dtype), \
        torch.randn(B, Hk, T, Dv, dtype=dtype)


def expect(error, words, fn, *args, **kw):
    with pytest.raises(error) as info:
        fn(*args, **kw)
    message = str(info.value)
    for word in words:
        assert word in message, f"message {message!r} does not mention {word!r}"


def test_not_tensors():
    q, k, v = qkv()
    expect(TypeError, ["q", "torch.Tensor"], sba, q.tolist(), k, v)
    expect(TypeError, ["k", "torch.Tensor"], sba, q, None, v)
    expect(TypeError, ["v", "torch.Tensor"], sba, q, k, v.numpy())


def test_wrong_number_of_dimensions():
    q, k, v = qkv()
    expect(ValueError, ["q", "4 dimensions", "(B, Hq, T, D)"], sba, q[0], k, v)
    expect(ValueError, ["v", "4 dimensions"], sba, q, k, v[None])


def test_integer_inputs():
    q, k, v = qkv()
    expect(TypeError, ["q", "floating-point", "int64"], sba, q.long(), k, v)
    expect(TypeError, ["v", "floating-point"], sba, q, k, v.int())


def test_mixed_dtypes():
    q, k, v = qkv()
    expect(TypeError, ["dtype", "float32", "float64"], sba, q, k.double(), v)


def test_mismatched_batch_length_and_head_dim():
    q, k, v = qkv()
    expect(ValueError, ["batch"], sba, q, torch.randn(2, 2, 8, 4), v)
    expect(ValueError, ["sequence length", "T"], sba, q, k, torch.randn(1, 2, 9, 4))
    expect(ValueError, ["head dim", "D"], sba, q, torch.randn(1, 2, 8, 5), v)
    expect(ValueError, ["Hk", "k and v"], sba, q, k, torch.randn(1, 1, 8, 4))


def test_query_heads_not_a_multiple_of_kv_heads():
    q, k, v = qkv(Hq=3, Hk=2)
    expect(ValueError, ["Hq = 3", "Hk = 2", "multiple"], sba, q, k, v)


def test_bad_options():
    q, k, v = qkv()
    expect(TypeError, ["scale"], sba, q, k, v, scale="0.5")
    expect(TypeError, ["scale"], sba, q, k, v, scale=True)
    expect(ValueError, ["scale", "finite"], sba, q, k, v, scale=float("inf"))
    expect(TypeError, ["attend_current", "bool"], sba, q, k, v, attend_current=1)
    expect(TypeError, ["return_remainder", "bool"], sba, q, k, v, return_remainder="yes")
    expect(ValueError, ["backend", "'cuda'"], sba, q, k, v, backend="cuda")


def test_malformed_cu_seqlens():
    q, k, v = qkv(T=8)
    expect(TypeError, ["cu_seqlens", "torch.Tensor"], sba, q, k, v, cu_seqlens=[0, 8])
    expect(TypeError, ["cu_seqlens", "int"], sba, q, k, v, cu_seqlens=torch.tensor([0.0, 8.0]))
    expect(ValueError, ["cu_seqlens", "1-D"], sba, q, k, v, cu_seqlens=torch.tensor([[0, 8]]))
    expect(ValueError, ["cu_seqlens", "1-D"], sba, q, k, v, cu_seqlens=torch.tensor([0]))
    expect(ValueError, ["cu_seqlens", "T = 8"], sba, q, k, v, cu_seqlens=torch.tensor([0, 5, 7]))
    expect(ValueError, ["cu_seqlens", "from 0"], sba, q, k, v, cu_seqlens=torch.tensor([1, 5, 8]))
    expect(ValueError, ["cu_seqlens", "decreasing"], sba, q, k, v, cu_seqlens=torch.tensor([0, 6, 5, 8]))
    qb, kb, vb = qkv(B=2)
    expect(ValueError, ["cu_seqlens", "batch size must be 1"], sba, qb, kb, vb, cu_seqlens=torch.tensor([0, 8]))


def test_tensors_on_different_devices():
    q, k, v = qkv()
    meta = torch.randn(1, 2, 8, 4, device="meta")
    expect(ValueError, ["device"], sba, q, meta, v)
    expect(ValueError, ["cu_seqlens", "device"], sba, q, k, v, cu_seqlens=torch.tensor([0, 8], device="meta"))


def test_triton_on_cpu_without_interpreter_says_how_to_enable_it(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    expect(ValueError, ["backend='triton'", "CUDA", "TRITON_INTERPRET=1"], sba, q, k, v, backend="triton")


def test_triton_refuses_float64_with_a_way_out():
    q, k, v = qkv(dtype=torch.float64)
    expect(TypeError, ["backend='triton'", "float64", "backend='torch'"], sba, q, k, v, backend="triton")


def test_errors_come_before_any_computation(monkeypatch):
    calls = []
    monkeypatch.setattr(sb_ref.attention.StickBreakingFunction, "apply", lambda *a: calls.append(a))
    q, k, v = qkv(Hq=3, Hk=2)
    with pytest.raises(ValueError):
        sba(q, k, v)
    assert calls == []


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(embed_dim=10, num_heads=3), ValueError, ["embed_dim", "num_heads"]),
    (dict(embed_dim=12, num_heads=4, num_kv_heads=3), ValueError, ["num_heads", "num_kv_heads"]),
    (dict(embed_dim=12, num_heads=4, remainder="rest"), ValueError, ["remainder"]),
    (dict(embed_dim=12, num_heads=4, backend="gpu"), ValueError, ["backend"]),
    (dict(embed_dim=12, num_heads=0), ValueError, ["num_heads"]),
    (dict(embed_dim=12, num_heads=4, attend_current=None), TypeError, ["attend_current"]),
])
def test_layer_rejects_bad_configuration(kwargs, error, words):
    expect(error, words, sb_ref.StickBreakingSelfAttention, **kwargs)


def test_layer_rejects_bad_input_shape():
    layer = sb_ref.StickBreakingSelfAttention(12, 4)
    expect(ValueError, ["x", "(B, T, 12)"], layer, torch.randn(2, 5, 8))
    expect(ValueError, ["x"], layer, torch.randn(5, 12))


def test_a_missing_triton_is_named_with_the_way_out(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "triton" or name.startswith("triton.") or (level and name == "kernels"):
            raise ModuleNotFoundError("No module named 'triton'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(__import__("sys").modules, "sb_ref.kernels", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_triton)
    q, k, v = qkv()
    expect(ImportError, ["triton", "backend='torch'"], sba, q, k, v, backend="triton")
