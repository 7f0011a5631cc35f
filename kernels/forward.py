"""The forward kernel: a program owns a block of queries and walks key blocks from the diagonal back to the start
of its sequence, carrying per row S = sum of log2(1 - beta) over the keys already visited (all nearer to the
query). Inside a tile

    log2 A_ij = log2 beta_ij + S_i + sum_{k in tile, k > j} log2(1 - beta_ik)     (a reverse exclusive cumsum)
    o_i += A_ij v_j,    S_i += sum_{k in tile} log2(1 - beta_ik),    and at the end rem_i = 2^S_i.

Early exit (LaunchConfig.early_exit): a query block has nothing left to give once every row's carry is below
EXHAUSTED, since 2^-160 is under float32's smallest number: every weight of a key farther left, and the remainder,
round to 0 whether those keys are visited or not. The forward then walks EXIT_SEGMENT key blocks past the
diagonal, stops there if that holds, and records the first key it walked (LO) for the backward. NaN in, NaN out:
every key lies in some block's diagonal blocks, so there the forward flags a kv-head whose k or v holds a
non-finite value, and a second launch (REDO) walks again, in full, the flagged heads' blocks that stopped early.
"""
import triton
import triton.language as tl

from .tile_math import LOG2E, causal_log_sigmoids, dot_split, exclusive_cumsum, load_tile, query_block, store_tile, \
    triangle

EXHAUSTED = tl.constexpr(-160.0)
# The walk splits only for a query block whose most-worn row's carry is below SLOW_WEAR after the diagonal
# (BLOCK_M keys at most): slower wear would not reach EXHAUSTED within the first segment.
SLOW_WEAR = tl.constexpr(-16.0)
# The forward's per-kv-head table (operands.forward_table): [1 / the scale of v's copy, the non-finite flag].
FWD_V_SCALE = tl.constexpr(0)
FWD_NONFINITE = tl.constexpr(1)
FWD_TABLE = tl.constexpr(2)


