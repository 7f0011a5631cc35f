"""Stick-breaking decoding in Triton: a few new queries against a key/value cache, split-K over the cache.

    A_ij = beta_ij * prod_{j<k<i} (1 - beta_ik),   o_i = sum_j A_ij v_j,   rem_i = prod_j (1 - beta_ij)

The new queries t = 0..Tn-1 of sequence b sit at positions p = L_b - Tn + t of its cache (L_b = cache_seqlens[b]
counts their own keys, already written); query t sees keys j < p (j <= p with attend_current). Positions from L_b
on are never read.

1. ``_decode_split_kernel``: a program owns one (batch, kv-head), a block of rows (the q-heads of the GQA group x
   the Tn new tokens) and one contiguous range [start, end) of the cache, the sequence's split ``i_s`` of
   ``N_SPLIT``. It walks its key blocks right to left with the forward's carry S = sum of log2(1 - beta) and
   leaves a partial (o_s, S_s) per row: the range's output as if nothing nearer existed, and the range's total.
   k and v are read once per kv-head, by the one program that owns the range. With one split it writes o and rem.
2. ``_decode_combine_kernel``: per row, the splits right to left with the associative rule
   o = o_near + 2^S_near o_far, S = S_near + S_far (kernels/README.md, "Decoding"); rem = 2^S. A fixed order: the
   result does not depend on how programs were scheduled.
3. The launcher: how many splits, the workspace, the public function.

Like the forward, every tile is upcast to float32 right after its load under the interpreter (UPCAST), and
computed tiles fed to a product are rounded to the operand dtype first, so the interpreter sees the GPU's
roundings. Inference only: nothing here records a gradient.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .config import DecodeConfig
from .tile_math import INTERPRET, LOG2E, TL_DTYPE, dot_split, load_tile, log_sigmoids, round_to


# ---------------------------------------------------------------------------------------------------------------
# 1. one split of the cache
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(Q, K, V, LENS, O, REM, OP, SP, s_q, s_k, s_v, s_o, scale, HK, GROUP, TN, N_SPLIT, N_RB,
                         D: tl.constexpr, DV: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, SPLIT_A: tl.constexpr, A_SCALE: tl.constexpr,
                         PRECISION: tl.constexpr, FINAL: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    i_bhr = tl.program_id(0)
    i_s = tl.program_id(1)
    i_rb = i_bhr % N_RB
    i_bhk = i_bhr // N_RB
    i_b = i_bhk // HK
    i_hk = i_bhk % HK
    qk_scale = scale * LOG2E

    # rows: (q-head of the group, new token), token fastest, so row r of kv-head i_hk is q-head
    # i_hk * GROUP + r // TN, token r % TN, and (batch, kv-head, row) enumerates (batch, q-head, token) in order
    rows = GROUP * TN
    o_r = i_rb * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < rows
    o_h = i_hk * GROUP + o_r // TN
    o_t = o_r % TN
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    p_q = Q + i_b * s_q[0] + o_h[:, None] * s_q[1] + o_t[:, None] * s_q[2] + o_d[None, :] * s_q[3]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)

    # this sequence's valid cache [0, L); row t sees keys below lim = L - TN + t (+ 1 with attend_current)
    seq_len = tl.load(LENS + i_b).to(tl.int32)
    if ATTEND_CURRENT:
        lim = seq_len - TN + o_t + 1
    else:
        lim = seq_len - TN + o_t
    # the split: a whole number of key blocks, the last split of a sequence shorter or empty
    split_len = tl.cdiv(tl.cdiv(seq_len, N_SPLIT), BLOCK_N) * BLOCK_N
    start = i_s * split_len
    end = tl.minimum(start + split_len, seq_len)
    n_blocks = tl.where(end > start, tl.cdiv(end - start, BLOCK_N), 0)

    K += i_b * s_k[0] + i_hk * s_k[1]
    V += i_b * s_v[0] + i_hk * s_v[1]
    b_o = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    b_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    for it in range(n_blocks):
        # right to left: the carry b_s holds this split's keys between the block and the query
        o_n = start + (n_blocks - 1 - it) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        # keys past L are never loaded: garbage (even NaN) there cannot reach o
        b_k = load_tile(K, o_n, o_d, s_k[2], s_k[3], m_n, D, BLOCK_D, UPCAST)
        b_v = load_tile(V, o_n, o_dv, s_v[2], s_v[3], m_n, DV, BLOCK_DV, UPCAST)
        b_z = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_lb, b_lom, _, _ = log_sigmoids(b_z, DOT_DTYPE != tl.float32)
        m_vis = m_n[None, :] & (o_n[None, :] < lim[:, None])
        b_lom = tl.where(m_vis, b_lom, 0.0)
        # sum over the nearer keys of this tile (k > j): an exact reverse exclusive scan
        b_cum = tl.cumsum(b_lom, axis=1, reverse=True) - b_lom
        b_a = tl.where(m_vis, tl.exp2(b_lb + (b_s[:, None] + b_cum)), 0.0)
        # A in [0, 1], scaled by a power of two (float16: away from its subnormals), as hi + lo in 16 bits
        b_o = dot_split(b_a * A_SCALE, b_v, b_o, DOT_DTYPE, UPCAST, SPLIT_A, PRECISION)
        b_s += tl.sum(b_lom, axis=1)
    b_o = b_o * (1.0 / A_SCALE)

    if FINAL:
        # one split: this is the answer
        p_o = O + i_b * s_o[0] + o_h[:, None] * s_o[1] + o_t[:, None] * s_o[2] + o_dv[None, :] * s_o[3]
        b_o = round_to(b_o, O.dtype.element_ty, UPCAST)
        tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_r[:, None] & (o_dv[None, :] < DV))
        tl.store(REM + i_bhk * rows + o_r, tl.exp2(b_s), mask=m_r)
    else:
        # the partial (o_s, S_s) of row g, split i_s at OP[g, i_s, :] and SP[g, i_s]
        o_g = i_bhk * rows + o_r
        p_op = OP + (o_g[:, None] * N_SPLIT + i_s) * DV + o_dv[None, :]
        tl.store(p_op, b_o, mask=m_r[:, None] & (o_dv[None, :] < DV))
        tl.store(SP + o_g * N_SPLIT + i_s, b_s, mask=m_r)


# ---------------------------------------------------------------------------------------------------------------
# 2. the splits combined, nearest first
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _decode_combine_kernel(OP, SP, O, REM, s_o, N_ROWS, HQ, TN, N_SPLIT,
                           DV: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    o_g = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_g = o_g < N_ROWS
    o_dv = tl.arange(0, BLOCK_DV)
    m_o = m_g[:, None] & (o_dv[None, :] < DV)
    b_o = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    b_s = tl.zeros([BLOCK_R], dtype=tl.float32)
    for it in range(N_SPLIT):
        # o = o_near + 2^S_near o_far, S = S_near + S_far: the nearer splits' total discounts a farther split
        i_s = N_SPLIT - 1 - it
        b_op = tl.load(OP + (o_g[:, None] * N_SPLIT + i_s) * DV + o_dv[None, :], mask=m_o, other=0.0)
        b_o += tl.exp2(b_s)[:, None] * b_op
        b_s += tl.load(SP + o_g * N_SPLIT + i_s, mask=m_g, other=0.0)
    # row g is (batch, q-head, token) with the token fastest
    o_t = o_g % TN
    o_bh = o_g // TN
    p_o = O + (o_bh // HQ)[:, None] * s_o[0] + (o_bh % HQ)[:, None] * s_o[1] + o_t[:, None] * s_o[2] + o_dv[None, :] * s_o[3]
    b_o = round_to(b_o, O.dtype.element_ty, UPCAST)
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_o)
    tl.store(REM + o_g, tl.exp2(b_s), mask=m_g)


# ---------------------------------------------------------------------------------------------------------------
# 3. launcher
# ---------------------------------------------------------------------------------------------------------------
def split_count(config, n_programs, max_len, sms, split_keys):
    """Splits per sequence for n_programs (batch x kv-head x row block) work items on sms SMs: split_keys is
    (fewest, aimed) keys per split (DecodeConfig)."""
    fewest_keys, aimed_keys = split_keys
    n_programs = max(n_programs, 1)
    n = max(triton.cdiv(max_len, aimed_keys), triton.cdiv(sms, n_programs))
    n = min(n, triton.cdiv(config.programs_per_sm * sms, n_programs), triton.cdiv(max_len, fewest_keys),
            config.max_splits)
    return max(1, n)


def num_splits(config, n_programs, max_len, device):
    """split_count for this device: the GPU's SMs and config.split_keys, or the interpreter's."""
    if INTERPRET or device.type != "cuda":
        return split_count(config, n_programs, max_len, 4, config.interpreter_split_keys)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return split_count(config, n_programs, max_len, sms, config.split_keys)


def plan(config, B, Hq, Hk, Tn, max_len, device):
    """(rows per tile, row blocks per kv-head, splits) of a launch."""
    rows = (Hq // Hk) * Tn
    block_r = min(config.max_rows, max(config.min_rows, triton.next_power_of_2(rows)))
    n_rb = triton.cdiv(rows, block_r)
    return block_r, n_rb, config.splits or num_splits(config, B * Hk * n_rb, max_len, device)


def stick_breaking_decode_triton(q, k_cache, v_cache, cache_seqlens, scale: float, attend_current: bool,
                                 max_seqlen: Optional[int] = None, config: DecodeConfig = DecodeConfig()):
    """(o, rem) of the Tn new queries against the cache, through the split-K decode kernels; inputs are validated
    by sb_ref.stick_breaking_decode.

    q (B, Hq, Tn, D), k_cache (B, Hk, Tmax, D), v_cache (B, Hk, Tmax, Dv) in one of float16/bfloat16/float32, any
    strides; cache_seqlens (B,) int32/int64 on q's device with Tn <= cache_seqlens[b] <= Tmax. max_seqlen (the
    largest cache_seqlens, if the caller has it) saves a device sync; config: tiles and splits. Returns
    o (B, Hq, Tn, Dv) in q.dtype and rem (B, Hq, Tn) float32. No gradient. Deterministic.
    """
    B, Hq, Tn, D = q.shape
    Hk, DV = k_cache.shape[1], v_cache.shape[-1]
    group = Hq // Hk
    o = torch.empty(B, Hq, Tn, DV, dtype=q.dtype, device=q.device)
    rem = torch.empty(B, Hq, Tn, dtype=torch.float32, device=q.device)
    if o.numel() == 0 and rem.numel() == 0:
        return o, rem
    upcast = INTERPRET or q.device.type != "cuda"
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    block_n, warps, stages = config.tile(max(block_d, block_dv), upcast)
    if max_seqlen is None:
        max_seqlen = int(cache_seqlens.max())  # one sync
    block_r, n_rb, n_split = plan(config, B, Hq, Hk, Tn, max_seqlen, q.device)
    half = q.dtype != torch.float32
    # float16 A is scaled by 2^15 (A <= 1 stays below 65504) so that small weights keep float16's precision
    a_scale = 32768.0 if q.dtype == torch.float16 else 1.0
    precision = "tf32" if (q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    if n_split > 1:
        o_part = torch.empty(B * Hq * Tn, n_split, DV, dtype=torch.float32, device=q.device)
        s_part = torch.empty(B * Hq * Tn, n_split, dtype=torch.float32, device=q.device)
    else:
        o_part = s_part = rem  # unused
    _decode_split_kernel[(B * Hk * n_rb, n_split)](
        q, k_cache, v_cache, cache_seqlens, o, rem, o_part, s_part, q.stride(), k_cache.stride(), v_cache.stride(),
        o.stride(), float(scale), Hk, group, Tn, n_split, n_rb, D=D, DV=DV, ATTEND_CURRENT=bool(attend_current),
        UPCAST=upcast, DOT_DTYPE=TL_DTYPE[q.dtype], SPLIT_A=half, A_SCALE=a_scale, PRECISION=precision,
        FINAL=n_split == 1, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps,
        num_stages=stages)
    if n_split > 1:
        n_rows = B * Hq * Tn
        _decode_combine_kernel[(triton.cdiv(n_rows, config.combine_rows),)](
            o_part, s_part, o, rem, o.stride(), n_rows, Hq, Tn, n_split, DV=DV, UPCAST=upcast,
            BLOCK_R=config.combine_rows, BLOCK_DV=block_dv, num_warps=4)
    return o, rem
