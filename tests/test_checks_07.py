"""Lesson 07's checks (sb_ref.testing.lessons.lesson07): the reference solution passes, each typical mistake fails with
the message meant for it, a stub is "not attempted yet", and nothing reaches stderr. The kernels run through Triton's
interpreter on the CPU (conftest switches it on), at the checks' small sizes."""
import pytest
import torch
import triton
import triton.language as tl

import sb_ref
from sb_ref.testing.lessons import lesson07

# ------------------------------------------------------------------------------------------------- exercise 1


def dl_and_dz(z, v, dO, g, attend_current=False, mistake=None):
    T = z.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool).tril(0 if attend_current else -1)
    A = sb_ref.stick_breaking_weights(z, attend_current=attend_current)
    beta = torch.sigmoid(z).masked_fill(~seen, 0.0)
    dl = A * (dO @ v.transpose(-1, -2))
    if mistake == "no_A":
        dl = (dO @ v.transpose(-1, -2)).masked_fill(~seen, 0.0)
    C = dl.cumsum(-1) - dl
    if mistake == "nearer":
        C = dl.flip(-1).cumsum(-1).flip(-1) - dl
    elif mistake == "inclusive":
        C = dl.cumsum(-1)
    if mistake == "no_g":
        g = torch.zeros_like(g)
    dz = dl * (1 - beta) - beta * (C + g[..., None])
    return dl, dz.masked_fill(~seen, 0.0)


def test_dl_and_dz_right(capsys):
    lesson07.check_dl_and_dz(dl_and_dz)
    out, err = capsys.readouterr()
    assert "check_dl_and_dz: passed" in out and err == ""


@pytest.mark.parametrize("mistake, message", [
    ("no_A", "you left out A"), ("nearer", "FARTHER than j"), ("inclusive", "(exclusive)"),
    ("no_g", "the remainder's gradient is missing")])
def test_dl_and_dz_mistakes(mistake, message, capsys):
    with pytest.raises(AssertionError) as info:
        lesson07.check_dl_and_dz(lambda *a, **kw: dl_and_dz(*a, **kw, mistake=mistake))
    assert message in str(info.value) and "regime=" in str(info.value)
    assert capsys.readouterr().err == ""


def stub(*args, **kwargs):
    raise NotImplementedError("stub: replace this line with your code")


def test_dl_and_dz_stub():
    with pytest.raises(AssertionError, match="not attempted yet"):
        lesson07.check_dl_and_dz(stub)


# ------------------------------------------------------------------------------------------------- the kernels
# MISTAKE: 0 none, 1 no g in dz, 2 an inclusive in-tile scan of dl, 3 the carries never written back (dk/dv),
# 4 the kernel body is still a stub

@triton.jit
def _log1p_small(e):
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _tile_weights(q, k, W, offs_m, offs_n, T, scale, ATTEND_CURRENT: tl.constexpr):
    z = scale * tl.dot(q, tl.trans(k), input_precision="ieee")
    i = offs_m[:, None]
    j = offs_n[None, :]
    if ATTEND_CURRENT:
        visible = (j <= i) & (i < T)
    else:
        visible = (j < i) & (i < T)
    log1p = _log1p_small(tl.exp(-tl.abs(z)))
    log_beta = tl.minimum(z, 0.0) - log1p
    log_keep = tl.where(visible, -tl.maximum(z, 0.0) - log1p, 0.0)
    log_A = log_beta + W[:, None] + (tl.cumsum(log_keep, axis=1, reverse=True) - log_keep)
    return tl.where(visible, tl.exp(log_A), 0.0), tl.where(visible, tl.exp(log_beta), 0.0), log_keep


@triton.jit
def _dz(dl, beta, delta, R, g, MISTAKE: tl.constexpr):
    tile_sum = tl.sum(dl, axis=1)
    if MISTAKE == 2:
        C = (delta - R - tile_sum)[:, None] + tl.cumsum(dl, axis=1)
    else:
        C = (delta - R - tile_sum)[:, None] + (tl.cumsum(dl, axis=1) - dl)
    if MISTAKE == 1:
        return dl * (1.0 - beta) - beta * C
    return dl * (1.0 - beta) - beta * (C + g[:, None])


