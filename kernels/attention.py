"""Stick-breaking attention in Triton: forward, deterministic backward, autograd wrapper and launchers.

    A_ij = beta_ij * prod_{j<k<i} (1 - beta_ik),   beta_ij = sigmoid(scale * q_i . k_j)
    o_i = sum_j A_ij v_j,   rem_i = prod_j (1 - beta_ij)

The story, in the order of this file (kernels/README.md has the derivations):

1. ``_log_sigmoids``: log(beta) and log(1 - beta) of a tile of logits, accurate to float32 everywhere.
2. ``_fwd_kernel``: a program owns a query block and walks key blocks from the diagonal back to the start of its
   sequence, carrying per row S = sum of log(1 - beta) over the keys already visited. Inside a tile
   log A = log beta + S + (reverse exclusive cumsum of log(1 - beta) along the keys), all in base 2.
3. ``_bwd_dq_kernel`` (query-major): walk 1 recomputes dl = A * (dO . v) and stores, at every chunk boundary, the
   carries (W, R) = (sum log(1 - beta), sum dl) of the keys right of the boundary; at the end delta = sum dl.
   Walk 2 recomputes the tiles once more and accumulates dq with C = delta - R.
4. ``_bwd_dkdv_kernel`` (key-major): one program per (chunk of keys, kv-head) walks its key blocks right to left;
   for each, all later query blocks of every q-head of the GQA group. The carries of the query rows come from
   the chunk's slice of the table, which this program alone reads and rewrites: no atomics, deterministic.
5. ``torch.library.custom_op`` registration (forward, backward, fakes, autograd) and the public function.

Every kernel runs compiled on a GPU and under TRITON_INTERPRET=1 on the CPU, where bfloat16 arithmetic is not
trustworthy: there every tile is upcast to float32 right after its load (and products fed to a dot are rounded
to the input dtype first, so the interpreter sees the same roundings as the GPU).
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------------------------
# 1. log(beta) and log(1 - beta) without log(sigmoid)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _log_sigmoids(z, SHORT: tl.constexpr):
    """For base-2 logits z = log2(e) * scale * q.k, returns (log2 beta, log2(1 - beta), e, r) with e = exp(-|logit|)
    and r = 1 / (1 + e). Working in base 2 lets every exp be a bare exp2 (the scale absorbs log2(e))."""
    # softplus(x) = max(x, 0) + log1p(e): log beta = -softplus(-x) = min(x, 0) - log1p(e), log(1-beta) = -softplus(x)
    e = tl.exp2(-tl.abs(z))
    # log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3]: an odd series, float32-exact to s^15 (next term < 2e-9)
    # and to 1.5e-7 at s^11 (enough under 16-bit inputs, SHORT); it needs no log, whose fast GPU version is only
    # absolutely accurate near 1 (logits near -8 need a relative 1e-7)
    s = e / (2.0 + e)
    s2 = s * s
    if SHORT:
        p = s2 * 0.09090909090909091 + 0.1111111111111111
    else:
        p = s2 * 0.06666666666666667 + 0.07692307692307693
        p = p * s2 + 0.09090909090909091
        p = p * s2 + 0.1111111111111111
    p = p * s2 + 0.14285714285714285
    p = p * s2 + 0.2
    p = p * s2 + 0.3333333333333333
    p = p * s2 + 1.0
    # 2 atanh(s), in base 2
    l1p = 2.8853900817779268 * s * p
    log_beta = tl.minimum(z, 0.0) - l1p
    log_om = -tl.maximum(z, 0.0) - l1p
    # 1 / (1 + e): beta = r for z >= 0 and e * r below (and 1 - beta the other way round); used by the backward
    r = 1.0 / (1.0 + e)
    return log_beta, log_om, e, r


@triton.jit
def _round(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Rounds a float32 tile to DTYPE (to nearest even, as the GPU does); the interpreter keeps it in float32."""
    if UPCAST:
        if DTYPE == tl.bfloat16:
            # the interpreter truncates float32 -> bfloat16: round the bits to nearest even by hand
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return tl.where(x == x, b.to(tl.float32, bitcast=True), x)
        else:
            return x.to(DTYPE).to(tl.float32)
    else:
        return x.to(DTYPE)


