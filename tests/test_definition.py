"""The numpy definition (sb_ref.naive) and the stable weight matrix (sb_ref.stick_breaking_weights)."""
import numpy as np
import pytest
import torch

import sb_ref
from reference import weights_logspace, weights_loops

REGIME_LOGITS = {
    "random": lambda g, T: torch.randn(T, T, generator=g, dtype=torch.float64),
    "long": lambda g, T: -8 + 0.3 * torch.randn(T, T, generator=g, dtype=torch.float64),
    "saturated": lambda g, T: 50 * (2 * torch.rand(T, T, generator=g, dtype=torch.float64) - 1),
}


@pytest.mark.parametrize("regime", REGIME_LOGITS)
@pytest.mark.parametrize("attend_current", [False, True])
def test_naive_weights_match_the_loops(regime, attend_current):
    z = REGIME_LOGITS[regime](torch.Generator().manual_seed(1), 12)
    A = sb_ref.naive.stick_breaking_weights(z.numpy(), attend_current=attend_current)
    np.testing.assert_allclose(A, weights_loops(z, attend_current).numpy(), rtol=1e-12, atol=1e-300)


def test_naive_weights_of_zero_logits_halve_the_stick():
    A = sb_ref.naive.stick_breaking_weights(np.zeros((4, 4)))
    np.testing.assert_allclose(A[3], [0.125, 0.25, 0.5, 0.0])
    np.testing.assert_allclose(A[0], 0.0)


def test_naive_weights_accept_batches():
    z = np.random.default_rng(0).normal(size=(2, 3, 5, 5))
    A = sb_ref.naive.stick_breaking_weights(z, attend_current=True)
    np.testing.assert_allclose(A[1, 2], weights_loops(torch.from_numpy(z[1, 2]), True).numpy(), rtol=1e-12)


@pytest.mark.parametrize("attend_current", [False, True])
def test_naive_attention_matches_reference(attend_current):
    from reference import attention
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    o, rem = sb_ref.naive.stick_breaking_attention(q.numpy(), k.numpy(), v[..., :3].numpy(), scale=0.7,
                                                   attend_current=attend_current)
    o_ref, rem_ref = attention(q[None], k[None], v[None, ..., :3], scale=0.7, attend_current=attend_current)
    np.testing.assert_allclose(o, o_ref[0].numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rem, rem_ref[0].numpy(), rtol=1e-12)
    # the stick is shared out: weights plus remainder make exactly 1
    A = sb_ref.naive.stick_breaking_weights(0.7 * q[0].numpy() @ k[0].numpy().T, attend_current)
    np.testing.assert_allclose(A.sum(-1) + rem[0], 1.0, rtol=1e-12)


def test_naive_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        sb_ref.naive.stick_breaking_weights(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="q"):
        sb_ref.naive.stick_breaking_attention(np.zeros((3, 4)), np.zeros((2, 4)), np.zeros((3, 4)))


@pytest.mark.parametrize("regime", REGIME_LOGITS)
@pytest.mark.parametrize("attend_current", [False, True])
def test_stable_weights_match_the_loops_in_float64(regime, attend_current):
    z = REGIME_LOGITS[regime](torch.Generator().manual_seed(3), 40)
    A = sb_ref.stick_breaking_weights(z, attend_current=attend_current)
    ref = weights_loops(z, attend_current)
    assert A.dtype == torch.float64
    assert float((A - ref).norm() / ref.norm()) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stable_weights_keep_their_dtype_and_stay_finite_at_huge_logits(dtype):
    z = torch.tensor([[0.0, 0.0, 0.0], [80.0, 0.0, 0.0], [-80.0, 80.0, 0.0]]).to(dtype)
    A = sb_ref.stick_breaking_weights(z)
    assert A.dtype == dtype and torch.isfinite(A).all()
    ref = weights_loops(z.double())
    assert torch.allclose(A.double(), ref, atol=1e-3)


def test_stable_weights_rows_sum_to_at_most_one_and_never_see_the_future():
    z = torch.randn(3, 64, 64, dtype=torch.float64)
    A = sb_ref.stick_breaking_weights(z)
    assert (A.sum(-1) <= 1 + 1e-12).all()
    assert (A.triu() == 0).all()
    assert float((A - weights_logspace(z)).abs().max()) < 1e-15


def test_stable_weights_gradcheck():
    z = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sb_ref.stick_breaking_weights(x, attend_current=True), (z,))


@pytest.mark.parametrize("bad, error, words", [
    ([[0.0]], TypeError, "logits"),
    (torch.zeros(3, 3, dtype=torch.int64), TypeError, "floating"),
    (torch.zeros(3, 4), ValueError, "(..., T, T)"),
])
def test_stable_weights_reject_bad_logits(bad, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        sb_ref.stick_breaking_weights(bad)