@triton.jit
def _dq_kernel(Q, K, V, DO, G, DQ, DELTA, T, D, DV, scale, ATTEND_CURRENT: tl.constexpr, MISTAKE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    if MISTAKE == 4:
        raise NotImplementedError("dq_kernel: not written yet (see the task above)")
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_row = offs_m < T
    q = tl.load(Q + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=m_row[:, None] & (offs_d[None, :] < D),
                other=0.0)
    do = tl.load(DO + bh * T * DV + offs_m[:, None] * DV + offs_dv[None, :],
                 mask=m_row[:, None] & (offs_dv[None, :] < DV), other=0.0)
    g = tl.load(G + bh * T + offs_m, mask=m_row, other=0.0)
    n_blocks = tl.cdiv(tl.minimum((tl.program_id(1) + 1) * BLOCK_M, T), BLOCK_N)
    W = tl.zeros([BLOCK_M], dtype=tl.float32)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for step in range(0, n_blocks):
        offs_n = (n_blocks - 1 - step) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_col = offs_n < T
        k = tl.load(K + bh * T * D + offs_n[:, None] * D + offs_d[None, :],
                    mask=m_col[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + bh * T * DV + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=m_col[:, None] & (offs_dv[None, :] < DV), other=0.0)
        A, beta, log_keep = _tile_weights(q, k, W, offs_m, offs_n, T, scale, ATTEND_CURRENT)
        delta += tl.sum(A * tl.dot(do, tl.trans(v), input_precision="ieee"), axis=1)
        W += tl.sum(log_keep, axis=1)
    W = tl.zeros([BLOCK_M], dtype=tl.float32)
    R = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for step in range(0, n_blocks):
        offs_n = (n_blocks - 1 - step) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_col = offs_n < T
        k = tl.load(K + bh * T * D + offs_n[:, None] * D + offs_d[None, :],
                    mask=m_col[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + bh * T * DV + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=m_col[:, None] & (offs_dv[None, :] < DV), other=0.0)
        A, beta, log_keep = _tile_weights(q, k, W, offs_m, offs_n, T, scale, ATTEND_CURRENT)
        dl = A * tl.dot(do, tl.trans(v), input_precision="ieee")
        dq += tl.dot(_dz(dl, beta, delta, R, g, MISTAKE), k, input_precision="ieee")
        R += tl.sum(dl, axis=1)
        W += tl.sum(log_keep, axis=1)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], scale * dq,
             mask=m_row[:, None] & (offs_d[None, :] < D))
    tl.store(DELTA + bh * T + offs_m, delta, mask=m_row)


def _blocks(D, Dv):
    return max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))


