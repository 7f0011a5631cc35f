"""The tile math every kernel shares: log-sigmoids without log(sigmoid), roundings, the in-tile cumsums, tile
loads and sequence bounds (kernels/README.md, "Numerics" and "The in-tile cumsums", derives them).

Logits are kept in base 2 throughout (z = log2(e) * scale * q.k, log2 beta, log2(1 - beta), exp2): the scale
absorbs the conversion, so every exp is a bare exp2. Under TRITON_INTERPRET=1 (UPCAST) every tile is float32 right
after its load and a tile fed to a product is rounded to the operand dtype first, so the interpreter sees the
GPU's roundings.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def neg_log2_1p(e, SHORT: tl.constexpr):
    """-log2(1 + e) for e in [0, 1] as e * p(e): -p interpolates log2(1 + x) / x at Chebyshev points of [0, 1]
    (degree 9, or 5 under 16-bit inputs, SHORT). Evaluated in float32 it is within 2e-7 (1e-5) of the exact value,
    relative, down to the smallest e: a proper log1p, with FMAs only (no log, no division, no special-function
    unit, whose fast log is only absolutely accurate near 1). The sign is in the coefficients: every use wants
    -log2(1 + e), and a negation the compiler cannot fold costs an instruction per logit."""
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
def log_sigmoids(z, SHORT: tl.constexpr):
    """(log2 beta, log2(1 - beta), beta, 1 - beta) of base-2 logits z, each to a few float32 ulps (1e-5 with the
    short polynomial of 16-bit inputs). With e = exp(-|z|): log beta = min(z, 0) - log1p(e) and
    log(1 - beta) = -max(z, 0) - log1p(e); r = 1 / (1 + e) = 2^-log2(1 + e) is one exp2 (no division's range
    checks), and beta is r for z >= 0 and e r below, 1 - beta the other way round (no cancellation)."""
    e = tl.exp2(-tl.abs(z))
    nl1p = neg_log2_1p(e, SHORT)
    log_beta = tl.minimum(z, 0.0) + nl1p
    log_om = nl1p - tl.maximum(z, 0.0)
    r = tl.exp2(nl1p)
    er = e * r
    beta = tl.where(z >= 0, r, er)
    om = tl.where(z >= 0, er, r)
    return log_beta, log_om, beta, om


@triton.jit
def causal_log_sigmoids(b_q, b_k, qk_scale, o_m, o_n, MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
                        SHORT: tl.constexpr, PRECISION: tl.constexpr):
    """A [queries, keys] tile of base-2 logits and its log-sigmoids, log2(1 - beta) zeroed where a key is not
    visible (MASKED: only tiles that cross the diagonal need the mask). Returns (z, log2 beta, log2(1 - beta),
    beta, 1 - beta, the visibility mask)."""
    b_z = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_lb, b_lom, b_beta, b_om = log_sigmoids(b_z, SHORT)
    if ATTEND_CURRENT:
        m_vis = o_n[None, :] <= o_m[:, None]
    else:
        m_vis = o_n[None, :] < o_m[:, None]
    if MASKED:
        b_lom = tl.where(m_vis, b_lom, 0.0)
    return b_z, b_lb, b_lom, b_beta, b_om, m_vis


@triton.jit
def round_to(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
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
def dot_split(a, b, acc, DTYPE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for a float32 tile a; with SPLIT, a = hi + lo in two 16-bit parts (two tensor-core products),
    so that a is carried to ~16 bits instead of 8: a single bf16 rounding of A alone costs ~1.5e-3 in o."""
    a_hi = round_to(a, DTYPE, UPCAST)
    acc = tl.dot(a_hi, b, acc, input_precision=PRECISION)
    if SPLIT:
        a_lo = round_to(a - a_hi.to(tl.float32), DTYPE, UPCAST)
        acc = tl.dot(a_lo, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def triangle(BLOCK: tl.constexpr, NEARER: tl.constexpr, UPCAST: tl.constexpr):
    """The float16 0/1 matrix M that turns a product x @ M into an exclusive cumsum over the keys of a
    [queries, keys] tile: for each key j, the sum over keys k nearer the query (k > j) or farther (k < j)."""
    o_k = tl.arange(0, BLOCK)[:, None]
    o_j = tl.arange(0, BLOCK)[None, :]
    m = (o_k > o_j) if NEARER else (o_k < o_j)
    if UPCAST:
        return m.to(tl.float32)
    else:
        return m.to(tl.float16)


@triton.jit
def exclusive_cumsum(x, TRI, NEARER: tl.constexpr, PARTS: tl.constexpr, UPCAST: tl.constexpr):
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
            c = tl.dot(round_to(x, tl.float16, UPCAST), TRI)
        else:
            xc = tl.maximum(x, -60000.0)
            hi = round_to(xc, tl.float16, UPCAST)
            c = tl.dot(hi, TRI)
            c = tl.dot(round_to(xc - hi.to(tl.float32), tl.float16, UPCAST), TRI, c)
    return c


@triton.jit
def load_tile(P, o_r, o_c, s_r, s_c, m_r, N_C: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
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
def store_tile(P, b, o_r, o_c, s_r, s_c, m_r, N_C: tl.constexpr, UPCAST: tl.constexpr):
    """Stores a float32 [rows, BLOCK_C] tile in P's dtype (rounded as the GPU rounds), rows masked by m_r and
    columns past N_C left alone."""
    b = round_to(b, P.dtype.element_ty, UPCAST)
    tl.store(P + o_r[:, None] * s_r + o_c[None, :] * s_c, b.to(P.dtype.element_ty),
             mask=m_r[:, None] & (o_c[None, :] < N_C))


@triton.jit
def seq_bounds(CU, i_n, T, VARLEN: tl.constexpr):
    """[start, end) of the program's sequence: a cu_seqlens entry for packed batches, else the whole length."""
    if VARLEN:
        seq_start = tl.load(CU + i_n).to(tl.int32)
        seq_end = tl.load(CU + i_n + 1).to(tl.int32)
    else:
        seq_start = 0
        seq_end = T
    return seq_start, seq_end


@triton.jit
def query_block(CU, T, H, N_SEQ, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where a query-major program works: (batch, head, sequence bounds, first query row, key blocks).

    Grid axis 0 enumerates (batch, sequence, head), axis 1 the query blocks, heaviest (last) first: the GPU
    starts programs in launch order, so every head's longest walks go before anyone's short ones. Key blocks
    [0, nb_hi) hold every key a row of the block may see; those from nb_full on cross the diagonal."""
    i_bnh = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    i_h = i_bnh % H
    i_n = (i_bnh // H) % N_SEQ
    i_b = i_bnh // (H * N_SEQ)
    seq_start, seq_end = seq_bounds(CU, i_n, T, VARLEN)
    m0 = seq_start + i_m * BLOCK_M
    nb_hi = tl.where(m0 < seq_end, tl.cdiv(tl.minimum(m0 + BLOCK_M, seq_end) - seq_start, BLOCK_N), 0)
    nb_full = tl.minimum((m0 - seq_start) // BLOCK_N, nb_hi)
    return i_b, i_h, seq_start, seq_end, m0, nb_full, nb_hi


@triton.jit
def pow2_scale(amax):
    """A power of two that puts amax (>= 0) in [2^13, 2^14), at most 2^127; 1 where amax is 0, inf or NaN (those
    propagate as they would anyway). Exact: the exponent comes from amax's bits."""
    ok = (amax > 0) & (amax < float("inf"))
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.where(ok, tl.minimum(13 - e, 127), 0)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)
