"""Stick-breaking attention in Triton: forward, deterministic backward, autograd wrapper and launchers.

    A_ij = beta_ij * prod_{j<k<i} (1 - beta_ik),   beta_ij = sigmoid(scale * q_i . k_j)
    o_i = sum_j A_ij v_j,   rem_i = prod_j (1 - beta_ij)

The story, in the order of this file (kernels/README.md has the derivations):

1. ``_log_sigmoids``: log(beta) and log(1 - beta) of a tile of logits (and beta, 1 - beta for the backward),
   relatively accurate everywhere (to float32 for float32 inputs, 1e-5 for 16-bit ones), with a polynomial
   log1p and no division.
2. ``_fwd_kernel``: a program owns a query block and walks key blocks from the diagonal back to the start of its
   sequence, carrying per row S = sum of log(1 - beta) over the keys already visited. Inside a tile
   log A = log beta + S + (reverse exclusive cumsum of log(1 - beta) along the keys), all in base 2.
3. ``_bwd_dq_kernel`` (query-major): one walk recomputes dl = A * (dO . v) and accumulates dq; the part of dq that
   needs the dl of keys not yet walked goes through a carried X = sum beta k. It stores, at every chunk boundary,
   the carries (W, R) = (sum log(1 - beta), sum dl) of the keys right of the boundary; at the end delta = sum dl.
4. ``_bwd_dkdv_kernel`` (key-major): one program per (chunk of keys, kv-head) walks its key blocks right to left;
   for each, all later query blocks of every q-head of the GQA group, in [queries, keys] tiles with dk and dv
   accumulated transposed. The carries of the query rows come from the chunk's slice of the table, which this
   program alone reads and rewrites: no atomics, deterministic.
5. Launchers (16-bit operands as float16 copies scaled by powers of two, made by a one-pass kernel, so that every
   product of a computed tile is one float16 product), ``torch.library.custom_op`` registration (forward, backward,
   fakes, autograd) and the public function.

Every kernel runs compiled on a GPU and under TRITON_INTERPRET=1 on the CPU, where bfloat16 arithmetic is not
trustworthy: there every tile is upcast to float32 right after its load (and tiles fed to a dot are rounded to
the operand dtype first, so the interpreter sees the same roundings as the GPU).
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
def _neg_log2_1p(e, SHORT: tl.constexpr):
    """-log2(1 + e) for e in [0, 1] as e * p(e): -p interpolates log2(1 + x) / x at Chebyshev points of [0, 1]
    (degree 9, or 5 under 16-bit inputs, SHORT). Evaluated in float32 it is within 2e-7 (1e-5) of the exact value,
    relative, down to the smallest e: a proper log1p, with FMAs only (no log, no division, no special-function
    unit, whose fast log is only absolutely accurate near 1). 1e-5 of log(1 + e) per key is far below what a 16-bit
    output can show. The sign is in the coefficients: every use below wants -log2(1 + e), and a negation the
    compiler cannot fold costs an instruction per logit."""
    if SHORT:
        p = e * 0.033822045969008445 - 0.14447109569887714
        p = p * e + 0.30163800973506666
        p = p * e - 0.46865887914367604
        p = p * e + 0.7203587726757784
        p = p * e - 1.4426814680651523
    else:
        p = e * 0.0045820817380445075 - 0.02819390732038301
        p = p * e + 0.08132993201834325
        p = p * e - 0.15211233805539448
        p = p * e + 0.22029472994785484
        p = p * e - 0.28368108271443954
        p = p * e + 0.35997573047748593
        p = p * e - 0.4808460805144903
        p = p * e + 0.7213459716836175
        p = p * e - 1.4426950331796244
    return e * p


@triton.jit
def _log_sigmoids(z, SHORT: tl.constexpr):
    """For base-2 logits z = log2(e) * scale * q.k, returns (log2 beta, log2(1 - beta), beta, 1 - beta), each to
    a relative accuracy of a few float32 ulps (1e-5 with the short polynomial of 16-bit inputs); the forward uses
    only the logs. Working in base 2 lets every exp be a bare exp2 (the scale absorbs log2(e))."""
    # softplus(x) = max(x, 0) + log1p(e): log beta = -softplus(-x) = min(x, 0) - log1p(e), log(1-beta) = -softplus(x)
    # with e = exp(-|x|)
    e = tl.exp2(-tl.abs(z))
    nl1p = _neg_log2_1p(e, SHORT)
    log_beta = tl.minimum(z, 0.0) + nl1p
    log_om = nl1p - tl.maximum(z, 0.0)
    # r = 1 / (1 + e) = 2^-log2(1 + e), one exp2 with no division's range checks: beta = r for z >= 0 and e * r
    # below, 1 - beta the other way round (no cancellation)
    r = tl.exp2(nl1p)
    er = e * r
    beta = tl.where(z >= 0, r, er)
    om = tl.where(z >= 0, er, r)
    return log_beta, log_om, beta, om


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
def _tri(BLOCK: tl.constexpr, NEARER: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """The 0/1 matrix M that turns a product x @ M into an exclusive cumsum over the keys of a [queries, keys] tile:
    for each key j, the sum over keys k nearer the query (k > j) or farther (k < j)."""
    o_k = tl.arange(0, BLOCK)[:, None]
    o_j = tl.arange(0, BLOCK)[None, :]
    m = (o_k > o_j) if NEARER else (o_k < o_j)
    if UPCAST:
        return m.to(tl.float32)
    else:
        return m.to(DTYPE)


@triton.jit
def _cumsum(x, TRI, NEARER: tl.constexpr, PARTS: tl.constexpr, UPCAST: tl.constexpr):
    """Exclusive cumsum of a float32 [queries, keys] tile along the keys, over the nearer or the farther keys as TRI
    was built.

    PARTS == 0: tl.cumsum, an exact float32 scan that costs a dozen warp shuffles per element.
    PARTS == 1: x rounded to float16 (11 significant bits), one tensor-core product with TRI: for dl, scaled into
                float16's range by the caller, where this rounding costs no more than dz's own.
    PARTS == 2: x = hi + lo in float16 (22 significant bits), two products: for log(1 - beta) <= 0, which is
                exponentiated, clamped to float16's range (a key past -6e4 leaves exp(...) = 0 either way).
    """
    if PARTS == 0:
        # keys grow along the axis: the nearer keys are a reverse scan
        c = tl.cumsum(x, axis=1, reverse=NEARER) - x
    else:
        if PARTS == 1:
            c = tl.dot(_round(x, tl.float16, UPCAST), TRI)
        else:
            xc = tl.maximum(x, -60000.0)
            hi = _round(xc, tl.float16, UPCAST)
            c = tl.dot(hi, TRI)
            c = tl.dot(_round(xc - hi.to(tl.float32), tl.float16, UPCAST), TRI, c)
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


@triton.jit
def _query_block(CU, T, H, N_SEQ, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where a query-major program works: (batch, head, sequence bounds, first query row, key blocks).

    Grid axis 0 enumerates (batch, sequence, head), axis 1 the query blocks, heaviest (last) first: the GPU
    starts programs in launch order, so every head's longest walks go before anyone's short ones. Key blocks
    [0, nb_hi) hold every key a row of the block may see; those from nb_full on cross the diagonal."""
    i_bnh = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    i_h = i_bnh % H
    i_n = (i_bnh // H) % N_SEQ
    i_b = i_bnh // (H * N_SEQ)
    seq_start, seq_end = _seq_bounds(CU, i_n, T, VARLEN)
    m0 = seq_start + i_m * BLOCK_M
    nb_hi = tl.where(m0 < seq_end, tl.cdiv(tl.minimum(m0 + BLOCK_M, seq_end) - seq_start, BLOCK_N), 0)
    nb_full = tl.minimum((m0 - seq_start) // BLOCK_N, nb_hi)
    return i_b, i_h, seq_start, seq_end, m0, nb_full, nb_hi


# Early exit on used-up sticks: a query block has nothing left to give once every row's carry (the sum of
# log2(1 - beta) over the keys walked) is below EXHAUSTED, since 2^-160 is under float32's smallest number: every
# weight of a key farther left, and the remainder, round to 0 whether those keys are visited or not. With
# EARLY_EXIT the forward walks EXIT_SEGMENT key blocks past the diagonal, stops there if that holds, and records
# the first key it walked (LO); the key-major backward skips the query blocks whose walks stopped right of its
# key block (loop bounds from LO, see _exit_bounds). The query-major backward walks everything: its early-exit
# form ran 16-21% slower per tile compiled (benchmarks/README.md). NaN in, NaN out: a used-up stick times a NaN is
# still NaN. Every key lies in some block's diagonal blocks, so there the forward flags a kv-head whose k or v
# holds a non-finite value, and a second launch (REDO) walks again, in full, the flagged heads' blocks that
# stopped early.
EXHAUSTED = tl.constexpr(-160.0)
# The forward splits its walk only for a query block whose most-worn row's carry is below SLOW_WEAR after the
# diagonal (BLOCK_M keys at most): slower wear would not reach EXHAUSTED within the first segment.
SLOW_WEAR = tl.constexpr(-16.0)


# ---------------------------------------------------------------------------------------------------------------
# 2. forward
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(b_o, b_s, b_zsum, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start, seq_end, nb_hi, it_lo,
               it_hi, qk_scale, D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               SPLIT_A: tl.constexpr, SCAN_L: tl.constexpr, CHECK: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for it in range(it_lo, it_hi):
        # right to left from block nb_hi - 1: the carry b_s holds the keys between this block and the query
        o_n = seq_start + (nb_hi - 1 - it) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = _load_tile(K, o_n, o_d, s_kt, s_kd, m_n, D, BLOCK_D, UPCAST)
        b_v = _load_tile(V, o_n, o_dv, s_vt, s_vd, m_n, DV, BLOCK_DV, UPCAST)
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_lb, b_lom, _, _ = _log_sigmoids(b_z, DOT_DTYPE != tl.float32)
        if CHECK:
            # every logit of the tile, masked or not: a non-finite key makes its whole column non-finite
            b_zsum += tl.sum(b_z, axis=1)
        if MASKED:
            # only blocks that cross the diagonal need the causal mask
            if ATTEND_CURRENT:
                m_vis = o_n[None, :] <= o_m[:, None]
            else:
                m_vis = o_n[None, :] < o_m[:, None]
            b_lom = tl.where(m_vis, b_lom, 0.0)
        # sum over the nearer keys of this tile (k > j): reverse exclusive cumsum
        b_cum = _cumsum(b_lom, TRI_L, True, SCAN_L, UPCAST)
        b_a = tl.exp2(b_lb + (b_s[:, None] + b_cum))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        b_o = _dot_split(b_a, b_v, b_o, OP_DTYPE, UPCAST, SPLIT_A, PRECISION)
        b_s += tl.sum(b_lom, axis=1)
    return b_o, b_s, b_zsum


@triton.jit
def _fwd_kernel(Q, K, V, O, REM, LO, CU, SC, scale, T,
                s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                s_ob, s_oh, s_ot, s_od,
                H, GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr,
                VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
                DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_A: tl.constexpr,
                SCAN_L: tl.constexpr, EARLY_EXIT: tl.constexpr, EXIT_SEGMENT: tl.constexpr, REDO: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    i_b, i_h, seq_start, seq_end, m0, nb_full, nb_hi = _query_block(CU, T, H, N_SEQ, VARLEN, BLOCK_M, BLOCK_N)
    # logits in base 2: exp2 and log2 throughout, one multiply folded into the scale
    qk_scale = scale * 1.4426950408889634
    # this kv-head's [1 / scale of v, non-finite flag] (see _forward_table)
    SC += (i_b * (H // GROUP) + i_h // GROUP) * 2
    REM += (i_b * H + i_h) * T
    LO += (i_b * H + i_h) * T
    if REDO:
        # the second launch: only a block that stopped early in a head flagged by the first walks again
        lo = tl.load(LO + m0, mask=m0 < seq_end, other=seq_start)
        if (tl.load(SC + 1) == 0) | (lo == seq_start):
            return

    Q += i_b * s_qb + i_h * s_qh
    K += i_b * s_kb + (i_h // GROUP) * s_kh
    V += i_b * s_vb + (i_h // GROUP) * s_vh
    O += i_b * s_ob + i_h * s_oh

    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < seq_end
    b_q = _load_tile(Q, o_m, tl.arange(0, BLOCK_D), s_qt, s_qd, m_m, D, BLOCK_D, UPCAST)
    b_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_zsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    TRI_L = _tri(BLOCK_N, True, tl.float16, UPCAST)

    b_o, b_s, b_zsum = _fwd_inner(b_o, b_s, b_zsum, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start,
                                  seq_end, nb_hi, 0, nb_hi - nb_full, qk_scale, D, DV, True, ATTEND_CURRENT, UPCAST,
                                  DOT_DTYPE, OP_DTYPE, PRECISION, SPLIT_A, SCAN_L, EARLY_EXIT, BLOCK_N, BLOCK_D,
                                  BLOCK_DV)
    if EARLY_EXIT:
        # a non-finite key (its logits) or value (every row's output) among the diagonal blocks' flags the head
        b_chk = tl.sum(b_zsum + tl.sum(b_o, axis=1), axis=0)
        if b_chk - b_chk != 0:
            tl.store(SC + 1, 1.0)
        it = nb_full
        if tl.min(tl.where(m_m, b_s, 0.0), axis=0) < SLOW_WEAR:
            # the first EXIT_SEGMENT key blocks, then the rest only if some row's stick is not used up yet; one
            # check, between two loops: a reduction in a loop's condition makes ptxas serialize the tensor-core
            # products
            it = tl.minimum(nb_full, EXIT_SEGMENT)
            b_o, b_s, _ = _fwd_inner(b_o, b_s, b_zsum, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start,
                                     seq_end, nb_full, 0, it, qk_scale, D, DV, False, ATTEND_CURRENT, UPCAST,
                                     DOT_DTYPE, OP_DTYPE, PRECISION, SPLIT_A, SCAN_L, False, BLOCK_N, BLOCK_D, BLOCK_DV)
            if tl.max((m_m & (b_s >= EXHAUSTED)).to(tl.int32), axis=0) > 0:
                b_o, b_s, _ = _fwd_inner(b_o, b_s, b_zsum, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start,
                                         seq_end, nb_full, it, nb_full, qk_scale, D, DV, False, ATTEND_CURRENT,
                                         UPCAST, DOT_DTYPE, OP_DTYPE, PRECISION, SPLIT_A, SCAN_L, False, BLOCK_N,
                                         BLOCK_D, BLOCK_DV)
                it = nb_full
        else:
            # sticks that wore this slowly over the diagonal will not be used up a segment later: one loop, which
            # keeps the software pipeline running (two cost a refill)
            b_o, b_s, _ = _fwd_inner(b_o, b_s, b_zsum, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start,
                                     seq_end, nb_full, 0, nb_full, qk_scale, D, DV, False, ATTEND_CURRENT, UPCAST,
                                     DOT_DTYPE, OP_DTYPE, PRECISION, SPLIT_A, SCAN_L, False, BLOCK_N, BLOCK_D, BLOCK_DV)
        # the first key this block walked: the backward walks as far
        tl.store(LO + o_m, seq_start + (nb_full - it) * BLOCK_N, mask=m_m)
    else:
        b_o, b_s, _ = _fwd_inner(b_o, b_s, b_zsum, TRI_L, b_q, K, V, s_kt, s_kd, s_vt, s_vd, o_m, seq_start,
                                 seq_end, nb_full, 0, nb_full, qk_scale, D, DV, False, ATTEND_CURRENT, UPCAST,
                                 DOT_DTYPE, OP_DTYPE, PRECISION, SPLIT_A, SCAN_L, False, BLOCK_N, BLOCK_D, BLOCK_DV)
        if REDO:
            tl.store(LO + o_m, seq_start, mask=m_m)
    # V may be a float16 copy scaled by a power of two (see _forward_table): undo the scale
    b_o *= tl.load(SC)

    o_dv = tl.arange(0, BLOCK_DV)
    p_o = O + o_m[:, None] * s_ot + o_dv[None, :] * s_od
    b_o = _round(b_o, O.dtype.element_ty, UPCAST)
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_m[:, None] & (o_dv[None, :] < DV))
    # the remainder is what the stick still holds after every visible key
    tl.store(REM + o_m, tl.exp2(b_s), mask=m_m)


# ---------------------------------------------------------------------------------------------------------------
# 3. backward, query-major: dq, delta and the chunk-boundary carries, in one walk
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_inner(b_dq, b_x, b_w, b_r, TRI_L, TRI_C, b_q, b_do, b_g, K, V, TW, TR, s_kt, s_kd, s_vt, s_vd, o_m, m_m,
              seq_start, seq_end, nb_lo, nb_hi, qk_scale, log2_dz_scale, T, CHUNK,
              D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
              UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCAN_L: tl.constexpr,
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
        b_lb, b_lom, b_beta, b_om = _log_sigmoids(b_z, DOT_DTYPE != tl.float32)
        if MASKED:
            if ATTEND_CURRENT:
                m_vis = o_n[None, :] <= o_m[:, None]
            else:
                m_vis = o_n[None, :] < o_m[:, None]
            b_lom = tl.where(m_vis, b_lom, 0.0)
            b_beta = tl.where(m_vis, b_beta, 0.0)
        b_cum = _cumsum(b_lom, TRI_L, True, SCAN_L, UPCAST)
        # A times dz_scale (a power of two that keeps dl, C and dz inside float16's range, see _backward_operands):
        # every gradient-side number below carries that scale
        b_a = tl.exp2(b_lb + ((b_w + log2_dz_scale)[:, None] + b_cum))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        # dl_ij = dLoss / dlog A_ij = A_ij (dO_i . v_j)
        b_dl = b_a * tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_dl_sum = tl.sum(b_dl, axis=1)
        # dz_ik = dl_ik (1 - beta_ik) - beta_ik (C_ik + g_i), C_ik = sum_{j<k} dl_ij: here only the j of this tile
        b_dz = b_dl * b_om - b_beta * (_cumsum(b_dl, TRI_C, False, SCAN_DL, UPCAST) + b_g[:, None])
        b_dq = tl.dot(_round(b_dz, DOT_DTYPE, UPCAST), b_k, b_dq, input_precision=PRECISION)
        # ... the j of this tile with the k of the tiles already walked: dl_ij times X_i = sum_k beta_ik k_k (the
        # sign on the row sums, where it costs one negation per row instead of one per element of X)
        b_dq += (-b_dl_sum)[:, None] * b_x
        b_x = tl.dot(_round(b_beta, DOT_DTYPE, UPCAST), b_k, b_x, input_precision=PRECISION)
        b_w += tl.sum(b_lom, axis=1)
        b_r += b_dl_sum
        # crossed the left edge of chunk c: (W, R) is now the carry at the right end of chunk c - 1
        c = (nb * BLOCK_N) // CHUNK
        m_store = m_m & ((nb * BLOCK_N) % CHUNK == 0) & (nb > 0)
        tl.store(TW + (c - 1) * T + o_m, b_w, mask=m_store)
        tl.store(TR + (c - 1) * T + o_m, b_r, mask=m_store)
    return b_dq, b_x, b_w, b_r


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, REM, DREM, DQ, DELTA, TW, TR, CU, SC, scale, T, CHUNK, N_CHUNKS,
                   s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                   s_dob, s_doh, s_dot, s_dod,
                   H, GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr,
                   VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    i_b, i_h, seq_start, seq_end, m0, nb_full, nb_hi = _query_block(CU, T, H, N_SEQ, VARLEN, BLOCK_M, BLOCK_N)
    # the operands' scales (see _operand_scales): logits, gradients, dz, and dq at the end
    SC += (i_b * (H // GROUP) + i_h // GROUP) * 8
    qk_scale = scale * 1.4426950408889634 * tl.load(SC)
    g_scale = tl.load(SC + 1)
    log2_dz_scale = tl.load(SC + 6)

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
    b_g = tl.load(DREM + o_m, mask=m_m, other=0.0) * tl.load(REM + o_m, mask=m_m, other=0.0) * g_scale
    TRI_L = _tri(BLOCK_N, True, tl.float16, UPCAST)
    TRI_C = _tri(BLOCK_N, False, tl.float16, UPCAST)

    # one walk from the diagonal back: W = sum log(1 - beta) and R = sum dl over the keys walked, X = sum beta k;
    # dq needs C_ik = sum_{j<k} dl_ij, which lies ahead, so each tile adds its dl's share of C through X instead
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_x = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_w = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_dq, b_x, b_w, b_r = _dq_inner(b_dq, b_x, b_w, b_r, TRI_L, TRI_C, b_q, b_do, b_g, K, V, TW, TR, s_kt, s_kd,
                                    s_vt, s_vd, o_m, m_m, seq_start, seq_end, nb_full, nb_hi, qk_scale, log2_dz_scale,
                                    T, CHUNK, D, DV, True, ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SCAN_L,
                                    SCAN_DL, BLOCK_N, BLOCK_D, BLOCK_DV)
    b_dq, b_x, b_w, b_r = _dq_inner(b_dq, b_x, b_w, b_r, TRI_L, TRI_C, b_q, b_do, b_g, K, V, TW, TR, s_kt, s_kd,
                                    s_vt, s_vd, o_m, m_m, seq_start, seq_end, 0, nb_full, qk_scale, log2_dz_scale,
                                    T, CHUNK, D, DV, False, ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SCAN_L,
                                    SCAN_DL, BLOCK_N, BLOCK_D, BLOCK_DV)
    # delta_i = sum_j dl_ij, the float32 sum of the very dl both kernels recompute, stored with g added: the
    # key-major kernel's C_ik + g_i starts from it
    tl.store(DELTA + o_m, b_r + b_g, mask=m_m)
    p_dq = DQ + o_m[:, None] * D + o_d[None, :]
    b_dq = _round(b_dq * tl.load(SC + 3), DQ.dtype.element_ty, UPCAST)
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_m[:, None] & (o_d[None, :] < D))


# ---------------------------------------------------------------------------------------------------------------
# 4. backward, key-major: dk and dv, one program per (chunk of keys, kv-head)
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_inner(b_dkt, b_dvt, TRI_L, TRI_C, b_k, b_v, Q, DO, DELTA, TW, TR, s_qt, s_qd, s_dot, s_dod, o_n,
                seq_start, seq_end, mb_lo, mb_hi, qk_scale, dz_scale,
                D: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
                UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCAN_L: tl.constexpr,
                SCAN_DL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
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
        b_delta_g = tl.load(DELTA + o_m, mask=m_m, other=0.0)
        # tiles are [queries, keys] as in the other kernels, so the scans are products with TRI on the right
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_lb, b_lom, b_beta, b_om = _log_sigmoids(b_z, DOT_DTYPE != tl.float32)
        if MASKED:
            if ATTEND_CURRENT:
                m_vis = o_n[None, :] <= o_m[:, None]
            else:
                m_vis = o_n[None, :] < o_m[:, None]
            b_lom = tl.where(m_vis, b_lom, 0.0)
        b_w_next = b_w + tl.sum(b_lom, axis=1)
        b_cum = _cumsum(b_lom, TRI_L, True, SCAN_L, UPCAST)
        b_a = tl.exp2(b_lb + (b_w[:, None] + b_cum))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        # dv and dk accumulate transposed, [head dim, keys]: the head dim is the long side the tensor cores want
        b_dvt = tl.dot(tl.trans(b_do), _round(b_a, DOT_DTYPE, UPCAST), b_dvt, input_precision=PRECISION)
        b_dl = b_a * tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION) * dz_scale
        b_dl_sum = tl.sum(b_dl, axis=1)
        # C_ik + g_i = (delta_i + g_i - R_i - this tile's dl): the keys beyond the tile, then those of the tile
        b_cg = (b_delta_g - (b_r + b_dl_sum))[:, None] + _cumsum(b_dl, TRI_C, False, SCAN_DL, UPCAST)
        b_dz = b_dl * b_om - b_beta * b_cg
        if MASKED:
            b_dz = tl.where(m_vis, b_dz, 0.0)
        b_dkt = tl.dot(tl.trans(b_q), _round(b_dz, DOT_DTYPE, UPCAST), b_dkt, input_precision=PRECISION)
        # the carry moves left past this key block; the next (left) key block reads it back
        tl.store(TW + o_m, b_w_next, mask=m_m)
        tl.store(TR + o_m, b_r + b_dl_sum, mask=m_m)
    return b_dkt, b_dvt


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DELTA, TW, TR, DK, DV_, MB_STOP, CU, SC, scale, T, CHUNK, N_CHUNKS,
                     s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                     s_dob, s_doh, s_dot, s_dod,
                     H, GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr,
                     VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCAN_L: tl.constexpr,
                     SCAN_DL: tl.constexpr, EARLY_EXIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # axis 0 enumerates (batch, sequence, kv-head), axis 1 the chunks: chunk 0 has the most query blocks after it,
    # and the GPU starts programs in launch order, so every head's chunk 0 goes first
    i_bnh = tl.program_id(0)
    i_c = tl.program_id(1)
    HK = H // GROUP
    i_hk = i_bnh % HK
    i_n = (i_bnh // HK) % N_SEQ
    i_b = i_bnh // (HK * N_SEQ)
    seq_start, seq_end = _seq_bounds(CU, i_n, T, VARLEN)
    # logits in base 2 (exp2 and log2 throughout), the operands' scales folded in (see _operand_scales)
    SC += (i_b * HK + i_hk) * 8
    qk_scale = scale * 1.4426950408889634 * tl.load(SC)
    dz_scale = tl.load(SC + 2)
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
    TRI_L = _tri(BLOCK_N, True, tl.float16, UPCAST)
    TRI_C = _tri(BLOCK_N, False, tl.float16, UPCAST)

    for it in range(nkb):
        n0 = c0 + (nkb - 1 - it) * BLOCK_N
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = _load_tile(K, o_n, o_d, s_kt, s_kd, m_n, D, BLOCK_D, UPCAST)
        b_v = _load_tile(V, o_n, o_dv, s_vt, s_vd, m_n, DV, BLOCK_DV, UPCAST)
        b_dkt = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        b_dvt = tl.zeros([BLOCK_DV, BLOCK_N], dtype=tl.float32)
        # query blocks [mb_lo, mb_full) cross the diagonal; from mb_full on every row sees every key of the block
        mb_lo = (n0 - seq_start) // BLOCK_M
        mb_full = tl.minimum(tl.cdiv(n0 + BLOCK_N - seq_start, BLOCK_M), mb_end)
        for g in range(GROUP):
            i_h = i_hk * GROUP + g
            off_q = i_b * s_qb + i_h * s_qh
            off_do = i_b * s_dob + i_h * s_doh
            off_row = (i_b * H + i_h) * T
            off_tab = ((i_b * H + i_h) * N_CHUNKS + i_c) * T
            if EARLY_EXIT:
                # the query blocks from mb_stop on used up their sticks before this key block (see _exit_bounds)
                mb_stop = tl.minimum(tl.maximum(tl.load(MB_STOP + off_row + n0), mb_full), mb_end)
                mb_stop = tl.where(tl.load(SC + 7) != 0, mb_end, mb_stop)
            else:
                mb_stop = mb_end
            b_dkt, b_dvt = _dkdv_inner(b_dkt, b_dvt, TRI_L, TRI_C, b_k, b_v, Q + off_q, DO + off_do, DELTA + off_row,
                                     TW + off_tab, TR + off_tab, s_qt, s_qd, s_dot, s_dod, o_n,
                                     seq_start, seq_end, mb_lo, mb_full, qk_scale, dz_scale, D, DV, True,
                                     ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SCAN_L, SCAN_DL, BLOCK_M,
                                     BLOCK_D, BLOCK_DV)
            b_dkt, b_dvt = _dkdv_inner(b_dkt, b_dvt, TRI_L, TRI_C, b_k, b_v, Q + off_q, DO + off_do, DELTA + off_row,
                                     TW + off_tab, TR + off_tab, s_qt, s_qd, s_dot, s_dod, o_n,
                                     seq_start, seq_end, mb_full, mb_stop, qk_scale, dz_scale, D, DV, False,
                                     ATTEND_CURRENT, UPCAST, DOT_DTYPE, PRECISION, SCAN_L, SCAN_DL, BLOCK_M,
                                     BLOCK_D, BLOCK_DV)
        p_dk = DK + o_n[:, None] * D + o_d[None, :]
        b_dk = _round(tl.trans(b_dkt) * tl.load(SC + 4), DK.dtype.element_ty, UPCAST)
        tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_n[:, None] & (o_d[None, :] < D))
        p_dv = DV_ + o_n[:, None] * DV + o_dv[None, :]
        b_dv = _round(tl.trans(b_dvt) * tl.load(SC + 5), DV_.dtype.element_ty, UPCAST)
        tl.store(p_dv, b_dv.to(DV_.dtype.element_ty), mask=m_n[:, None] & (o_dv[None, :] < DV))
        # the carries this key block wrote are read back by other threads for the next block
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------------------------
# 5. launchers, custom op, autograd
# ---------------------------------------------------------------------------------------------------------------
# Tile shapes per kernel, by padded head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages, scan of log(1 - beta),
# scan of dl[, maxnreg]), the scans as _cumsum's PARTS; float32 inputs always scan with tl.cumsum. The
# interpreter uses small mixed shapes (BLOCK_N != BLOCK_M exercises every diagonal case).
# benchmarks/bench_attention.py --sweep tunes these. Every kernel's tile is [queries, keys]; the tensor cores'
# fast (wgmma) path wants 64 rows per warpgroup, so BLOCK_M is 64 per 4 warps.
CONFIGS = {
    "interpret": {"fwd": (64, 32, 4, 1, 2, 1), "dq": (32, 64, 4, 1, 2, 1), "dkdv": (32, 64, 4, 1, 2, 1)},
    # measured on an H100 (benchmarks/results/): the elementwise work is register-hungry, small tiles win
    64: {"fwd": (64, 32, 4, 4, 2, 1, 168), "dq": (64, 32, 4, 3, 2, 1), "dkdv": (64, 32, 4, 3, 2, 1)},
    128: {"fwd": (64, 32, 4, 3, 2, 1, 168), "dq": (64, 32, 4, 3, 2, 1), "dkdv": (64, 32, 4, 2, 2, 1)},
    256: {"fwd": (64, 32, 4, 1, 2, 1), "dq": (32, 32, 4, 1, 2, 1), "dkdv": (32, 32, 4, 1, 2, 1)},
    "float32": {"fwd": (64, 32, 4, 1, 0, 0), "dq": (32, 32, 4, 1, 0, 0), "dkdv": (32, 32, 4, 1, 0, 0)},
}
# 16-bit inputs: every product that takes a computed tile (A v in the forward; A dO, dz k, dz q and beta k in the
# backward) is a single float16 product, bfloat16 operands entering as float16 copies scaled per kv-head by a power
# of two (_scaled_f16). With F16_PRODUCTS off, the forward's A goes in as a bfloat16 hi + lo pair instead.
F16_PRODUCTS = True
# Early exit on used-up sticks (EXHAUSTED): exact, since what it skips rounds to 0; the key blocks the forward
# walks past the diagonal before it checks. Packed variable-length batches (cu_seqlens) take it only with
# EARLY_EXIT_VARLEN too: their early-exit forward kernel ran 5% slower where sticks last (kernels/README.md).
EARLY_EXIT = True
EARLY_EXIT_VARLEN = False
EXIT_SEGMENTS = {"interpret": 6, "gpu": 8}
# The compiled kernel of each launch, kept for benchmarks/ to report registers, spills and machine code.
COMPILED = {}
# Chunks of the backward table: at most MAX_CHUNKS per sequence, each a multiple of every block size.
MAX_CHUNKS = 32
MIN_CHUNK = {"interpret": 64, "gpu": 128}


def _config(kernel, block_d, dtype, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, scan, scan, launch options) for one kernel."""
    if INTERPRET or device.type != "cuda":
        cfg = CONFIGS["interpret"][kernel]
    elif dtype == torch.float32:
        cfg = CONFIGS["float32"][kernel]
    else:
        cfg = CONFIGS[min(256, max(64, block_d))][kernel]
    # float32 keeps the exact float32 scan; an optional 7th entry caps the registers per thread (ptxas maxnreg)
    scans = (0, 0) if dtype == torch.float32 else cfg[4:6]
    return cfg[:4] + scans + ({"maxnreg": cfg[6]} if len(cfg) > 6 else {},)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _common(q, k, v, cu_seqlens, max_len):
    B, H, T, D = q.shape
    DV = v.shape[-1]
    group = H // k.shape[1]
    if cu_seqlens is None:
        n_seq, cu = 1, q  # cu is unused without VARLEN
    else:
        n_seq, cu = cu_seqlens.numel() - 1, cu_seqlens
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    upcast = INTERPRET or q.device.type != "cuda"
    dot_dtype = _TL_DTYPE[q.dtype]
    precision = "tf32" if (q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    half = q.dtype != torch.float32
    return dict(B=B, H=H, T=T, D=D, DV=DV, group=group, n_seq=n_seq, max_len=max_len, cu=cu, block_d=block_d,
                block_dv=block_dv, device=q.device, upcast=upcast, dtype=q.dtype, dot_dtype=dot_dtype,
                precision=precision, varlen=cu_seqlens is not None, f16=half and F16_PRODUCTS,
                split_a=half and not F16_PRODUCTS)


def _group_amax(x, hk):
    """The largest magnitude of x (B, heads, T[, d]) per (batch, kv-head): the q-heads of a GQA group together."""
    x = x.detach().unflatten(1, (hk, x.shape[1] // hk))
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=tuple(range(2, x.dim())), dtype=torch.float32)


@triton.jit
def _pow2_scale(amax):
    """A power of two that puts amax (>= 0) in [2^13, 2^14), at most 2^127; 1 where amax is 0, inf or NaN (those
    propagate as they would anyway). Exact: the exponent comes from amax's bits."""
    ok = (amax > 0) & (amax < float("inf"))
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.where(ok, tl.minimum(13 - e, 127), 0)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_f16_kernel(X, S, Y, T, s_xb, s_xh, s_xt, s_xd, H, GROUP, D: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Y = X * S as float16, one [BLOCK_T, D] tile of one head per program; S per (batch, kv-head)."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    b_s = tl.load(S + i_b * (H // GROUP) + i_h // GROUP)
    o_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m = (o_t[:, None] < T) & (o_d[None, :] < D)
    b_x = tl.load(X + i_b * s_xb + i_h * s_xh + o_t[:, None] * s_xt + o_d[None, :] * s_xd, mask=m, other=0.0)
    b_y = b_x.to(tl.float32) * b_s
    tl.store(Y + (i_bh * T + o_t[:, None]) * D + o_d[None, :], b_y.to(tl.float16), mask=m)


def _scaled_f16(x, s):
    """x * s as float16 for a bfloat16 x (B, heads, T, d) and s (B, Hk) from _pow2_scale: bfloat16 values keep every
    bit (only values 2^28 times smaller than the largest reach float16's subnormals, where they keep an absolute
    accuracy of 2^-39 of it). One pass of a small kernel, any strides in: x * s is exact in float32 (s is a power
    of two), then rounded once to float16. (PyTorch's mul with a float16 `out` took the generic, unvectorized path:
    about 100 us for a (4, 12, 4096, 128) tensor on an H100, five times per forward+backward.)"""
    B, H, T, d = x.shape
    y = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    block_d = triton.next_power_of_2(d)
    block_t = max(1, 8192 // block_d)
    grid = (B * H, triton.cdiv(T, block_t))
    if grid[1] > 0 and B * H > 0:
        _scaled_f16_kernel[grid](x.detach(), s.contiguous(), y, T, *x.stride(), H, H // s.shape[1], D=d,
                                 BLOCK_T=block_t, BLOCK_D=block_d)
    return y


def _exit_rows(B, H, T, cu_seqlens):
    """The shape of lo, the first key each row's walk reached: (B, H, T) where early exit applies to the call (a
    packed batch only with EARLY_EXIT_VARLEN), else empty."""
    return (B, H, T) if EARLY_EXIT and (EARLY_EXIT_VARLEN or cu_seqlens is None) else (0,)


def _walks_can_stop(c, lo):
    """Whether early exit applies to this call: lo (from the forward) is kept and some walk is longer than the
    forward's first segment. Shorter walks cannot stop early (and ptxas crashed compiling the early-exit forward
    for T = 1, which Triton specializes as a constant)."""
    bm, bn = _config("fwd", max(c["block_d"], c["block_dv"]), c["dtype"], c["device"])[:2]
    return lo.numel() > 0 and c["max_len"] > bm + _exit_segment(c) * bn


def _exit_segment(c):
    return EXIT_SEGMENTS["interpret" if c["upcast"] else "gpu"]


@triton.jit
def _forward_table_kernel(AMAX_V, S, TABLE, N, COPY: tl.constexpr, BLOCK: tl.constexpr):
    """Per (batch, kv-head): S, the scale of v's float16 copy (COPY), and TABLE [1 / S, 0 (the non-finite flag)]."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_inv = tl.full([BLOCK], 1.0, dtype=tl.float32)
    if COPY:
        b_s = _pow2_scale(tl.load(AMAX_V + o, mask=m, other=0.0))
        tl.store(S + o, b_s, mask=m)
        b_inv = 1.0 / b_s
    tl.store(TABLE + 2 * o, b_inv, mask=m)
    tl.store(TABLE + 2 * o + 1, tl.zeros([BLOCK], dtype=tl.float32), mask=m)


def _forward_table(c, v):
    """The forward's v operand and a table (B, Hk, 2) per kv-head: [1 / the scale of v, a flag the early-exit
    forward sets where the kv-head's k or v holds a NaN or an infinity].

    With F16_PRODUCTS a bfloat16 v goes in as a float16 copy (_scaled_f16) and o is scaled back; else v itself
    and 1."""
    B, hk = v.shape[:2]
    copy = c["f16"] and v.dtype == torch.bfloat16
    table = torch.empty(B, hk, 2, dtype=torch.float32, device=v.device)
    s = torch.empty(B, hk, dtype=torch.float32, device=v.device) if copy else None
    # without a copy the unused pointers get the table (a kernel takes tensors where a launch may leave them out)
    _forward_table_kernel[(triton.cdiv(B * hk, 128),)](_group_amax(v, hk) if copy else table,
                                                       table if s is None else s, table, B * hk, COPY=copy,
                                                       BLOCK=128)
    return (_scaled_f16(v, s) if copy else v), table


@triton.jit
def _backward_table_kernel(AMAX, S, TABLE, N, scale, DV, COPY: tl.constexpr, DZ: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Per (batch, kv-head), from AMAX (5, N) of q, k, v, dO, g: S (4, N), the scales of the float16 copies of
    q, k, v, dO (COPY), and the backward's TABLE (N, 8) (see _backward_operands), in float64 until the store."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_aq = tl.load(AMAX + o, mask=m, other=0.0)
    b_ak = tl.load(AMAX + N + o, mask=m, other=0.0)
    b_av = tl.load(AMAX + 2 * N + o, mask=m, other=0.0)
    b_ado = tl.load(AMAX + 3 * N + o, mask=m, other=0.0)
    b_ag = tl.load(AMAX + 4 * N + o, mask=m, other=0.0)
    if COPY:
        b_sq, b_sk, b_sv, b_sdo = _pow2_scale(b_aq), _pow2_scale(b_ak), _pow2_scale(b_av), _pow2_scale(b_ado)
        tl.store(S + o, b_sq, mask=m)
        tl.store(S + N + o, b_sk, mask=m)
        tl.store(S + 2 * N + o, b_sv, mask=m)
        tl.store(S + 3 * N + o, b_sdo, mask=m)
    else:
        b_sq = tl.full([BLOCK], 1.0, dtype=tl.float32)
        b_sk, b_sv, b_sdo = b_sq, b_sq, b_sq
    b_sq, b_sk, b_sv, b_sdo = b_sq.to(tl.float64), b_sk.to(tl.float64), b_sv.to(tl.float64), b_sdo.to(tl.float64)
    b_grad = b_sdo * b_sv
    if DZ:
        # dz_scale = 2^e, e = floor(15 - log2(bound)) = 15 - ceil(log2(bound)), from the bits of bound
        b_bound = (2.0 * DV) * b_ado.to(tl.float64) * b_av.to(tl.float64) * b_grad + b_ag.to(tl.float64) * b_grad
        ok = (b_bound > 0) & (b_bound < float("inf"))
        b_bits = tl.where(ok, b_bound, 1.0).to(tl.int64, bitcast=True)
        b_e = 15 - (((b_bits >> 52) & 0x7FF) - 1023) - ((b_bits & 0xFFFFFFFFFFFFF) != 0).to(tl.int64)
        b_e = tl.where(ok, tl.minimum(tl.maximum(b_e, -100), 100), 0)
    else:
        b_e = tl.zeros([BLOCK], dtype=tl.int64)
    b_dz = ((b_e + 1023) << 52).to(tl.float64, bitcast=True)
    b_gdz = b_grad * b_dz
    # 1 where an input or a gradient is not finite, which turns early exit off (NaN in, NaN out)
    finite = (b_aq < float("inf")) & (b_ak < float("inf")) & (b_av < float("inf")) & (b_ado < float("inf"))
    b_walk_all = tl.where(finite & (b_ag < float("inf")), 0.0, 1.0)
    scale64 = tl.full([BLOCK], scale, dtype=tl.float64)
    p = TABLE + 8 * o
    tl.store(p, (1.0 / (b_sq * b_sk)).to(tl.float32), mask=m)
    tl.store(p + 1, b_gdz.to(tl.float32), mask=m)
    tl.store(p + 2, b_dz.to(tl.float32), mask=m)
    tl.store(p + 3, (scale64 / (b_gdz * b_sk)).to(tl.float32), mask=m)
    tl.store(p + 4, (scale64 / (b_gdz * b_sq)).to(tl.float32), mask=m)
    tl.store(p + 5, (1.0 / b_sdo).to(tl.float32), mask=m)
    tl.store(p + 6, b_e.to(tl.float32), mask=m)
    tl.store(p + 7, b_walk_all, mask=m)


def _backward_operands(c, do, g, q, k, v):
    """The backward's operands (float16 copies of bfloat16 ones, else the inputs) and a table (B, Hk, 8) of the
    scales the kernels fold in: [1 / (s_q s_k) for the logits, G dz_scale for g, dz_scale, the factors that turn
    the accumulators into dq, dk, dv, log2(dz_scale), 1 where an input or gradient is not finite].

    With G = s_dO s_v the product of the copies gives G dO.v; the kernels multiply dl by dz_scale, a power of two
    such that G dz_scale |dl|, |C + g| and |dz| stay below 2^15 however the head's numbers fall (dl, C and dz go to
    float16 products): |dz| <= |dl| + |C + g| <= 2 max|dO . v| + max|g|, max|dO . v| <= Dv max|dO| max|v|."""
    B, hk = k.shape[:2]
    # the largest magnitudes of q, k, v, dO and g per (batch, kv-head) in one (5, B, Hk) tensor
    amax = torch.stack([_group_amax(x, hk) for x in (q, k, v, do, g)])
    copy = q.dtype == torch.bfloat16
    s = torch.empty(4, B, hk, dtype=torch.float32, device=q.device) if copy else None
    table = torch.empty(B, hk, 8, dtype=torch.float32, device=q.device)
    _backward_table_kernel[(triton.cdiv(B * hk, 128),)](amax, table if s is None else s, table, B * hk,
                                                        float(c["scale"]), c["DV"],
                                                        COPY=copy, DZ=q.dtype != torch.float32, BLOCK=128)
    if copy:
        q, k, v, do = (_scaled_f16(x, s[i]) for i, x in enumerate((q, k, v, do)))
    return do, q, k, v, table


def _forward(q, k, v, scale, attend_current, cu_seqlens, max_len):
    """(o, rem, lo): with EARLY_EXIT, lo (B, H, T) int32 holds the first key each row's block walked, for the
    backward; without it lo is empty and the backward walks everything."""
    c = _common(q, k, v, cu_seqlens, max_len)
    B, H, T = c["B"], c["H"], c["T"]
    o = torch.empty(B, H, T, c["DV"], dtype=q.dtype, device=q.device)
    rem = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages, scan_l, _, extra = _config("fwd", max(c["block_d"], c["block_dv"]), q.dtype,
                                                      q.device)
    lo = torch.empty(_exit_rows(B, H, T, cu_seqlens), dtype=torch.int32, device=q.device)
    exit_early = _walks_can_stop(c, lo)
    grid = (B * c["n_seq"] * H, triton.cdiv(c["max_len"], bm))
    if grid[1] > 0:
        v_op, table = _forward_table(c, v)
        args = (q, k, v_op, o, rem, lo if exit_early else rem, c["cu"], table, float(scale), T, *q.stride(),
                *k.stride(), *v_op.stride(), *o.stride())
        kwargs = dict(H=H, SCAN_L=scan_l, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                      OP_DTYPE=tl.float16 if c["f16"] else c["dot_dtype"], SPLIT_A=c["split_a"],
                      EXIT_SEGMENT=_exit_segment(c), **extra, **_kernel_args(c, attend_current, c["dot_dtype"]))
        COMPILED["fwd"] = _fwd_kernel[grid](*args, EARLY_EXIT=exit_early, REDO=False, **kwargs)
        # NaN in, NaN out: blocks that stopped early in a head with a non-finite key or value walk everything. On
        # a GPU the second launch always runs (reading the flags would wait for the GPU); CPU tensors (Triton's
        # interpreter, where a launch is dear) read them first
        if exit_early and (q.device.type == "cuda" or bool(table[..., 1].any())):
            _fwd_kernel[grid](*args, EARLY_EXIT=False, REDO=True, **kwargs)
    return o, rem, lo


def chunk_size(max_len, interpret):
    """Keys per chunk of the backward table: a power of two >= the smallest chunk, at most MAX_CHUNKS chunks."""
    smallest = MIN_CHUNK["interpret" if interpret else "gpu"]
    return max(smallest, triton.next_power_of_2(triton.cdiv(max(max_len, 1), MAX_CHUNKS)))


def _backward(do, drem, q, k, v, rem, lo, scale, attend_current, cu_seqlens, max_len):
    c = _common(q, k, v, cu_seqlens, max_len)
    if c["max_len"] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    c["scale"] = scale
    c["lo"] = lo if _walks_can_stop(c, lo) else None
    drem = drem.to(torch.float32).contiguous()
    ops = _backward_operands(c, do, drem * rem, q, k, v)
    dq, delta_g, tw, tr, chunk = _backward_dq(c, ops, drem, rem, attend_current)
    dk, dv = _backward_dkdv(c, ops, delta_g, tw, tr, chunk, attend_current)
    return dq, dk, dv


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _exit_bounds_kernel(LO, CU, SUF, MB_STOP, T, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, TILE: tl.constexpr):
    """For the key-major kernel under early exit, per (batch, head) row and sequence: at the start n0 of each key
    block, how many query blocks of the sequence (from its first) reach back to that block; the rows of every
    later block stopped their walks (LO, from the forward) right of it.

    A query block's rows reach back to the smallest LO among them, the blocks from m on to suf[m], the smallest of
    those from m on. suf grows with m, so the blocks that reach key block j are the first ones, as many as have
    suf[m] <= the block's last key."""
    i_bh = tl.program_id(0)
    seq_start, seq_end = _seq_bounds(CU, tl.program_id(1), T, VARLEN)
    LO += i_bh * T
    SUF += i_bh * T
    MB_STOP += i_bh * T
    n_mb = tl.cdiv(seq_end - seq_start, BLOCK_M)
    n_kb = tl.cdiv(seq_end - seq_start, BLOCK_N)
    n_tiles = tl.cdiv(n_mb, TILE)
    o_t = tl.arange(0, TILE)
    o_r = tl.arange(0, BLOCK_M)
    # suf, right to left a tile of query blocks at a time, kept at each block's first row
    b_min = seq_end
    for it in range(n_tiles):
        o_b = (n_tiles - 1 - it) * TILE + o_t
        o_row = seq_start + o_b[:, None] * BLOCK_M + o_r[None, :]
        b_lo = tl.load(LO + o_row, mask=(o_b[:, None] < n_mb) & (o_row < seq_end), other=seq_end)
        b_blo = tl.min(b_lo, axis=1)
        b_suf = tl.minimum(tl.associative_scan(b_blo, 0, _min, reverse=True), b_min)
        tl.store(SUF + seq_start + o_b * BLOCK_M, b_suf, mask=o_b < n_mb)
        b_min = tl.minimum(b_min, tl.min(b_blo, axis=0))
    # the stores above are read back by other threads
    tl.debug_barrier()
    for jt in range(tl.cdiv(n_kb, TILE)):
        o_j = jt * TILE + o_t
        b_last = tl.minimum(seq_start + (o_j + 1) * BLOCK_N, seq_end) - 1
        b_count = tl.zeros([TILE], dtype=tl.int32)
        for it in range(n_tiles):
            o_b = it * TILE + o_t
            b_suf = tl.load(SUF + seq_start + o_b * BLOCK_M, mask=o_b < n_mb, other=seq_end)
            b_count += tl.sum((b_suf[None, :] <= b_last[:, None]).to(tl.int32), axis=1)
        tl.store(MB_STOP + seq_start + o_j * BLOCK_N, b_count, mask=o_j < n_kb)


def _exit_bounds(lo, c, block_m, block_n):
    """MB_STOP (B, H, T) int32 for the key-major kernel, set at each key block's first key (_exit_bounds_kernel)."""
    B, H, T = lo.shape
    suf = torch.empty_like(lo)
    mb_stop = torch.empty_like(lo)
    _exit_bounds_kernel[(B * H, c["n_seq"])](lo, c["cu"], suf, mb_stop, T, VARLEN=c["varlen"], BLOCK_M=block_m,
                                            BLOCK_N=block_n, TILE=64)
    return mb_stop


def _kernel_args(c, attend_current, dot_dtype):
    return dict(GROUP=c["group"], N_SEQ=c["n_seq"], D=c["D"], DV=c["DV"], VARLEN=c["varlen"],
                ATTEND_CURRENT=bool(attend_current), UPCAST=c["upcast"], DOT_DTYPE=dot_dtype,
                PRECISION=c["precision"], BLOCK_D=c["block_d"], BLOCK_DV=c["block_dv"])


def _backward_dq(c, ops, drem, rem, attend_current):
    """The query-major kernel: dq, delta + g per row and the table of (W, R) carries at the chunk boundaries."""
    B, H, T = c["B"], c["H"], c["T"]
    do, q, k, v, table = ops
    dev = q.device
    chunk = chunk_size(c["max_len"], c["upcast"])
    n_chunks = max(1, triton.cdiv(c["max_len"], chunk))
    # (W, R) carries at the right end of each chunk, per query row; rows left of a boundary keep an empty carry
    tw = torch.zeros(B, H, n_chunks, T, dtype=torch.float32, device=dev)
    tr = torch.zeros(B, H, n_chunks, T, dtype=torch.float32, device=dev)
    delta_g = torch.empty(B, H, T, dtype=torch.float32, device=dev)
    dq = torch.empty(B, H, T, c["D"], dtype=c["dtype"], device=dev)
    bm, bn, warps, stages, scan_l, scan_dl, extra = _config("dq", max(c["block_d"], c["block_dv"]), c["dtype"], dev)
    assert chunk % bm == 0 and chunk % bn == 0
    grid = (B * c["n_seq"] * H, triton.cdiv(c["max_len"], bm))
    COMPILED["dq"] = _bwd_dq_kernel[grid](
        q, k, v, do, rem, drem, dq, delta_g, tw, tr, c["cu"], table, float(c["scale"]), T, chunk, n_chunks,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), H=H, BLOCK_M=bm, BLOCK_N=bn, SCAN_L=scan_l,
        SCAN_DL=scan_dl, num_warps=warps, num_stages=stages, **extra,
        **_kernel_args(c, attend_current, _TL_DTYPE[q.dtype]))
    return dq, delta_g, tw, tr, chunk


def _backward_dkdv(c, ops, delta_g, tw, tr, chunk, attend_current):
    """The key-major kernel: dk and dv, reading and advancing the table's carries chunk by chunk."""
    B, H, T = c["B"], c["H"], c["T"]
    do, q, k, v, table = ops
    hk = k.shape[1]
    dk = torch.empty(B, hk, T, c["D"], dtype=c["dtype"], device=q.device)
    dv = torch.empty(B, hk, T, c["DV"], dtype=c["dtype"], device=q.device)
    bm, bn, warps, stages, scan_l, scan_dl, extra = _config("dkdv", max(c["block_d"], c["block_dv"]), c["dtype"],
                                                            q.device)
    assert chunk % bn == 0
    n_chunks = tw.shape[2]
    grid = (B * c["n_seq"] * hk, n_chunks)
    exit_early = c["lo"] is not None
    mb_stop = _exit_bounds(c["lo"], c, bm, bn) if exit_early else tw
    COMPILED["dkdv"] = _bwd_dkdv_kernel[grid](
        q, k, v, do, delta_g, tw, tr, dk, dv, mb_stop, c["cu"], table, float(c["scale"]), T, chunk, n_chunks,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), H=H, BLOCK_M=bm, BLOCK_N=bn, SCAN_L=scan_l,
        SCAN_DL=scan_dl, EARLY_EXIT=exit_early, num_warps=warps, num_stages=stages, **extra,
        **_kernel_args(c, attend_current, _TL_DTYPE[q.dtype]))
    return dk, dv


@torch.library.custom_op("sb_ref::stick_breaking_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attend_current: bool,
            cu_seqlens: Optional[torch.Tensor], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, attend_current, cu_seqlens, max_len)


@_fwd_op.register_fake
def _(q, k, v, scale, attend_current, cu_seqlens, max_len):
    B, H, T, _ = q.shape
    lo = q.new_empty(_exit_rows(B, H, T, cu_seqlens), dtype=torch.int32)
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32), lo


@torch.library.custom_op("sb_ref::stick_breaking_triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, drem: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            rem: torch.Tensor, lo: torch.Tensor, scale: float, attend_current: bool,
            cu_seqlens: Optional[torch.Tensor], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, drem, q, k, v, rem, lo, scale, attend_current, cu_seqlens, max_len)


@_bwd_op.register_fake
def _(do, drem, q, k, v, rem, lo, scale, attend_current, cu_seqlens, max_len):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, attend_current, cu_seqlens, max_len = inputs
    _, rem, lo = output
    # the backward recomputes everything from q, k, v, one float32 per row (the remainder, for g = dRem * rem) and
    # under early exit one int32 per row (how far the forward walked)
    ctx.save_for_backward(q, k, v, rem, lo, cu_seqlens)
    ctx.mark_non_differentiable(lo)
    ctx.scale = scale
    ctx.attend_current = attend_current
    ctx.max_len = max_len


def _autograd_backward(ctx, do, drem, _):
    q, k, v, rem, lo, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    if drem is None:
        drem = torch.zeros_like(rem)
    dq, dk, dv = _bwd_op(do, drem, q, k, v, rem, lo, ctx.scale, ctx.attend_current, cu_seqlens, ctx.max_len)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _max_seqlen(T, cu_seqlens):
    """The longest sequence: T, or the widest gap of cu_seqlens (read back from the GPU)."""
    if cu_seqlens is None:
        return T
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def stick_breaking_attention_triton(q, k, v, scale: float, attend_current: bool, cu_seqlens=None,
                                    max_seqlen=None):
    """(o, rem) of stick-breaking attention through the Triton kernels; inputs are validated by sb_ref.

    q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv) in one of float16/bfloat16/float32; cu_seqlens None or
    (N+1,) int offsets with B == 1, and max_seqlen the longest of its sequences (read from cu_seqlens, one wait
    for the GPU, when not given; pass it when it is known on the host: the kernels trust it, and a shorter one
    leaves rows unwritten). Returns o (B, Hq, T, Dv) in q.dtype and
    rem (B, Hq, T) float32, both differentiable in q, k and v. Backward is deterministic (no atomics).
    """
    if cu_seqlens is None or max_seqlen is None:
        max_seqlen = _max_seqlen(q.shape[2], cu_seqlens)
    o, rem, _ = _fwd_op(q, k, v, float(scale), bool(attend_current), cu_seqlens, int(max_seqlen))
    return o, rem