@triton.jit
def _walk(b_o, b_s, b_zsum, b_q, o_m, K, V, s_k, s_v, seq_start, seq_end, nb_hi, it_lo, it_hi, qk_scale, TRI_L,
          MASKED: tl.constexpr, CHECK: tl.constexpr, ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr,
          DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_A: tl.constexpr,
          SCAN_L: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_DV: tl.constexpr):
    """Key blocks nb_hi - 1 - it for it in [it_lo, it_hi), right to left, into the accumulators (o, S, and with
    CHECK the logits' row sums)."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for it in range(it_lo, it_hi):
        o_n = seq_start + (nb_hi - 1 - it) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = load_tile(K, o_n, o_d, s_k[2], s_k[3], m_n, D, BLOCK_D, UPCAST)
        b_v = load_tile(V, o_n, o_dv, s_v[2], s_v[3], m_n, DV, BLOCK_DV, UPCAST)
        b_z, b_lb, b_lom, _, _, m_vis = causal_log_sigmoids(b_q, b_k, qk_scale, o_m, o_n, MASKED, ATTEND_CURRENT,
                                                            DOT_DTYPE != tl.float32, PRECISION)
        if CHECK:
            # every logit of the tile, masked or not: a non-finite key makes its whole column non-finite
            b_zsum += tl.sum(b_z, axis=1)
        b_a = tl.exp2(b_lb + (b_s[:, None] + exclusive_cumsum(b_lom, TRI_L, True, SCAN_L, UPCAST)))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        b_o = dot_split(b_a, b_v, b_o, OP_DTYPE, UPCAST, SPLIT_A, PRECISION)
        b_s += tl.sum(b_lom, axis=1)
    return b_o, b_s, b_zsum


@triton.jit
def forward_kernel(Q, K, V, O, REM, LO, CU, SC, s_q, s_k, s_v, s_o, scale, T, H, GROUP, N_SEQ,
                   D: tl.constexpr, DV: tl.constexpr, VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   SPLIT_A: tl.constexpr, SCAN_L: tl.constexpr, EARLY_EXIT: tl.constexpr,
                   EXIT_SEGMENT: tl.constexpr, REDO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """o and rem of one query block; s_q .. s_o are the (batch, head, time, dim) strides of each tensor."""
    i_b, i_h, seq_start, seq_end, m0, nb_full, nb_hi = query_block(CU, T, H, N_SEQ, VARLEN, BLOCK_M, BLOCK_N)
    qk_scale = scale * LOG2E
    SC += (i_b * (H // GROUP) + i_h // GROUP) * FWD_TABLE
    REM += (i_b * H + i_h) * T
    LO += (i_b * H + i_h) * T
    if REDO:
        # the second launch: only a block that stopped early in a head flagged by the first walks again
        lo = tl.load(LO + m0, mask=m0 < seq_end, other=seq_start)
        if (tl.load(SC + FWD_NONFINITE) == 0) | (lo == seq_start):
            return

    Q += i_b * s_q[0] + i_h * s_q[1]
    K += i_b * s_k[0] + (i_h // GROUP) * s_k[1]
    V += i_b * s_v[0] + (i_h // GROUP) * s_v[1]
    O += i_b * s_o[0] + i_h * s_o[1]

    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < seq_end
    b_q = load_tile(Q, o_m, tl.arange(0, BLOCK_D), s_q[2], s_q[3], m_m, D, BLOCK_D, UPCAST)
    b_o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    b_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_zsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    TRI_L = triangle(BLOCK_N, True, UPCAST)

    # the blocks that cross the diagonal, masked; then the rest
    b_o, b_s, b_zsum = _walk(b_o, b_s, b_zsum, b_q, o_m, K, V, s_k, s_v, seq_start, seq_end, nb_hi, 0,
                             nb_hi - nb_full, qk_scale, TRI_L, MASKED=True, CHECK=EARLY_EXIT,
                             ATTEND_CURRENT=ATTEND_CURRENT, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE, OP_DTYPE=OP_DTYPE,
                             PRECISION=PRECISION, SPLIT_A=SPLIT_A, SCAN_L=SCAN_L, D=D, DV=DV, BLOCK_N=BLOCK_N,
                             BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    if EARLY_EXIT:
        # a non-finite key (its logits) or value (every row's output) among the diagonal blocks' flags the head
        b_chk = tl.sum(b_zsum + tl.sum(b_o, axis=1), axis=0)
        if b_chk - b_chk != 0:
            tl.store(SC + FWD_NONFINITE, 1.0)
        it = nb_full
        if tl.min(tl.where(m_m, b_s, 0.0), axis=0) < SLOW_WEAR:
            # the first EXIT_SEGMENT key blocks, then the rest only if some row's stick is not used up yet; one
            # check, between two loops: a reduction in a loop's condition makes ptxas serialize the tensor-core
            # products
            it = tl.minimum(nb_full, EXIT_SEGMENT)
            b_o, b_s, _ = _walk(b_o, b_s, b_zsum, b_q, o_m, K, V, s_k, s_v, seq_start, seq_end, nb_full, 0, it,
                                qk_scale, TRI_L, MASKED=False, CHECK=False, ATTEND_CURRENT=ATTEND_CURRENT,
                                UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE, OP_DTYPE=OP_DTYPE, PRECISION=PRECISION,
                                SPLIT_A=SPLIT_A, SCAN_L=SCAN_L, D=D, DV=DV, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                BLOCK_DV=BLOCK_DV)
            if tl.max((m_m & (b_s >= EXHAUSTED)).to(tl.int32), axis=0) > 0:
                b_o, b_s, _ = _walk(b_o, b_s, b_zsum, b_q, o_m, K, V, s_k, s_v, seq_start, seq_end, nb_full, it,
                                    nb_full, qk_scale, TRI_L, MASKED=False, CHECK=False,
                                    ATTEND_CURRENT=ATTEND_CURRENT, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE,
                                    OP_DTYPE=OP_DTYPE, PRECISION=PRECISION, SPLIT_A=SPLIT_A, SCAN_L=SCAN_L, D=D,
                                    DV=DV, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
                it = nb_full
        else:
            # sticks that wore this slowly over the diagonal will not be used up a segment later: one loop, which
            # keeps the software pipeline running (two cost a refill)
            b_o, b_s, _ = _walk(b_o, b_s, b_zsum, b_q, o_m, K, V, s_k, s_v, seq_start, seq_end, nb_full, 0,
                                nb_full, qk_scale, TRI_L, MASKED=False, CHECK=False, ATTEND_CURRENT=ATTEND_CURRENT,
                                UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE, OP_DTYPE=OP_DTYPE, PRECISION=PRECISION,
                                SPLIT_A=SPLIT_A, SCAN_L=SCAN_L, D=D, DV=DV, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                                BLOCK_DV=BLOCK_DV)
        # the first key this block walked: the backward walks as far
        tl.store(LO + o_m, seq_start + (nb_full - it) * BLOCK_N, mask=m_m)
    else:
        b_o, b_s, _ = _walk(b_o, b_s, b_zsum, b_q, o_m, K, V, s_k, s_v, seq_start, seq_end, nb_full, 0, nb_full,
                            qk_scale, TRI_L, MASKED=False, CHECK=False, ATTEND_CURRENT=ATTEND_CURRENT,
                            UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE, OP_DTYPE=OP_DTYPE, PRECISION=PRECISION,
                            SPLIT_A=SPLIT_A, SCAN_L=SCAN_L, D=D, DV=DV, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                            BLOCK_DV=BLOCK_DV)
        if REDO:
            tl.store(LO + o_m, seq_start, mask=m_m)
    # V may be a float16 copy scaled by a power of two (operands.forward_table): undo the scale
    b_o *= tl.load(SC + FWD_V_SCALE)
    store_tile(O, b_o, o_m, tl.arange(0, BLOCK_DV), s_o[2], s_o[3], m_m, DV, UPCAST)
    # the remainder is what the stick still holds after every visible key
    tl.store(REM + o_m, tl.exp2(b_s), mask=m_m)
