"""sb_ref.stick_breaking_attention on the PyTorch backend, against the independent float64 reference."""
import pytest
import torch

import sb_ref
from reference import attention as reference_attention
from reference import rel_err
from sb_ref.testing import REGIMES, LargestAllocation, make_inputs

# DESIGN.md: (output and remainder, gradients) per input dtype
TOLERANCE = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 3e-5),
             torch.bfloat16: (2.5e-3, 3e-3), torch.float16: (2.5e-3, 3e-3)}


def check_against_reference(q, k, v, backend="torch", **kw):
    """Forward, remainder and gradients (through o and rem) against the reference; returns the errors."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True, backend=backend, **kw)
    assert o.dtype == q.dtype and o.shape == (*q.shape[:3], v.shape[-1])
    assert rem.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert rem.shape == q.shape[:3]
    g = torch.Generator().manual_seed(7)
    go = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)  # rounded like o, as autograd does
    grem = torch.randn(rem.shape, generator=g, dtype=torch.float64).to(rem.dtype)
    ((o * go).sum() + (rem * grem).sum()).backward()

    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    o_ref, rem_ref = reference_attention(qd, kd, vd, **kw)
    ((o_ref * go.double()).sum() + (rem_ref * grem.double()).sum()).backward()
    errors = {"o": rel_err(o, o_ref), "rem": rel_err(rem, rem_ref),
              "dq": rel_err(q.grad, qd.grad), "dk": rel_err(k.grad, kd.grad), "dv": rel_err(v.grad, vd.grad)}
    fwd_tol, grad_tol = TOLERANCE[q.dtype]
    for name, err in errors.items():
        assert err <= (fwd_tol if name in ("o", "rem") else grad_tol), f"{name}: {err:.2e} ({errors})"
    return errors


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attend_current", [False, True])
def test_accuracy_every_regime_and_dtype(regime, dtype, attend_current):
    q, k, v = make_inputs(regime, B=2, Hq=2, T=150, D=32, dtype=dtype, seed=11)
    check_against_reference(q, k, v, attend_current=attend_current)


def test_float16_inputs():
    q, k, v = make_inputs("random", T=70, D=16, dtype=torch.float16)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 129])
@pytest.mark.parametrize("attend_current", [False, True])
def test_lengths_around_the_block(T, attend_current):
    q, k, v = make_inputs("random", T=T, D=16, dtype=torch.float64, seed=T)
    check_against_reference(q, k, v, attend_current=attend_current)


@pytest.mark.parametrize("D, Dv", [(48, 48), (80, 24), (96, 128), (1, 3)])
def test_head_dims_not_powers_of_two_and_dv_differs(D, Dv):
    q, k, v = make_inputs("random", T=70, D=D, Dv=Dv, dtype=torch.float32)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("Hq, Hk", [(4, 2), (6, 1), (3, 3)])
def test_grouped_query_attention(Hq, Hk):
    q, k, v = make_inputs("random", Hq=Hq, Hk=Hk, T=90, D=16, dtype=torch.float64)
    check_against_reference(q, k, v, attend_current=True)


def test_grouped_query_attention_equals_repeated_heads():
    q, k, v = make_inputs("random", Hq=4, Hk=2, T=40, D=8, dtype=torch.float64)
    o = sb_ref.stick_breaking_attention(q, k, v, backend="torch")
    o_rep = sb_ref.stick_breaking_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                            backend="torch")
    torch.testing.assert_close(o, o_rep, rtol=0, atol=1e-14)


def test_scale():
    q, k, v = make_inputs("random", T=50, D=16, dtype=torch.float64)
    check_against_reference(q, k, v, scale=0.9)
    check_against_reference(q, k, v, scale=2)


@pytest.mark.parametrize("lengths", [[1, 5, 1, 70, 2], [0, 3, 0, 1], [64]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_varlen_matches_each_sequence_alone(lengths, dtype):
    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = make_inputs("random", Hq=2, Hk=1, T=T, D=16, dtype=dtype, seed=len(lengths))
    check_against_reference(q, k, v, cu_seqlens=cu, attend_current=False)
    o, rem = sb_ref.stick_breaking_attention(q, k, v, cu_seqlens=cu, return_remainder=True, backend="torch")
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            o_s, rem_s = sb_ref.stick_breaking_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                         return_remainder=True, backend="torch")
            torch.testing.assert_close(o[:, :, s:e], o_s, rtol=0, atol=1e-6)
            torch.testing.assert_close(rem[:, :, s:e], rem_s, rtol=0, atol=1e-6)
    # a sequence's first token sees nothing, whatever came before it in the pack
    starts = [s for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    assert (o[:, :, starts] == 0).all() and (rem[:, :, starts] == 1).all()


def test_gradcheck_float64():
    q, k, v = make_inputs("random", Hq=2, Hk=1, T=9, D=3, Dv=2, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True, backend="torch")
        return o, rem

    assert torch.autograd.gradcheck(f, (q, k, v))
    cu = torch.tensor([0, 4, 5, 9])
    assert torch.autograd.gradcheck(
        lambda q, k, v: sb_ref.stick_breaking_attention(q, k, v, cu_seqlens=cu, attend_current=True,
                                                        return_remainder=True, backend="torch"), (q, k, v))


def test_first_query_sees_nothing_unless_it_attends_to_itself():
    q, k, v = make_inputs("random", T=5, D=4, dtype=torch.float64)
    o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True)
    assert (o[:, :, 0] == 0).all() and (rem[:, :, 0] == 1).all()
    o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True, attend_current=True)
    assert (rem[:, :, 0] < 1).all()


def test_empty_sequence_returns_empty_outputs():
    q, k, v = (torch.randn(2, 3, 0, 8, requires_grad=True) for _ in range(3))
    o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True)
    assert o.shape == (2, 3, 0, 8) and rem.shape == (2, 3, 0) and rem.dtype == torch.float32
    o.sum().backward()
    assert q.grad.shape == q.shape


def test_nan_in_nan_out():
    q, k, v = make_inputs("random", T=20, D=8)
    q[0, 0, 10, 3] = float("nan")
    o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True)
    assert torch.isnan(o[0, 0, 10]).all() and torch.isnan(rem[0, 0, 10])
    assert not torch.isnan(o[0, 0, :10]).any() and not torch.isnan(o[0, 1]).any()


def test_backward_is_deterministic():
    grads = []
    for _ in range(2):
        q, k, v = make_inputs("random", Hq=4, Hk=2, T=130, D=16, requires_grad=True, seed=5)
        o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True)
        (o.square().sum() + rem.sum()).backward()
        grads.append([x.grad for x in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_no_tensor_of_size_T_squared_in_forward_or_backward():
    T = 2048
    q, k, v = make_inputs("random", B=1, Hq=1, T=T, D=16, requires_grad=True)
    with LargestAllocation() as probe:
        o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True, backend="torch")
        (o.sum() + rem.sum()).backward()
    assert probe.numel > 0 and q.grad is not None
    assert probe.numel < T * T / 8, f"largest allocation {probe.numel} elements {probe.shape} by {probe.op}"


def test_probe_sees_a_quadratic_implementation():
    T = 256
    q, k, v = make_inputs("random", B=1, Hq=1, T=T, D=16, requires_grad=True)
    with LargestAllocation() as probe:
        sb_ref.testing.oracle_attention(q, k, v)
    assert probe.numel >= T * T


def test_auto_backend_on_cpu_uses_pytorch():
    q, k, v = make_inputs("random", T=8, D=4, requires_grad=True)
    o = sb_ref.stick_breaking_attention(q, k, v)
    assert type(o.grad_fn).__name__ == "StickBreakingFunctionBackward"


@pytest.mark.parametrize("regime", REGIMES)
def test_float32_gradients_stay_accurate_over_long_sequences(regime):
    """dq sums the far keys' gradients over the whole sequence: any constant error per key would add up here."""
    q, k, v = make_inputs(regime, Hq=2, Hk=1, T=1024, D=32, seed=3)
    errors = check_against_reference(q, k, v)
    assert errors["dq"] < 3e-6 and errors["dk"] < 3e-6, errors
