"""Queries against a whole earlier segment of keys: every key visible, none nearer than the segment (context
parallelism's work of a query chunk against an earlier key chunk, sb_ref.distributed). Per query row it gives the
segment's output o and S = sum over the segment of log(1 - beta), the log of what the segment leaves of the
stick; a nearer segment's (o_n, S_n) and a farther one's combine as (o_n + exp(S_n) o_f, S_n + S_f).

The kernels are the op's walks with its tile math and 16-bit products: the forward's (forward._walk) over the
segment's key blocks, right to left, and the backward's two (backward._dq_walk, query-major, and
backward._dkdv_walk, key-major, through the carry table of kernels/README.md, "Backward"), with g = dL/dS in place
of dRem * rem. A segment has no diagonal; the walks' causal mask, given rows that all sit at position Tk (right
after the segment), masks exactly the keys past the segment's end, in the one block that holds them. Like every
kernel here they run compiled on a GPU and through Triton's interpreter on the CPU.
"""
import math

import torch
import triton
import triton.language as tl

from .backward import _dkdv_walk, _dq_walk
from .config import LaunchConfig, Problem
from .forward import FWD_TABLE, FWD_V_SCALE, _walk
from .operands import BWD_DK, BWD_DQ, BWD_DV, BWD_DZ, BWD_G, BWD_LOG2_DZ, BWD_LOGITS, BWD_TABLE, backward_operands, \
    forward_table
from .tile_math import LOG2E, TL_DTYPE, load_tile, store_tile, triangle

LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def segment_forward_kernel(Q, K, V, O, S, SC, s_q, s_k, s_v, scale, TQ, TK, H, GROUP, D: tl.constexpr,
                           DV: tl.constexpr, UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr,
                           PRECISION: tl.constexpr, SPLIT_A: tl.constexpr, SCAN_L: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr):
    """o (float32) and S (natural log) of one block of queries against every key of the segment."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    SC += (i_b * (H // GROUP) + i_h // GROUP) * FWD_TABLE
    Q += i_b * s_q[0] + i_h * s_q[1]
    K += i_b * s_k[0] + (i_h // GROUP) * s_k[1]
    V += i_b * s_v[0] + (i_h // GROUP) * s_v[1]
    O += i_bh * TQ * DV
    S += i_bh * TQ

    o_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < TQ
    b_q = load_tile(Q, o_m, tl.arange(0, BLOCK_D), s_q[2], s_q[3], m_m, D, BLOCK_D, UPCAST)
    b_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    TRI_L = triangle(BLOCK_N, True, UPCAST)
    # every row right after the segment: the causal mask keeps exactly the keys before TK
    o_after = tl.zeros([BLOCK_M], dtype=tl.int32) + TK
    nb = tl.cdiv(TK, BLOCK_N)
    n_masked = (TK % BLOCK_N != 0).to(tl.int32)  # the nearest block is short
    b_o, b_s, _ = _walk(b_o, b_s, b_s, b_q, o_after, K, V, s_k, s_v, 0, TK, nb, 0, n_masked, scale * LOG2E, TRI_L,
                        MASKED=True, CHECK=False, ATTEND_CURRENT=False, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE,
                        OP_DTYPE=OP_DTYPE, PRECISION=PRECISION, SPLIT_A=SPLIT_A, SCAN_L=SCAN_L, D=D, DV=DV,
                        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    b_o, b_s, _ = _walk(b_o, b_s, b_s, b_q, o_after, K, V, s_k, s_v, 0, TK, nb, n_masked, nb, scale * LOG2E, TRI_L,
                        MASKED=False, CHECK=False, ATTEND_CURRENT=False, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE,
                        OP_DTYPE=OP_DTYPE, PRECISION=PRECISION, SPLIT_A=SPLIT_A, SCAN_L=SCAN_L, D=D, DV=DV,
                        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    b_o *= tl.load(SC + FWD_V_SCALE)  # v may be a float16 copy scaled by a power of two
    store_tile(O, b_o, o_m, tl.arange(0, BLOCK_DV), DV, 1, m_m, DV, UPCAST)
    tl.store(S + o_m, b_s * LN2, mask=m_m)


def segment_forward_triton(q, k, v, scale, config=LaunchConfig()):
    """(o, S) of queries q (B, Hq, Tq, D) against every key of k (B, Hk, Tk, D), v (B, Hk, Tk, Dv): o (B, Hq, Tq, Dv)
    and S (B, Hq, Tq) in float32, S = sum over the keys of log(1 - sigmoid(scale q.k)). 16-bit or float32 inputs,
    as the op takes them; GQA by Hq % Hk == 0."""
    B, H, TQ, _ = q.shape
    TK, DV = k.shape[2], v.shape[-1]
    p = Problem.of(q, k, v, None, TQ, config)
    o = torch.empty(B, H, TQ, DV, dtype=torch.float32, device=q.device)
    S = torch.empty(B, H, TQ, dtype=torch.float32, device=q.device)
    if B * H * TQ == 0:
        return o, S
    if TK == 0:
        return o.zero_(), S.zero_()
    tile = p.tile("fwd")
    v_op, table = forward_table(v, copy=p.f16_products and v.dtype == torch.bfloat16)
    segment_forward_kernel[(B * H, triton.cdiv(TQ, tile.block_m))](
        q, k, v_op, o, S, table, q.stride(), k.stride(), v_op.stride(), float(scale), TQ, TK, H, p.group, D=p.D,
        DV=DV, UPCAST=p.upcast, DOT_DTYPE=TL_DTYPE[q.dtype],
        OP_DTYPE=tl.float16 if p.f16_products else TL_DTYPE[q.dtype],
        SPLIT_A=p.dtype != torch.float32 and not p.f16_products, PRECISION=p.precision, SCAN_L=tile.scan_l,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=p.block_d, BLOCK_DV=p.block_dv,
        **tile.launch_options())
    return o, S


@triton.jit
def segment_dq_kernel(Q, K, V, DO, DS, DQ, DELTA, TW, TR, SC, scale, TQ, TK, CHUNK, N_CHUNKS, s_q, s_k, s_v, s_do, H,
                      GROUP, D: tl.constexpr, DV: tl.constexpr, UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      PRECISION: tl.constexpr, SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dq (float32), delta + g and the chunk-boundary carries of one block of queries (backward.dq_kernel's)."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    SC += (i_b * (H // GROUP) + i_h // GROUP) * BWD_TABLE
    qk_scale = scale * LOG2E * tl.load(SC + BWD_LOGITS)
    Q += i_b * s_q[0] + i_h * s_q[1]
    K += i_b * s_k[0] + (i_h // GROUP) * s_k[1]
    V += i_b * s_v[0] + (i_h // GROUP) * s_v[1]
    DO += i_b * s_do[0] + i_h * s_do[1]
    DQ += i_bh * TQ * D
    DS += i_bh * TQ
    DELTA += i_bh * TQ
    TW += i_bh * N_CHUNKS * TQ
    TR += i_bh * N_CHUNKS * TQ

    o_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < TQ
    o_d = tl.arange(0, BLOCK_D)
    b_q = load_tile(Q, o_m, o_d, s_q[2], s_q[3], m_m, D, BLOCK_D, UPCAST)
    b_do = load_tile(DO, o_m, tl.arange(0, BLOCK_DV), s_do[2], s_do[3], m_m, DV, BLOCK_DV, UPCAST)
    b_g = tl.load(DS + o_m, mask=m_m, other=0.0) * tl.load(SC + BWD_G)  # g_i = dLoss / dS_i
    TRI_L = triangle(BLOCK_N, True, UPCAST)
    TRI_C = triangle(BLOCK_N, False, UPCAST)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_x = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_w = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    o_after = tl.zeros([BLOCK_M], dtype=tl.int32) + TK
    nb_hi = tl.cdiv(TK, BLOCK_N)
    nb_full = nb_hi - (TK % BLOCK_N != 0).to(tl.int32)
    b_dq, b_x, b_w, b_r = _dq_walk(b_dq, b_x, b_w, b_r, b_q, b_do, b_g, o_m, o_after, m_m, K, V, s_k, s_v, TW, TR, 0,
                                   TK, nb_full, nb_hi, qk_scale, tl.load(SC + BWD_LOG2_DZ), TQ, CHUNK, TRI_L, TRI_C,
                                   MASKED=True, ATTEND_CURRENT=False, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE,
                                   PRECISION=PRECISION, SCAN_L=SCAN_L, SCAN_DL=SCAN_DL, D=D, DV=DV, BLOCK_N=BLOCK_N,
                                   BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    b_dq, b_x, b_w, b_r = _dq_walk(b_dq, b_x, b_w, b_r, b_q, b_do, b_g, o_m, o_after, m_m, K, V, s_k, s_v, TW, TR, 0,
                                   TK, 0, nb_full, qk_scale, tl.load(SC + BWD_LOG2_DZ), TQ, CHUNK, TRI_L, TRI_C,
                                   MASKED=False, ATTEND_CURRENT=False, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE,
                                   PRECISION=PRECISION, SCAN_L=SCAN_L, SCAN_DL=SCAN_DL, D=D, DV=DV, BLOCK_N=BLOCK_N,
                                   BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    tl.store(DELTA + o_m, b_r + b_g, mask=m_m)
    store_tile(DQ, b_dq * tl.load(SC + BWD_DQ), o_m, o_d, D, 1, m_m, D, UPCAST)


@triton.jit
def segment_dkdv_kernel(Q, K, V, DO, DELTA, TW, TR, DK, DV_, SC, scale, TQ, TK, CHUNK, N_CHUNKS, s_q, s_k, s_v, s_do,
                        H, GROUP, D: tl.constexpr, DV: tl.constexpr, UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        PRECISION: tl.constexpr, SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk and dv (float32) of one chunk of the segment's keys of one kv-head (backward.dkdv_kernel's): every query
    block sees every key block; only the segment's last block, if short, is masked."""
    i_bhk = tl.program_id(0)
    i_c = tl.program_id(1)
    HK = H // GROUP
    i_b = i_bhk // HK
    i_hk = i_bhk % HK
    SC += i_bhk * BWD_TABLE
    qk_scale = scale * LOG2E * tl.load(SC + BWD_LOGITS)
    dz_scale = tl.load(SC + BWD_DZ)
    c0 = i_c * CHUNK
    nkb = tl.cdiv(tl.minimum(c0 + CHUNK, TK) - c0, BLOCK_N)
    mb_end = tl.cdiv(TQ, BLOCK_M)
    K += i_b * s_k[0] + i_hk * s_k[1]
    V += i_b * s_v[0] + i_hk * s_v[1]
    DK += i_bhk * TK * D
    DV_ += i_bhk * TK * DV
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    TRI_L = triangle(BLOCK_N, True, UPCAST)
    TRI_C = triangle(BLOCK_N, False, UPCAST)
    for it in range(nkb):
        n0 = c0 + (nkb - 1 - it) * BLOCK_N
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < TK
        b_k = load_tile(K, o_n, o_d, s_k[2], s_k[3], m_n, D, BLOCK_D, UPCAST)
        b_v = load_tile(V, o_n, o_dv, s_v[2], s_v[3], m_n, DV, BLOCK_DV, UPCAST)
        b_dkt = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        b_dvt = tl.zeros([BLOCK_DV, BLOCK_N], dtype=tl.float32)
        mb_masked = tl.where(n0 + BLOCK_N > TK, mb_end, 0)  # the short block: every query block masked
        for g in range(GROUP):
            i_h = i_hk * GROUP + g
            off_row = (i_b * H + i_h) * TQ
            off_tab = ((i_b * H + i_h) * N_CHUNKS + i_c) * TQ
            Qh = Q + i_b * s_q[0] + i_h * s_q[1]
            DOh = DO + i_b * s_do[0] + i_h * s_do[1]
            b_dkt, b_dvt = _dkdv_walk(b_dkt, b_dvt, b_k, b_v, o_n, Qh, DOh, s_q, s_do, DELTA + off_row,
                                      TW + off_tab, TR + off_tab, 0, TQ, 0, mb_masked, qk_scale, dz_scale, TRI_L,
                                      TRI_C, MASKED=True, SEGMENT_END=TK, ATTEND_CURRENT=False, UPCAST=UPCAST,
                                      DOT_DTYPE=DOT_DTYPE, PRECISION=PRECISION, SCAN_L=SCAN_L, SCAN_DL=SCAN_DL,
                                      D=D, DV=DV, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
            b_dkt, b_dvt = _dkdv_walk(b_dkt, b_dvt, b_k, b_v, o_n, Qh, DOh, s_q, s_do, DELTA + off_row,
                                      TW + off_tab, TR + off_tab, 0, TQ, mb_masked, mb_end, qk_scale, dz_scale,
                                      TRI_L, TRI_C, MASKED=False, SEGMENT_END=TK, ATTEND_CURRENT=False,
                                      UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE, PRECISION=PRECISION, SCAN_L=SCAN_L,
                                      SCAN_DL=SCAN_DL, D=D, DV=DV, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                                      BLOCK_DV=BLOCK_DV)
        store_tile(DK, tl.trans(b_dkt) * tl.load(SC + BWD_DK), o_n, o_d, D, 1, m_n, D, UPCAST)
        store_tile(DV_, tl.trans(b_dvt) * tl.load(SC + BWD_DV), o_n, o_dv, DV, 1, m_n, DV, UPCAST)
        # the carries this key block wrote are read back by other threads for the next block
        tl.debug_barrier()


def segment_backward_triton(q, k, v, do, dS, scale, config=LaunchConfig()):
    """Gradients (dq, dk, dv), in float32, of segment_forward_triton's (o, S) for the gradients do (B, Hq, Tq, Dv)
    of o and dS (B, Hq, Tq) of S; deterministic (no atomics)."""
    B, H, TQ, D = q.shape
    HK, TK, DV = k.shape[1], k.shape[2], v.shape[-1]
    p = Problem.of(q, k, v, None, TK, config)
    dq = torch.zeros(B, H, TQ, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(B, HK, TK, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, HK, TK, DV, dtype=torch.float32, device=q.device)
    if B * H * TQ == 0 or TK == 0:
        return dq, dk, dv
    # dO in the operands' dtype (bfloat16's float16 copy is made from float32 directly)
    do = do if q.dtype == torch.bfloat16 else do.to(q.dtype)
    dS = dS.to(torch.float32).contiguous()
    ops = backward_operands(scale, DV, do, dS, q, k, v)
    do_op, q_op, k_op, v_op, table = ops
    chunk = p.chunk_size()  # keys per chunk of the carry table, from the segment's length
    n_chunks = triton.cdiv(TK, chunk)
    tw = torch.zeros(B, H, n_chunks, TQ, dtype=torch.float32, device=q.device)
    tr = torch.zeros_like(tw)
    delta_g = torch.empty(B, H, TQ, dtype=torch.float32, device=q.device)
    sizes = dict(H=H, GROUP=p.group, D=D, DV=DV, UPCAST=p.upcast, DOT_DTYPE=TL_DTYPE[q_op.dtype],
                 PRECISION=p.precision, BLOCK_D=p.block_d, BLOCK_DV=p.block_dv)
    tile = p.tile("dq")
    segment_dq_kernel[(B * H, triton.cdiv(TQ, tile.block_m))](
        q_op, k_op, v_op, do_op, dS, dq, delta_g, tw, tr, table, float(scale), TQ, TK,
        chunk, n_chunks, q_op.stride(), k_op.stride(), v_op.stride(), do_op.stride(), SCAN_L=tile.scan_l,
        SCAN_DL=tile.scan_dl, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **sizes, **tile.launch_options())
    tile = p.tile("dkdv")
    segment_dkdv_kernel[(B * HK, n_chunks)](
        q_op, k_op, v_op, do_op, delta_g, tw, tr, dk, dv, table, float(scale), TQ, TK, chunk, n_chunks,
        q_op.stride(), k_op.stride(), v_op.stride(), do_op.stride(), SCAN_L=tile.scan_l, SCAN_DL=tile.scan_dl,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **sizes, **tile.launch_options())
    return dq, dk, dv
