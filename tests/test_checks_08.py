"""The checks of lesson 08 (sb_ref.testing.lessons.lesson08): the reference answers pass, each typical mistake fails
with a message that names it, a stub is "not attempted yet", and nothing reaches stderr."""
import statistics
import time

import pytest
import torch
import triton
import triton.language as tl

from sb_ref.testing import oracle_attention
from sb_ref.testing.lessons.lesson08 import check_attention_flops, check_fast_forward, check_median_ms

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxies of the speed check")


def stub(*args, **kwargs):
    raise NotImplementedError("stub: not written yet")


# ------------------------------------------------------------------------------------------------- attention_flops

def attention_flops(B, H, T, D, causal=True, backward=False):
    forward = 2 * B * H * T * T * D * (1 if causal else 2)
    return 2.5 * forward if backward else forward


@pytest.mark.parametrize("wrong, message", [
    (lambda B, H, T, D, causal=True, backward=False: 4 * B * H * T * T * D * (2.5 if backward else 1),
     "only the lower half"),
    (lambda B, H, T, D, causal=True, backward=False: 2 * B * H * T * T * D * (3.5 if backward else 1),
     "the backward alone"),
    (lambda B, H, T, D, causal=True, backward=False: 2 * B * H * T * T * D * (2.5 if backward else 1),
     "causal=False every query sees every key"),
    (lambda B, H, T, D, causal=True, backward=False: B * H * T * T * D * (1 if causal else 2) * (2.5 if backward else 1),
     "count both products"),
    (lambda B, H, T, D, causal=True, backward=False: "many", "should return a number"),
])
def test_attention_flops_mistakes(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_attention_flops(wrong)


def test_attention_flops_right_and_stub(capfd):
    check_attention_flops(attention_flops)
    check_attention_flops(attention_flops, seed=8)
    with pytest.raises(AssertionError, match="not attempted yet"):
        check_attention_flops(stub)
    out, err = capfd.readouterr()
    assert "check_attention_flops: passed" in out and err == ""


# ------------------------------------------------------------------------------------------------------ median_ms

def median_ms(fn, *args, warmup=3, reps=10):
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed_calls(fn, args, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def mean_ms(fn, *args, warmup=3, reps=10):
    timed_calls(fn, args, warmup)
    return statistics.mean(timed_calls(fn, args, reps))


def no_warmup(fn, *args, warmup=3, reps=10):
    return statistics.median(timed_calls(fn, args, reps))


def warmup_counted(fn, *args, warmup=3, reps=10):
    return statistics.median(timed_calls(fn, args, warmup + reps))


def seconds(fn, *args, warmup=3, reps=10):
    return median_ms(fn, *args, warmup=warmup, reps=reps) / 1e3


def drops_args(fn, *args, warmup=3, reps=10):
    return median_ms(lambda *_: fn(), warmup=warmup, reps=reps)


@pytest.mark.parametrize("wrong, message", [
    (mean_ms, "the mean of the timed calls"),
    (no_warmup, "called 5 times, expected warmup \\+ reps = 6"),
    (warmup_counted, "the median over the warm-up calls too"),
    (seconds, "in seconds instead of milliseconds"),
    (drops_args, "did not get the arguments"),
])
def test_median_ms_mistakes(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_median_ms(wrong)


def test_median_ms_right_and_stub(capfd):
    check_median_ms(median_ms)
    check_median_ms(median_ms, seed=5)
    with pytest.raises(AssertionError, match="not attempted yet"):
        check_median_ms(stub)
    out, err = capfd.readouterr()
    assert "check_median_ms: passed" in out and err == ""


# --------------------------------------------------------------------------------------------------- fast_forward

@triton.jit
def _forward_kernel(Q, K, V, O, T, D, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    SKIP: tl.constexpr):
    """The lesson's forward: SKIP starts the key loop at the diagonal block, otherwise it sweeps every key block."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    base = pid_bh * T * D
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_q = (o_m[:, None] < T) & (o_d[None, :] < D)
    q = tl.load(Q + base + o_m[:, None] * D + o_d[None, :], mask=m_q, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    if SKIP:
        n_blocks = tl.cdiv(tl.minimum((pid_m + 1) * BLOCK_M, T), BLOCK_N)
    else:
        n_blocks = tl.cdiv(T, BLOCK_N)
    for it in range(0, n_blocks):
        o_n = (n_blocks - 1 - it) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_kv = (o_n[:, None] < T) & (o_d[None, :] < D)
        k = tl.load(K + base + o_n[:, None] * D + o_d[None, :], mask=m_kv, other=0.0)
        v = tl.load(V + base + o_n[:, None] * D + o_d[None, :], mask=m_kv, other=0.0)
        z = scale * tl.dot(q, tl.trans(k)).to(tl.float32)
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        visible = o_n[None, :] < o_m[:, None]
        log_keep = tl.where(visible, -tl.maximum(z, 0.0) - log1p_e, 0.0)
        log_a = tl.minimum(z, 0.0) - log1p_e + carry[:, None] + tl.cumsum(log_keep, axis=1, reverse=True) - log_keep
        acc += tl.dot(tl.where(visible, tl.exp(log_a), 0.0), v.to(tl.float32))
        carry += tl.sum(log_keep, axis=1)
    tl.store(O + base + o_m[:, None] * D + o_d[None, :], acc.to(O.dtype.element_ty), mask=m_q)


def _launch(q, k, v, skip, block=16):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T, D = q.shape
    o = torch.empty_like(q)
    _forward_kernel[(triton.cdiv(T, block), B * H)](q, k, v, o, T, D, D ** -0.5, BLOCK_M=block, BLOCK_N=block,
                                                    BLOCK_D=triton.next_power_of_2(D), SKIP=skip)
    return o


def fast_forward(q, k, v):
    return _launch(q, k, v, True)


def sweeping_forward(q, k, v):
    return _launch(q, k, v, False)


def quadratic_forward(q, k, v):
    return oracle_attention(q, k, v)[0].to(q.dtype)


def off_by_a_bit(q, k, v):
    return fast_forward(q, k, v) * 1.001


def with_remainder(q, k, v):
    return fast_forward(q, k, v), None


@CPU_ONLY
def test_fast_forward_right_and_stub(capfd):
    score = check_fast_forward(fast_forward)
    assert score == 3 and "no GPU" in score.note and "key elements loaded 62%" in score.note
    with pytest.raises(AssertionError, match="not attempted yet"):
        check_fast_forward(stub)
    out, err = capfd.readouterr()
    assert "check_fast_forward: numerics passed" in out and err == ""


@CPU_ONLY
@pytest.mark.parametrize("wrong, message", [
    (sweeping_forward, "(?s)of a sweep over every key tile.*Start the key loop at the diagonal block"),
    (quadratic_forward, "allocates a tensor of .* at least T\\*T"),
    (off_by_a_bit, "(?s)o is wrong for regime='random'.*worst entry at index"),
    (with_remainder, "should return o alone"),
])
def test_fast_forward_mistakes(wrong, message, capfd):
    with pytest.raises(AssertionError, match=message):
        check_fast_forward(wrong)
    assert capfd.readouterr().err == ""