def sb_backward_dq(q, k, v, do, g, attend_current=False, BLOCK_M=16, BLOCK_N=16, mistake=0):
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    q, k, v, do, g = (x.contiguous().float() for x in (q, k, v, do, g))
    dq = torch.empty(B, H, T, D, device=q.device)
    delta = torch.empty(B, H, T, device=q.device)
    BLOCK_D, BLOCK_DV = _blocks(D, Dv)
    _dq_kernel[(B * H, triton.cdiv(T, BLOCK_M))](q, k, v, do, g, dq, delta, T, D, Dv, D ** -0.5, attend_current,
                                                mistake, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    return dq, delta


@triton.jit
def _dkdv_kernel(Q, K, V, DO, G, DELTA, W_CARRY, R_CARRY, DK, DV_OUT, T, D, DV, scale, ATTEND_CURRENT: tl.constexpr,
                 MISTAKE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
    bh = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_key_blocks = tl.cdiv(T, BLOCK_N)
    for step in range(0, n_key_blocks):
        offs_n = (n_key_blocks - 1 - step) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_col = offs_n < T
        k = tl.load(K + bh * T * D + offs_n[:, None] * D + offs_d[None, :],
                    mask=m_col[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + bh * T * DV + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=m_col[:, None] & (offs_dv[None, :] < DV), other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for mb in range((n_key_blocks - 1 - step) * BLOCK_N // BLOCK_M, tl.cdiv(T, BLOCK_M)):
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_row = offs_m < T
            q = tl.load(Q + bh * T * D + offs_m[:, None] * D + offs_d[None, :],
                        mask=m_row[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(DO + bh * T * DV + offs_m[:, None] * DV + offs_dv[None, :],
                         mask=m_row[:, None] & (offs_dv[None, :] < DV), other=0.0)
            g = tl.load(G + bh * T + offs_m, mask=m_row, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=m_row, other=0.0)
            W = tl.load(W_CARRY + bh * T + offs_m, mask=m_row, other=0.0)
            R = tl.load(R_CARRY + bh * T + offs_m, mask=m_row, other=0.0)
            A, beta, log_keep = _tile_weights(q, k, W, offs_m, offs_n, T, scale, ATTEND_CURRENT)
            dl = A * tl.dot(do, tl.trans(v), input_precision="ieee")
            dv += tl.dot(tl.trans(A), do, input_precision="ieee")
            dk += tl.dot(tl.trans(_dz(dl, beta, delta, R, g, MISTAKE)), q, input_precision="ieee")
            if MISTAKE != 3:
                tl.store(W_CARRY + bh * T + offs_m, W + tl.sum(log_keep, axis=1), mask=m_row)
                tl.store(R_CARRY + bh * T + offs_m, R + tl.sum(dl, axis=1), mask=m_row)
        tl.debug_barrier()
        tl.store(DK + bh * T * D + offs_n[:, None] * D + offs_d[None, :], scale * dk,
                 mask=m_col[:, None] & (offs_d[None, :] < D))
        tl.store(DV_OUT + bh * T * DV + offs_n[:, None] * DV + offs_dv[None, :], dv,
                 mask=m_col[:, None] & (offs_dv[None, :] < DV))


def sb_backward_dkdv(q, k, v, do, g, delta, attend_current=False, BLOCK_M=16, BLOCK_N=16, mistake=0):
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    q, k, v, do, g, delta = (x.contiguous().float() for x in (q, k, v, do, g, delta))
    dk = torch.empty(B, H, T, D, device=q.device)
    dv = torch.empty(B, H, T, Dv, device=q.device)
    W = torch.zeros(B * H, T, device=q.device)
    R = torch.zeros(B * H, T, device=q.device)
    BLOCK_D, BLOCK_DV = _blocks(D, Dv)
    _dkdv_kernel[(B * H,)](q, k, v, do, g, delta, W, R, dk, dv, T, D, Dv, D ** -0.5, attend_current, mistake,
                           BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    return dk, dv


def test_dq_right(capsys):
    lesson07.check_dq(sb_backward_dq)
    out, err = capsys.readouterr()
    assert "check_dq: passed" in out and err == ""


def test_dkdv_right(capsys):
    lesson07.check_dkdv(sb_backward_dkdv)
    out, err = capsys.readouterr()
    assert "check_dkdv: passed" in out and err == ""


@pytest.mark.parametrize("check, fn", [(lesson07.check_dq, sb_backward_dq), (lesson07.check_dkdv, sb_backward_dkdv)])
@pytest.mark.parametrize("mistake, message", [(1, "without the remainder's gradient"), (2, "tl.cumsum(dl, 1) - dl")])
def test_kernel_mistakes(check, fn, mistake, message, capsys):
    with pytest.raises(AssertionError) as info:
        check(lambda *a, **kw: fn(*a, **kw, mistake=mistake), regimes=("random",))
    text = str(info.value)
    assert message in text and "is wrong for regime='random'" in text and "BLOCK_M=16" in text
    assert capsys.readouterr().err == ""


def test_dkdv_without_carries():
    with pytest.raises(AssertionError) as info:
        lesson07.check_dkdv(lambda *a, **kw: sb_backward_dkdv(*a, **kw, mistake=3), regimes=("random",))
    assert "dv is wrong" in str(info.value) and "carries W and R" in str(info.value)


def test_kernel_stubs():
    for check in (lesson07.check_dq, lesson07.check_dkdv):
        with pytest.raises(AssertionError, match="not attempted yet. `stub` still raises"):
            check(stub)
    with pytest.raises(AssertionError, match="not attempted yet. the kernel that `<lambda>` launches still raises"):
        lesson07.check_dq(lambda *a, **kw: sb_backward_dq(*a, **kw, mistake=4))


# ------------------------------------------------------------------------------------------------- exercise 4

class SBAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attend_current, mistake=None):
        o, rem = sb_ref.stick_breaking_attention(q, k, v, attend_current=attend_current, return_remainder=True)
        ctx.save_for_backward(q, k, v, rem)
        ctx.attend_current, ctx.mistake = attend_current, mistake
        return o, rem

    @staticmethod
    def backward(ctx, do, drem):
        q, k, v, rem = ctx.saved_tensors
        if ctx.mistake == "stub":
            raise NotImplementedError("backward: replace this line with your code")
        g = drem * rem if ctx.mistake != "no_rem" else torch.zeros_like(rem)
        dq, delta = sb_backward_dq(q, k, v, do, g, ctx.attend_current)
        dk, dv = sb_backward_dkdv(q, k, v, do, g, delta, ctx.attend_current)
        if ctx.mistake == "noisy":
            dq = dq + 1e-9 * torch.randn_like(dq)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def sb_attention(q, k, v, attend_current=False):
    return SBAttention.apply(q, k, v, attend_current)


def test_sb_attention_right(capsys):
    lesson07.check_sb_attention(sb_attention)
    out, err = capsys.readouterr()
    assert "check_sb_attention: passed" in out and "deterministic" in out and err == ""


@pytest.mark.parametrize("mistake, message", [
    ("no_rem", "dq is wrong for regime='random'"), ("noisy", "differs between two identical backward passes"),
    ("stub", "not attempted yet. `backward` (or a launcher or kernel it calls) still raises")])
def test_sb_attention_mistakes(mistake, message, capsys):
    def wrong(q, k, v, attend_current=False):
        return SBAttention.apply(q, k, v, attend_current, mistake)
    with pytest.raises(AssertionError) as info:
        lesson07.check_sb_attention(wrong, regimes=("random",))
    assert message in str(info.value)
    assert capsys.readouterr().err == ""


def test_sb_attention_detached():
    def detached(q, k, v, attend_current=False):
        o, rem = sb_ref.stick_breaking_attention(q.detach(), k.detach(), v.detach(), return_remainder=True)
        return o, rem
    with pytest.raises(AssertionError, match="must be differentiable in q, k, v"):
        lesson07.check_sb_attention(detached, regimes=("random",))