@triton.jit
def _dot_split(a, b, acc, DTYPE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for a float32 tile a; with SPLIT, a = hi + lo in two 16-bit parts (two tensor-core products),
    so that a is carried to ~16 bits instead of 8: a single bf16 rounding of A alone costs ~1.5e-3 in o."""
    a_hi = _round(a, DTYPE, UPCAST)
    acc = tl.dot(a_hi, b, acc, input_precision=PRECISION)
    if SPLIT:
        a_lo = _round(a - a_hi.to(tl.float32), DTYPE, UPCAST)
        acc = tl.dot(a_lo, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _tri(BLOCK: tl.constexpr, AXIS: tl.constexpr, INCLUSIVE: tl.constexpr, DTYPE: tl.constexpr,
         UPCAST: tl.constexpr):
    """The 0/1 matrix that turns a product into a reverse cumsum over keys: x @ U along axis 1, U @ x along 0."""
    o_r = tl.arange(0, BLOCK)[:, None]
    o_c = tl.arange(0, BLOCK)[None, :]
    if AXIS == 1:
        m = (o_r >= o_c) if INCLUSIVE else (o_r > o_c)  # U[k, j]: key k is at or after key j
    else:
        m = (o_c >= o_r) if INCLUSIVE else (o_c > o_r)
    if UPCAST:
        return m.to(tl.float32)
    else:
        return m.to(DTYPE)


@triton.jit
def _tri_dot(part, TRI, acc, AXIS: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        part = part.to(tl.float32)
    if AXIS == 1:
        return tl.dot(part, TRI, acc)
    else:
        return tl.dot(TRI, part, acc)


@triton.jit
def _rcumsum(x, TRI, AXIS: tl.constexpr, INCLUSIVE: tl.constexpr, PARTS: tl.constexpr, UPCAST: tl.constexpr):
    """Reverse cumsum of a float32 tile along the key axis (exclusive or inclusive, as TRI was built).

    PARTS == 0: tl.cumsum, an exact float32 scan that costs a dozen warp shuffles per element.
    PARTS == 2: x = hi + lo in float16 (22 significant bits) through two tensor-core products with TRI; for
                log(1 - beta), clamped to the float16 range (a key past -6e4 leaves exp(...) = 0 either way).
    PARTS == 3: x = hi + mid + lo in bfloat16 (24 bits, the full float32 range): for dl, whose scale is the user's.
    """
    if PARTS == 0:
        c = tl.cumsum(x, axis=AXIS, reverse=True)
        if not INCLUSIVE:
            c = c - x
    elif PARTS == 2:
        xc = tl.minimum(tl.maximum(x, -60000.0), 60000.0)
        hi = xc.to(tl.float16)
        lo = (xc - hi.to(tl.float32)).to(tl.float16)
        c = _tri_dot(hi, TRI, None, AXIS, UPCAST)
        c = _tri_dot(lo, TRI, c, AXIS, UPCAST)
    else:
        hi = x.to(tl.bfloat16)
        r = x - hi.to(tl.float32)
        mid = r.to(tl.bfloat16)
        lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
        c = _tri_dot(hi, TRI, None, AXIS, UPCAST)
        c = _tri_dot(mid, TRI, c, AXIS, UPCAST)
        c = _tri_dot(lo, TRI, c, AXIS, UPCAST)
    return c


@triton.jit
def _load_tile(P, o_r, o_c, s_r, s_c, m_r, N_C: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """Loads a [rows, BLOCK_C] tile, rows masked by m_r, columns past N_C (head-dim padding) as zeros."""
    p = P + o_r[:, None] * s_r + o_c[None, :] * s_c
    if N_C == BLOCK_C:
        b = tl.load(p, mask=m_r[:, None], other=0.0)
    else:
        b = tl.load(p, mask=m_r[:, None] & (o_c[None, :] < N_C), other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    return b


@triton.jit
def _seq_bounds(CU, i_n, T, VARLEN: tl.constexpr):
    """[start, end) of the program's sequence: a cu_seqlens entry for packed batches, else the whole length."""
    if VARLEN:
        seq_start = tl.load(CU + i_n).to(tl.int32)
        seq_end = tl.load(CU + i_n + 1).to(tl.int32)
    else:
        seq_start = 0
        seq_end = T
    return seq_start, seq_end


# ---------------------------------------------------------------------------------------------------------------
# 2. forward
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(b_o, b_s, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start, seq_end, nb_lo, nb_hi, qk_scale,
               D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_A: tl.constexpr,
               SPLIT_DZ: tl.constexpr, SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for it in range(nb_hi - nb_lo):
        # right to left: the carry b_s holds the keys between this block and the query
        o_n = seq_start + (nb_hi - 1 - it) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = _load_tile(K, o_n, o_d, s_kt, s_kd, m_n, D, BLOCK_D, UPCAST)
        b_v = _load_tile(V, o_n, o_dv, s_vt, s_vd, m_n, DV, BLOCK_DV, UPCAST)
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_lb, b_lom, _, _ = _log_sigmoids(b_z, DOT_DTYPE != tl.float32)
        if MASKED:
            # only blocks that cross the diagonal need the causal mask
            if ATTEND_CURRENT:
                m_vis = o_n[None, :] <= o_m[:, None]
            else:
                m_vis = o_n[None, :] < o_m[:, None]
            b_lom = tl.where(m_vis, b_lom, 0.0)
        # sum over the nearer keys of this tile (k > j): reverse exclusive cumsum
        b_cum = _rcumsum(b_lom, TRI_L, 1, False, SCAN_L, UPCAST)
        b_a = tl.exp2(b_lb + (b_s[:, None] + b_cum))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        b_o = _dot_split(b_a, b_v, b_o, DOT_DTYPE, UPCAST, SPLIT_A, PRECISION)
        b_s += tl.sum(b_lom, axis=1)
    return b_o, b_s


@triton.jit
def _fwd_kernel(Q, K, V, O, REM, CU, scale, T,
                s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                s_ob, s_oh, s_ot, s_od,
                H, GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr,
                VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
                DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_DZ: tl.constexpr,
                SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # heaviest (last) query blocks first; axis 1 enumerates (batch, sequence, head)
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bnh = tl.program_id(1)
    i_h = i_bnh % H
    i_n = (i_bnh // H) % N_SEQ
    i_b = i_bnh // (H * N_SEQ)
    seq_start, seq_end = _seq_bounds(CU, i_n, T, VARLEN)
    # logits in base 2: exp2 and log2 throughout, one multiply folded into the scale
    qk_scale = scale * 1.4426950408889634
    m0 = seq_start + i_m * BLOCK_M

    Q += i_b * s_qb + i_h * s_qh
    K += i_b * s_kb + (i_h // GROUP) * s_kh
    V += i_b * s_vb + (i_h // GROUP) * s_vh
    O += i_b * s_ob + i_h * s_oh
    REM += (i_b * H + i_h) * T

    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < seq_end
    b_q = _load_tile(Q, o_m, tl.arange(0, BLOCK_D), s_qt, s_qd, m_m, D, BLOCK_D, UPCAST)
    b_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    TRI_L = _tri(BLOCK_N, 1, False, tl.float16, UPCAST)

    # key blocks [0, nb_hi) hold every key a row of this block may see; those from nb_full on cross the diagonal
    nb_hi = tl.where(m0 < seq_end, tl.cdiv(tl.minimum(m0 + BLOCK_M, seq_end) - seq_start, BLOCK_N), 0)
    nb_full = tl.minimum((m0 - seq_start) // BLOCK_N, nb_hi)
    b_o, b_s = _fwd_inner(b_o, b_s, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start, seq_end, nb_full, nb_hi,
                          qk_scale, D, DV, True, ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ,
                          SCAN_L, SCAN_DL,
                          BLOCK_N, BLOCK_D, BLOCK_DV)
    b_o, b_s = _fwd_inner(b_o, b_s, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start, seq_end, 0, nb_full,
                          qk_scale, D, DV, False, ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ,
                          SCAN_L, SCAN_DL,
                          BLOCK_N, BLOCK_D, BLOCK_DV)

    o_dv = tl.arange(0, BLOCK_DV)
    p_o = O + o_m[:, None] * s_ot + o_dv[None, :] * s_od
    b_o = _round(b_o, O.dtype.element_ty, UPCAST)
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & (o_dv[None, :] < DV))
    # the remainder is what the stick still holds after every visible key
    tl.store(REM + o_m, tl.exp2(b_s), mask=m_m)


# ---------------------------------------------------------------------------------------------------------------
# 3. backward, query-major: chunk-boundary carries, delta, and dq
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_inner(b_dq, b_w, b_r, TRI_L, TRI_DL, b_q, b_do, b_delta, b_g, K, V, TW, TR, s_kt, s_kd, s_vt, s_vd, o_m, m_m,
              seq_start, seq_end, nb_lo, nb_hi, qk_scale, T, CHUNK,
              D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, STORE_CARRY: tl.constexpr,
              ACC_DQ: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr,
              PRECISION: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_DZ: tl.constexpr, SCAN_L: tl.constexpr,
              SCAN_DL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for it in range(nb_hi - nb_lo):
        nb = nb_hi - 1 - it
        o_n = seq_start + nb * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = _load_tile(K, o_n, o_d, s_kt, s_kd, m_n, D, BLOCK_D, UPCAST)
        b_v = _load_tile(V, o_n, o_dv, s_vt, s_vd, m_n, DV, BLOCK_DV, UPCAST)
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_lb, b_lom, b_e, b_rr = _log_sigmoids(b_z, DOT_DTYPE != tl.float32)
        if MASKED:
            if ATTEND_CURRENT:
                m_vis = o_n[None, :] <= o_m[:, None]
            else:
                m_vis = o_n[None, :] < o_m[:, None]
            b_lom = tl.where(m_vis, b_lom, 0.0)
        b_cum = _rcumsum(b_lom, TRI_L, 1, False, SCAN_L, UPCAST)
        b_a = tl.exp2(b_lb + (b_w[:, None] + b_cum))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        # dl_ij = dLoss / dlog A_ij = A_ij (dO_i . v_j)
        b_dl = b_a * tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        if ACC_DQ:
            # C_ik = sum_{j<k} dl_ij = delta_i - (R_i + sum_{j>=k in tile} dl_ij)
            b_c = b_delta[:, None] - (b_r[:, None] + _rcumsum(b_dl, TRI_DL, 1, True, SCAN_DL, UPCAST))
            b_beta = tl.where(b_z >= 0, b_rr, b_e * b_rr)
            b_om = tl.where(b_z >= 0, b_e * b_rr, b_rr)
            b_dz = b_dl * b_om - b_beta * (b_c + b_g[:, None])
            if MASKED:
                b_dz = tl.where(m_vis, b_dz, 0.0)
            b_dq = _dot_split(b_dz, b_k, b_dq, DOT_DTYPE, UPCAST, SPLIT_DZ, PRECISION)
        b_w += tl.sum(b_lom, axis=1)
        b_r += tl.sum(b_dl, axis=1)
        if STORE_CARRY:
            # crossed the left edge of chunk c: (W, R) is now the carry at the right end of chunk c - 1
            c = (nb * BLOCK_N) // CHUNK
            m_store = m_m & ((nb * BLOCK_N) % CHUNK == 0) & (nb > 0)
            tl.store(TW + (c - 1) * T + o_m, b_w, mask=m_store)
            tl.store(TR + (c - 1) * T + o_m, b_r, mask=m_store)
    return b_dq, b_w, b_r


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, REM, DREM, DQ, DELTA, TW, TR, CU, scale, T, CHUNK, N_CHUNKS,
                   s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                   s_dob, s_doh, s_dot, s_dod,
                   H, GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr,
                   VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_DZ: tl.constexpr,
                   SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_bnh = tl.program_id(1)
    i_h = i_bnh % H
    i_n = (i_bnh // H) % N_SEQ
    i_b = i_bnh // (H * N_SEQ)
    seq_start, seq_end = _seq_bounds(CU, i_n, T, VARLEN)
    # logits in base 2: exp2 and log2 throughout, one multiply folded into the scale
    qk_scale = scale * 1.4426950408889634
    m0 = seq_start + i_m * BLOCK_M

    Q += i_b * s_qb + i_h * s_qh
    K += i_b * s_kb + (i_h // GROUP) * s_kh
    V += i_b * s_vb + (i_h // GROUP) * s_vh
    DO += i_b * s_dob + i_h * s_doh
    DQ += (i_b * H + i_h) * T * D
    REM += (i_b * H + i_h) * T
    DREM += (i_b * H + i_h) * T
    DELTA += (i_b * H + i_h) * T
    TW += (i_b * H + i_h) * N_CHUNKS * T
    TR += (i_b * H + i_h) * N_CHUNKS * T

    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < seq_end
    o_d = tl.arange(0, BLOCK_D)
    b_q = _load_tile(Q, o_m, o_d, s_qt, s_qd, m_m, D, BLOCK_D, UPCAST)
    b_do = _load_tile(DO, o_m, tl.arange(0, BLOCK_DV), s_dot, s_dod, m_m, DV, BLOCK_DV, UPCAST)
    # g_i = dLoss / dlog rem_i
    b_g = tl.load(DREM + o_m, mask=m_m, other=0.0) * tl.load(REM + o_m, mask=m_m, other=0.0)

    nb_hi = tl.where(m0 < seq_end, tl.cdiv(tl.minimum(m0 + BLOCK_M, seq_end) - seq_start, BLOCK_N), 0)
    nb_full = tl.minimum((m0 - seq_start) // BLOCK_N, nb_hi)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    TRI_L = _tri(BLOCK_N, 1, False, tl.float16, UPCAST)
    TRI_DL = _tri(BLOCK_N, 1, True, tl.bfloat16, UPCAST)

    # walk 1: carries at the chunk boundaries, then delta_i = sum_j dl_ij (the same float32 dl as walk 2 uses)
    # (the three flags after DV: MASKED for the diagonal blocks, STORE_CARRY in walk 1, ACC_DQ in walk 2)
    b_w = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_dq, b_w, b_r = _dq_inner(b_dq, b_w, b_r, TRI_L, TRI_DL, b_q, b_do, b_r, b_g, K, V, TW, TR, s_kt, s_kd, s_vt,
                               s_vd, o_m,
                               m_m, seq_start, seq_end, nb_full, nb_hi, qk_scale, T, CHUNK, D, DV, True, True, False,
                               ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ, SCAN_L, SCAN_DL,
                               BLOCK_N, BLOCK_D, BLOCK_DV)
    b_dq, b_w, b_r = _dq_inner(b_dq, b_w, b_r, TRI_L, TRI_DL, b_q, b_do, b_r, b_g, K, V, TW, TR, s_kt, s_kd, s_vt,
                               s_vd, o_m,
                               m_m, seq_start, seq_end, 0, nb_full, qk_scale, T, CHUNK, D, DV, False, True, False,
                               ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ, SCAN_L, SCAN_DL,
                               BLOCK_N, BLOCK_D, BLOCK_DV)
    b_delta = b_r
    tl.store(DELTA + o_m, b_delta, mask=m_m)

    # walk 2: dq_i = scale * sum_k dz_ik k_k
    b_w = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_dq, b_w, b_r = _dq_inner(b_dq, b_w, b_r, TRI_L, TRI_DL, b_q, b_do, b_delta, b_g, K, V, TW, TR, s_kt, s_kd,
                               s_vt, s_vd,
                               o_m, m_m, seq_start, seq_end, nb_full, nb_hi, qk_scale, T, CHUNK, D, DV, True, False,
                               True, ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ, SCAN_L,
                               SCAN_DL, BLOCK_N, BLOCK_D, BLOCK_DV)
    b_dq, b_w, b_r = _dq_inner(b_dq, b_w, b_r, TRI_L, TRI_DL, b_q, b_do, b_delta, b_g, K, V, TW, TR, s_kt, s_kd,
                               s_vt, s_vd,
                               o_m, m_m, seq_start, seq_end, 0, nb_full, qk_scale, T, CHUNK, D, DV, False, False,
                               True, ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ, SCAN_L,
                               SCAN_DL, BLOCK_N, BLOCK_D, BLOCK_DV)
    p_dq = DQ + o_m[:, None] * D + o_d[None, :]
    b_dq = _round(b_dq * scale, DQ.dtype.element_ty, UPCAST)
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & (o_d[None, :] < D))


# ---------------------------------------------------------------------------------------------------------------
# 4. backward, key-major: dk and dv, one program per (chunk of keys, kv-head)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_inner(b_dk, b_dv, TRI_L, TRI_DL, b_k, b_v, Q, DO, REM, DREM, DELTA, TW, TR, s_qt, s_qd, s_dot, s_dod, o_n,
                seq_start, seq_end, mb_lo, mb_hi, qk_scale,
                D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
                UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_A: tl.constexpr,
                SPLIT_DZ: tl.constexpr, SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for mb in range(mb_lo, mb_hi):
        o_m = seq_start + mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < seq_end
        b_q = _load_tile(Q, o_m, o_d, s_qt, s_qd, m_m, D, BLOCK_D, UPCAST)
        b_do = _load_tile(DO, o_m, o_dv, s_dot, s_dod, m_m, DV, BLOCK_DV, UPCAST)
        # this chunk's carries for these rows: keys between the key block and the query (or the chunk's right end)
        b_w = tl.load(TW + o_m, mask=m_m, other=0.0)
        b_r = tl.load(TR + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)
        b_g = tl.load(DREM + o_m, mask=m_m, other=0.0) * tl.load(REM + o_m, mask=m_m, other=0.0)
        # tiles are [keys, queries]: the scans run along axis 0
        b_z = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale
        b_lb, b_lom, b_e, b_rr = _log_sigmoids(b_z, DOT_DTYPE != tl.float32)
        if MASKED:
            if ATTEND_CURRENT:
                m_vis = o_n[:, None] <= o_m[None, :]
            else:
                m_vis = o_n[:, None] < o_m[None, :]
            b_lom = tl.where(m_vis, b_lom, 0.0)
        b_cum = _rcumsum(b_lom, TRI_L, 0, False, SCAN_L, UPCAST)
        b_a = tl.exp2(b_lb + (b_w[None, :] + b_cum))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        b_dl = b_a * tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_c = b_delta[None, :] - (b_r[None, :] + _rcumsum(b_dl, TRI_DL, 0, True, SCAN_DL, UPCAST))
        b_beta = tl.where(b_z >= 0, b_rr, b_e * b_rr)
        b_om = tl.where(b_z >= 0, b_e * b_rr, b_rr)
        b_dz = b_dl * b_om - b_beta * (b_c + b_g[None, :])
        if MASKED:
            b_dz = tl.where(m_vis, b_dz, 0.0)
        b_dv = _dot_split(b_a, b_do, b_dv, DOT_DTYPE, UPCAST, SPLIT_A, PRECISION)
        b_dk = _dot_split(b_dz, b_q, b_dk, DOT_DTYPE, UPCAST, SPLIT_DZ, PRECISION)
        # the carry moves left past this key block; the next (left) key block reads it back
        tl.store(TW + o_m, b_w + tl.sum(b_lom, axis=0), mask=m_m)
        tl.store(TR + o_m, b_r + tl.sum(b_dl, axis=0), mask=m_m)
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, REM, DREM, DELTA, TW, TR, DK, DV_, CU, scale, T, CHUNK, N_CHUNKS,
                     s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                     s_dob, s_doh, s_dot, s_dod,
                     H, GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr,
                     VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_A: tl.constexpr,
                     SPLIT_DZ: tl.constexpr, SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # chunk 0 has the most query blocks after it: launch chunks in increasing order
    i_c = tl.program_id(0)
    i_bnh = tl.program_id(1)
    HK = H // GROUP
    i_hk = i_bnh % HK
    i_n = (i_bnh // HK) % N_SEQ
    i_b = i_bnh // (HK * N_SEQ)
    seq_start, seq_end = _seq_bounds(CU, i_n, T, VARLEN)
    # logits in base 2: exp2 and log2 throughout, one multiply folded into the scale
    qk_scale = scale * 1.4426950408889634
    c0 = seq_start + i_c * CHUNK
    c1 = tl.minimum(c0 + CHUNK, seq_end)
    nkb = tl.maximum(tl.cdiv(c1 - c0, BLOCK_N), 0)
    mb_end = tl.cdiv(seq_end - seq_start, BLOCK_M)

    K += i_b * s_kb + i_hk * s_kh
    V += i_b * s_vb + i_hk * s_vh
    DK += (i_b * HK + i_hk) * T * D
    DV_ += (i_b * HK + i_hk) * T * DV
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    TRI_L = _tri(BLOCK_N, 0, False, tl.float16, UPCAST)
    TRI_DL = _tri(BLOCK_N, 0, True, tl.bfloat16, UPCAST)

    for it in range(nkb):
        n0 = c0 + (nkb - 1 - it) * BLOCK_N
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = _load_tile(K, o_n, o_d, s_kt, s_kd, m_n, D, BLOCK_D, UPCAST)
        b_v = _load_tile(V, o_n, o_dv, s_vt, s_vd, m_n, DV, BLOCK_DV, UPCAST)
        b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        # query blocks [mb_lo, mb_full) cross the diagonal; from mb_full on every row sees every key of the block
        mb_lo = (n0 - seq_start) // BLOCK_M
        mb_full = tl.minimum(tl.cdiv(n0 + BLOCK_N - seq_start, BLOCK_M), mb_end)
        for g in range(GROUP):
            i_h = i_hk * GROUP + g
            off_q = i_b * s_qb + i_h * s_qh
            off_do = i_b * s_dob + i_h * s_doh
            off_row = (i_b * H + i_h) * T
            off_tab = ((i_b * H + i_h) * N_CHUNKS + i_c) * T
            b_dk, b_dv = _dkdv_inner(b_dk, b_dv, TRI_L, TRI_DL, b_k, b_v, Q + off_q, DO + off_do, REM + off_row,
                                     DREM + off_row,
                                     DELTA + off_row, TW + off_tab, TR + off_tab, s_qt, s_qd, s_dot, s_dod, o_n,
                                     seq_start, seq_end, mb_lo, mb_full, qk_scale, D, DV, True, ATTEND_CURRENT,
                                     UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ, SCAN_L, SCAN_DL, BLOCK_M,
                                     BLOCK_D, BLOCK_DV)
            b_dk, b_dv = _dkdv_inner(b_dk, b_dv, TRI_L, TRI_DL, b_k, b_v, Q + off_q, DO + off_do, REM + off_row,
                                     DREM + off_row,
                                     DELTA + off_row, TW + off_tab, TR + off_tab, s_qt, s_qd, s_dot, s_dod, o_n,
                                     seq_start, seq_end, mb_full, mb_end, qk_scale, D, DV, False, ATTEND_CURRENT,
                                     UPCAST, DOT_DTYPE, PRECISION, SPLIT_A, SPLIT_DZ, SCAN_L, SCAN_DL, BLOCK_M,
                                     BLOCK_D, BLOCK_DV)
        p_dk = DK + o_n[:, None] * D + o_d[None, :]
        b_dk = _round(b_dk * scale, DK.dtype.element_ty, UPCAST)
        tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_n[:, None] & (o_d[None, :] < D))
        p_dv = DV_ + o_n[:, None] * DV + o_dv[None, :]
        b_dv = _round(b_dv, DV_.dtype.element_ty, UPCAST)
        tl.store(p_dv, b_dv.to(DV_.dtype.element_ty), mask=m_n[:, None] & (o_dv[None, :] < DV))


# ---------------------------------------------------------------------------------------------------------------
# 5. launchers, custom op, autograd
# ---------------------------------------------------------------------------------------------------------------
# Tile shapes per kernel, by padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages, scan parts for log(1 - beta),
# scan parts for dl) -- see _rcumsum; float32 inputs always scan with tl.cumsum. The interpreter uses small mixed
# shapes (BLOCK_N != BLOCK_M exercises every diagonal case). benchmarks/bench_attention.py --sweep tunes these.
CONFIGS = {
    "interpret": {"fwd": (64, 32, 4, 1, 2, 3), "dq": (32, 64, 4, 1, 2, 3), "dkdv": (32, 64, 4, 1, 2, 3)},
    # measured on an H100 (benchmarks/results/): the elementwise work is register-hungry, small tiles win
    64: {"fwd": (64, 32, 4, 3, 2, 3, 168), "dq": (64, 32, 4, 3, 2, 3), "dkdv": (32, 32, 4, 3, 2, 3)},
    128: {"fwd": (64, 32, 4, 3, 2, 3, 168), "dq": (64, 32, 4, 3, 2, 3), "dkdv": (32, 32, 4, 3, 2, 3)},
    256: {"fwd": (64, 32, 4, 1, 2, 3), "dq": (32, 32, 4, 1, 2, 3), "dkdv": (32, 32, 4, 1, 2, 3)},
    "float32": {"fwd": (64, 32, 4, 1, 0, 0), "dq": (32, 32, 4, 1, 0, 0), "dkdv": (32, 32, 4, 1, 0, 0)},
}
# 16-bit inputs: carry A (forward, dv) and dz (dq, dk) into the tensor-core products as hi + lo 16-bit parts.
SPLIT = {"a": True, "dz": True}
# Chunks of the backward table: at most MAX_CHUNKS per sequence, each a multiple of every block size.
MAX_CHUNKS = 16
MIN_CHUNK = {"interpret": 64, "gpu": 128}


def _config(kernel, block_d, dtype, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, scan parts, scan parts, launch options) for one kernel."""
    if INTERPRET or device.type != "cuda":
        cfg = CONFIGS["interpret"][kernel]
    elif dtype == torch.float32:
        cfg = CONFIGS["float32"][kernel]
    else:
        cfg = CONFIGS[min(256, max(64, block_d))][kernel]
    # float32 keeps the exact float32 scan; an optional 7th entry caps the registers per thread (ptxas maxnreg)
    scans = (0, 0) if dtype == torch.float32 else cfg[4:6]
    return cfg[:4] + scans + ({"maxnreg": cfg[6]} if len(cfg) > 6 else {},)


def _common(q, k, v, cu_seqlens):
    B, H, T, D = q.shape
    DV = v.shape[-1]
    group = H // k.shape[1]
    if cu_seqlens is None:
        n_seq, max_len, cu = 1, T, q  # cu is unused without VARLEN
    else:
        n_seq = cu_seqlens.numel() - 1
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if n_seq > 0 else 0  # one sync
        cu = cu_seqlens
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    upcast = INTERPRET or q.device.type != "cuda"
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[q.dtype]
    precision = "tf32" if (q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    half = q.dtype != torch.float32
    return dict(B=B, H=H, T=T, D=D, DV=DV, group=group, n_seq=n_seq, max_len=max_len, cu=cu, block_d=block_d,
                block_dv=block_dv, upcast=upcast, dot_dtype=dot_dtype, precision=precision,
                varlen=cu_seqlens is not None, split_a=half and SPLIT["a"], split_dz=half and SPLIT["dz"])


def _forward(q, k, v, scale, attend_current, cu_seqlens):
    c = _common(q, k, v, cu_seqlens)
    B, H, T = c["B"], c["H"], c["T"]
    o = torch.empty(B, H, T, c["DV"], dtype=q.dtype, device=q.device)
    rem = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages, scan_l, scan_dl, extra = _config("fwd", max(c["block_d"], c["block_dv"]), q.dtype,
                                                            q.device)
    grid = (triton.cdiv(c["max_len"], bm), B * c["n_seq"] * H)
    if grid[0] > 0:
        _fwd_kernel[grid](q, k, v, o, rem, c["cu"], float(scale), T, *q.stride(), *k.stride(), *v.stride(),
                          *o.stride(), H=H, GROUP=c["group"], N_SEQ=c["n_seq"], D=c["D"], DV=c["DV"],
                          VARLEN=c["varlen"], ATTEND_CURRENT=bool(attend_current), UPCAST=c["upcast"],
                          DOT_DTYPE=c["dot_dtype"], PRECISION=c["precision"], SPLIT_A=c["split_a"],
                          SPLIT_DZ=c["split_dz"], SCAN_L=scan_l, SCAN_DL=scan_dl, BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_D=c["block_d"], BLOCK_DV=c["block_dv"], num_warps=warps, num_stages=stages, **extra)
    return o, rem


def chunk_size(max_len, interpret):
    """Keys per chunk of the backward table: a power of two >= the smallest chunk, at most MAX_CHUNKS chunks."""
    smallest = MIN_CHUNK["interpret" if interpret else "gpu"]
    return max(smallest, triton.next_power_of_2(triton.cdiv(max(max_len, 1), MAX_CHUNKS)))


def _backward(do, drem, q, k, v, rem, scale, attend_current, cu_seqlens):
    c = _common(q, k, v, cu_seqlens)
    B, H, T, D, DV = c["B"], c["H"], c["T"], c["D"], c["DV"]
    hk = k.shape[1]
    dev = q.device
    drem = drem.to(torch.float32).contiguous()
    chunk = chunk_size(c["max_len"], c["upcast"])
    n_chunks = max(1, triton.cdiv(c["max_len"], chunk))
    # (W, R) carries at the right end of each chunk, per query row; rows left of a boundary keep an empty carry
    tw = torch.zeros(B, H, n_chunks, T, dtype=torch.float32, device=dev)
    tr = torch.zeros(B, H, n_chunks, T, dtype=torch.float32, device=dev)
    delta = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    dq = torch.empty(B, H, T, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, hk, T, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, hk, T, DV, dtype=v.dtype, device=dev)
    common = dict(GROUP=c["group"], N_SEQ=c["n_seq"], D=D, DV=DV, VARLEN=c["varlen"],
                  ATTEND_CURRENT=bool(attend_current), UPCAST=c["upcast"], DOT_DTYPE=c["dot_dtype"],
                  PRECISION=c["precision"], SPLIT_A=c["split_a"], SPLIT_DZ=c["split_dz"], BLOCK_D=c["block_d"],
                  BLOCK_DV=c["block_dv"])
    if c["max_len"] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block = max(c["block_d"], c["block_dv"])
    bm, bn, warps, stages, scan_l, scan_dl, extra = _config("dq", block, q.dtype, dev)
    assert chunk % bm == 0 and chunk % bn == 0
    grid = (triton.cdiv(c["max_len"], bm), B * c["n_seq"] * H)
    _bwd_dq_kernel[grid](q, k, v, do, rem, drem, dq, delta, tw, tr, c["cu"], float(scale), T, chunk, n_chunks,
                         *q.stride(), *k.stride(), *v.stride(), *do.stride(), H=H, BLOCK_M=bm, BLOCK_N=bn,
                         SCAN_L=scan_l,
                         SCAN_DL=scan_dl, num_warps=warps, num_stages=stages, **extra, **common)
    bm, bn, warps, stages, scan_l, scan_dl, extra = _config("dkdv", block, q.dtype, dev)
    assert chunk % bn == 0
    grid = (n_chunks, B * c["n_seq"] * hk)
    _bwd_dkdv_kernel[grid](q, k, v, do, rem, drem, delta, tw, tr, dk, dv, c["cu"], float(scale), T, chunk,
                           n_chunks, *q.stride(), *k.stride(), *v.stride(), *do.stride(), H=H, BLOCK_M=bm,
                           BLOCK_N=bn, SCAN_L=scan_l, SCAN_DL=scan_dl, num_warps=warps, num_stages=stages, **extra,
                           **common)
    return dq, dk, dv


@torch.library.custom_op("sb_ref::stick_breaking_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attend_current: bool,
            cu_seqlens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, attend_current, cu_seqlens)


@_fwd_op.register_fake
def _(q, k, v, scale, attend_current, cu_seqlens):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("sb_ref::stick_breaking_triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, drem: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            rem: torch.Tensor, scale: float, attend_current: bool,
            cu_seqlens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, drem, q, k, v, rem, scale, attend_current, cu_seqlens)


@_bwd_op.register_fake
def _(do, drem, q, k, v, rem, scale, attend_current, cu_seqlens):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, attend_current, cu_seqlens = inputs
    _, rem = output
    # the backward recomputes everything from q, k, v and one float32 per row (the remainder, for g = dRem * rem)
    ctx.save_for_backward(q, k, v, rem, cu_seqlens)
    ctx.scale = scale
    ctx.attend_current = attend_current


def _autograd_backward(ctx, do, drem):
    q, k, v, rem, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    if drem is None:
        drem = torch.zeros_like(rem)
    dq, dk, dv = _bwd_op(do, drem, q, k, v, rem, ctx.scale, ctx.attend_current, cu_seqlens)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def stick_breaking_attention_triton(q, k, v, scale: float, attend_current: bool, cu_seqlens=None):
    """(o, rem) of stick-breaking attention through the Triton kernels; inputs are validated by sb_ref.

    q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv) in one of float16/bfloat16/float32; cu_seqlens None or
    (N+1,) int offsets with B == 1. Returns o (B, Hq, T, Dv) in q.dtype and rem (B, Hq, T) float32, both
    differentiable in q, k and v. Backward is deterministic (no atomics).
    """
    return _fwd_op(q, k, v, float(scale), bool(attend_current), cu_seqlens)
