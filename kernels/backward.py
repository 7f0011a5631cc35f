"""The backward kernels, deterministic (no atomics); kernels/README.md, "Backward", derives them.

1. ``dq_kernel`` (query-major): one walk recomputes dl = A * (dO . v) and accumulates dq; the part of dq that needs
   the dl of keys not yet walked goes through a carried X = sum beta k. It stores, at every chunk boundary, the
   carries (W, R) = (sum log2(1 - beta), sum dl) of the keys right of the boundary; at the end delta = sum dl.
2. ``dkdv_kernel`` (key-major): one program per (chunk of keys, kv-head) walks its key blocks right to left; for
   each, all later query blocks of every q-head of the GQA group, in [queries, keys] tiles with dk and dv
   accumulated transposed. The carries of the query rows come from the chunk's slice of the table, which this
   program alone reads and rewrites.
3. ``exit_bounds_kernel``: under early exit, how many query blocks reach back to each key block (from the
   forward's LO), so that the key-major kernel skips the others. The query-major kernel walks everything: its
   early-exit form ran 16-21% slower per tile compiled (benchmarks/README.md).

The operands are float16 copies scaled per (batch, kv-head) and dl is scaled by dz_scale (operands.py); the
table's slots (BWD_*) undo the scales at the end.
"""
import triton
import triton.language as tl

from .operands import BWD_DK, BWD_DQ, BWD_DV, BWD_DZ, BWD_G, BWD_LOG2_DZ, BWD_LOGITS, BWD_NONFINITE, BWD_TABLE
from .tile_math import LOG2E, causal_log_sigmoids, exclusive_cumsum, load_tile, query_block, round_to, seq_bounds, \
    store_tile, triangle


@triton.jit
def _dq_walk(b_dq, b_x, b_w, b_r, b_q, b_do, b_g, o_m, o_vis, m_m, K, V, s_k, s_v, TW, TR, seq_start, seq_end, nb_lo,
             nb_hi, qk_scale, log2_dz_scale, T, CHUNK, TRI_L, TRI_C, MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
             UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCAN_L: tl.constexpr,
             SCAN_DL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DV: tl.constexpr):
    """Key blocks nb_hi - 1 down to nb_lo into dq, X, W and R, storing (W, R) of rows o_m at each chunk boundary
    crossed; o_vis are the rows' positions for the causal mask (o_m, or a segment's end: kernels/segment.py)."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for it in range(nb_hi - nb_lo):
        nb = nb_hi - 1 - it
        o_n = seq_start + nb * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = load_tile(K, o_n, o_d, s_k[2], s_k[3], m_n, D, BLOCK_D, UPCAST)
        b_v = load_tile(V, o_n, o_dv, s_v[2], s_v[3], m_n, DV, BLOCK_DV, UPCAST)
        _, b_lb, b_lom, b_beta, b_om, m_vis = causal_log_sigmoids(b_q, b_k, qk_scale, o_vis, o_n, MASKED,
                                                                  ATTEND_CURRENT, DOT_DTYPE != tl.float32, PRECISION)
        if MASKED:
            b_beta = tl.where(m_vis, b_beta, 0.0)
        # A times dz_scale (a power of two that keeps dl, C and dz inside float16's range): every gradient-side
        # number below carries that scale
        b_a = tl.exp2(b_lb + ((b_w + log2_dz_scale)[:, None] + exclusive_cumsum(b_lom, TRI_L, True, SCAN_L, UPCAST)))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        # dl_ij = dLoss / dlog A_ij = A_ij (dO_i . v_j)
        b_dl = b_a * tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_dl_sum = tl.sum(b_dl, axis=1)
        # dz_ik = dl_ik (1 - beta_ik) - beta_ik (C_ik + g_i), C_ik = sum_{j<k} dl_ij: here only the j of this tile
        b_dz = b_dl * b_om - b_beta * (exclusive_cumsum(b_dl, TRI_C, False, SCAN_DL, UPCAST) + b_g[:, None])
        b_dq = tl.dot(round_to(b_dz, DOT_DTYPE, UPCAST), b_k, b_dq, input_precision=PRECISION)
        # ... the j of this tile with the k of the tiles already walked: dl_ij times X_i = sum_k beta_ik k_k (the
        # sign on the row sums, where it costs one negation per row instead of one per element of X)
        b_dq += (-b_dl_sum)[:, None] * b_x
        b_x = tl.dot(round_to(b_beta, DOT_DTYPE, UPCAST), b_k, b_x, input_precision=PRECISION)
        b_w += tl.sum(b_lom, axis=1)
        b_r += b_dl_sum
        # crossed the left edge of chunk c: (W, R) is now the carry at the right end of chunk c - 1
        c = (nb * BLOCK_N) // CHUNK
        m_store = m_m & ((nb * BLOCK_N) % CHUNK == 0) & (nb > 0)
        tl.store(TW + (c - 1) * T + o_m, b_w, mask=m_store)
        tl.store(TR + (c - 1) * T + o_m, b_r, mask=m_store)
    return b_dq, b_x, b_w, b_r


@triton.jit
def dq_kernel(Q, K, V, DO, REM, DREM, DQ, DELTA, TW, TR, CU, SC, scale, T, CHUNK, N_CHUNKS, s_q, s_k, s_v, s_do, H,
              GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr, VARLEN: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
              UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCAN_L: tl.constexpr,
              SCAN_DL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr):
    """dq, delta + g and the chunk-boundary carries of one query block."""
    i_b, i_h, seq_start, seq_end, m0, nb_full, nb_hi = query_block(CU, T, H, N_SEQ, VARLEN, BLOCK_M, BLOCK_N)
    SC += (i_b * (H // GROUP) + i_h // GROUP) * BWD_TABLE
    qk_scale = scale * LOG2E * tl.load(SC + BWD_LOGITS)
    g_scale = tl.load(SC + BWD_G)
    log2_dz_scale = tl.load(SC + BWD_LOG2_DZ)

    Q += i_b * s_q[0] + i_h * s_q[1]
    K += i_b * s_k[0] + (i_h // GROUP) * s_k[1]
    V += i_b * s_v[0] + (i_h // GROUP) * s_v[1]
    DO += i_b * s_do[0] + i_h * s_do[1]
    DQ += (i_b * H + i_h) * T * D
    REM += (i_b * H + i_h) * T
    DREM += (i_b * H + i_h) * T
    DELTA += (i_b * H + i_h) * T
    TW += (i_b * H + i_h) * N_CHUNKS * T
    TR += (i_b * H + i_h) * N_CHUNKS * T

    o_m = m0 + tl.arange(0, BLOCK_M)
    m_m = o_m < seq_end
    o_d = tl.arange(0, BLOCK_D)
    b_q = load_tile(Q, o_m, o_d, s_q[2], s_q[3], m_m, D, BLOCK_D, UPCAST)
    b_do = load_tile(DO, o_m, tl.arange(0, BLOCK_DV), s_do[2], s_do[3], m_m, DV, BLOCK_DV, UPCAST)
    # g_i = dLoss / dlog rem_i
    b_g = tl.load(DREM + o_m, mask=m_m, other=0.0) * tl.load(REM + o_m, mask=m_m, other=0.0) * g_scale
    TRI_L = triangle(BLOCK_N, True, UPCAST)
    TRI_C = triangle(BLOCK_N, False, UPCAST)

    # one walk from the diagonal back: W = sum log(1 - beta) and R = sum dl over the keys walked, X = sum beta k;
    # dq needs C_ik = sum_{j<k} dl_ij, which lies ahead, so each tile adds its dl's share of C through X instead
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_x = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_w = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_dq, b_x, b_w, b_r = _dq_walk(b_dq, b_x, b_w, b_r, b_q, b_do, b_g, o_m, o_m, m_m, K, V, s_k, s_v, TW, TR,
                                   seq_start, seq_end, nb_full, nb_hi, qk_scale, log2_dz_scale, T, CHUNK, TRI_L, TRI_C,
                                   MASKED=True, ATTEND_CURRENT=ATTEND_CURRENT, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE,
                                   PRECISION=PRECISION, SCAN_L=SCAN_L, SCAN_DL=SCAN_DL, D=D, DV=DV, BLOCK_N=BLOCK_N,
                                   BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    b_dq, b_x, b_w, b_r = _dq_walk(b_dq, b_x, b_w, b_r, b_q, b_do, b_g, o_m, o_m, m_m, K, V, s_k, s_v, TW, TR,
                                   seq_start, seq_end, 0, nb_full, qk_scale, log2_dz_scale, T, CHUNK, TRI_L, TRI_C,
                                   MASKED=False, ATTEND_CURRENT=ATTEND_CURRENT, UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE,
                                   PRECISION=PRECISION, SCAN_L=SCAN_L, SCAN_DL=SCAN_DL, D=D, DV=DV, BLOCK_N=BLOCK_N,
                                   BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV)
    # delta_i = sum_j dl_ij, the float32 sum of the very dl both kernels recompute, stored with g added: the
    # key-major kernel's C_ik + g_i starts from it
    tl.store(DELTA + o_m, b_r + b_g, mask=m_m)
    store_tile(DQ, b_dq * tl.load(SC + BWD_DQ), o_m, o_d, D, 1, m_m, D, UPCAST)


@triton.jit
def _dkdv_walk(b_dkt, b_dvt, b_k, b_v, o_n, Q, DO, s_q, s_do, DELTA, TW, TR, seq_start, seq_end, mb_lo, mb_hi,
               qk_scale, dz_scale, TRI_L, TRI_C, MASKED: tl.constexpr, SEGMENT_END, ATTEND_CURRENT: tl.constexpr,
               UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SCAN_L: tl.constexpr,
               SCAN_DL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Query blocks [mb_lo, mb_hi) of one q-head against one key block into dk and dv (transposed), advancing the
    rows' carries in the table. SEGMENT_END: None, or a segment's end, where every row sits for the causal mask
    (kernels/segment.py)."""
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for mb in range(mb_lo, mb_hi):
        o_m = seq_start + mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < seq_end
        b_q = load_tile(Q, o_m, o_d, s_q[2], s_q[3], m_m, D, BLOCK_D, UPCAST)
        b_do = load_tile(DO, o_m, o_dv, s_do[2], s_do[3], m_m, DV, BLOCK_DV, UPCAST)
        # this chunk's carries for these rows: keys between the key block and the query (or the chunk's right end)
        b_w = tl.load(TW + o_m, mask=m_m, other=0.0)
        b_r = tl.load(TR + o_m, mask=m_m, other=0.0)
        b_delta_g = tl.load(DELTA + o_m, mask=m_m, other=0.0)
        # tiles are [queries, keys] as in the other kernels, so the scans are products with TRI on the right
        if SEGMENT_END is None:
            o_vis = o_m
        else:
            o_vis = tl.zeros_like(o_m) + SEGMENT_END
        _, b_lb, b_lom, b_beta, b_om, m_vis = causal_log_sigmoids(b_q, b_k, qk_scale, o_vis, o_n, MASKED,
                                                                  ATTEND_CURRENT, DOT_DTYPE != tl.float32, PRECISION)
        b_w_next = b_w + tl.sum(b_lom, axis=1)
        b_a = tl.exp2(b_lb + (b_w[:, None] + exclusive_cumsum(b_lom, TRI_L, True, SCAN_L, UPCAST)))
        if MASKED:
            b_a = tl.where(m_vis, b_a, 0.0)
        # dv and dk accumulate transposed, [head dim, keys]: the head dim is the long side the tensor cores want
        b_dvt = tl.dot(tl.trans(b_do), round_to(b_a, DOT_DTYPE, UPCAST), b_dvt, input_precision=PRECISION)
        b_dl = b_a * tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION) * dz_scale
        b_dl_sum = tl.sum(b_dl, axis=1)
        # C_ik + g_i = (delta_i + g_i - R_i - this tile's dl): the keys beyond the tile, then those of the tile
        b_cg = (b_delta_g - (b_r + b_dl_sum))[:, None] + exclusive_cumsum(b_dl, TRI_C, False, SCAN_DL, UPCAST)
        b_dz = b_dl * b_om - b_beta * b_cg
        if MASKED:
            b_dz = tl.where(m_vis, b_dz, 0.0)
        b_dkt = tl.dot(tl.trans(b_q), round_to(b_dz, DOT_DTYPE, UPCAST), b_dkt, input_precision=PRECISION)
        # the carry moves left past this key block; the next (left) key block reads it back
        tl.store(TW + o_m, b_w_next, mask=m_m)
        tl.store(TR + o_m, b_r + b_dl_sum, mask=m_m)
    return b_dkt, b_dvt


@triton.jit
def dkdv_kernel(Q, K, V, DO, DELTA, TW, TR, DK, DV_, MB_STOP, CU, SC, scale, T, CHUNK, N_CHUNKS, s_q, s_k, s_v, s_do,
                H, GROUP, N_SEQ, D: tl.constexpr, DV: tl.constexpr, VARLEN: tl.constexpr,
                ATTEND_CURRENT: tl.constexpr, UPCAST: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                SCAN_L: tl.constexpr, SCAN_DL: tl.constexpr, EARLY_EXIT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk and dv of one chunk of keys of one kv-head."""
    # axis 0 enumerates (batch, sequence, kv-head), axis 1 the chunks: chunk 0 has the most query blocks after it,
    # and the GPU starts programs in launch order, so every head's chunk 0 goes first
    i_bnh = tl.program_id(0)
    i_c = tl.program_id(1)
    HK = H // GROUP
    i_hk = i_bnh % HK
    i_n = (i_bnh // HK) % N_SEQ
    i_b = i_bnh // (HK * N_SEQ)
    seq_start, seq_end = seq_bounds(CU, i_n, T, VARLEN)
    SC += (i_b * HK + i_hk) * BWD_TABLE
    qk_scale = scale * LOG2E * tl.load(SC + BWD_LOGITS)
    dz_scale = tl.load(SC + BWD_DZ)
    c0 = seq_start + i_c * CHUNK
    c1 = tl.minimum(c0 + CHUNK, seq_end)
    nkb = tl.maximum(tl.cdiv(c1 - c0, BLOCK_N), 0)
    mb_end = tl.cdiv(seq_end - seq_start, BLOCK_M)

    K += i_b * s_k[0] + i_hk * s_k[1]
    V += i_b * s_v[0] + i_hk * s_v[1]
    DK += (i_b * HK + i_hk) * T * D
    DV_ += (i_b * HK + i_hk) * T * DV
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    TRI_L = triangle(BLOCK_N, True, UPCAST)
    TRI_C = triangle(BLOCK_N, False, UPCAST)

    for it in range(nkb):
        n0 = c0 + (nkb - 1 - it) * BLOCK_N
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < seq_end
        b_k = load_tile(K, o_n, o_d, s_k[2], s_k[3], m_n, D, BLOCK_D, UPCAST)
        b_v = load_tile(V, o_n, o_dv, s_v[2], s_v[3], m_n, DV, BLOCK_DV, UPCAST)
        b_dkt = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        b_dvt = tl.zeros([BLOCK_DV, BLOCK_N], dtype=tl.float32)
        # query blocks [mb_lo, mb_full) cross the diagonal; from mb_full on every row sees every key of the block
        mb_lo = (n0 - seq_start) // BLOCK_M
        mb_full = tl.minimum(tl.cdiv(n0 + BLOCK_N - seq_start, BLOCK_M), mb_end)
        for g in range(GROUP):
            i_h = i_hk * GROUP + g
            off_q = i_b * s_q[0] + i_h * s_q[1]
            off_do = i_b * s_do[0] + i_h * s_do[1]
            off_row = (i_b * H + i_h) * T
            off_tab = ((i_b * H + i_h) * N_CHUNKS + i_c) * T
            if EARLY_EXIT:
                # the query blocks from mb_stop on used up their sticks before this key block (exit_bounds_kernel)
                mb_stop = tl.minimum(tl.maximum(tl.load(MB_STOP + off_row + n0), mb_full), mb_end)
                mb_stop = tl.where(tl.load(SC + BWD_NONFINITE) != 0, mb_end, mb_stop)
            else:
                mb_stop = mb_end
            b_dkt, b_dvt = _dkdv_walk(b_dkt, b_dvt, b_k, b_v, o_n, Q + off_q, DO + off_do, s_q, s_do, DELTA + off_row,
                                      TW + off_tab, TR + off_tab, seq_start, seq_end, mb_lo, mb_full, qk_scale,
                                      dz_scale, TRI_L, TRI_C, MASKED=True, SEGMENT_END=None,
                                      ATTEND_CURRENT=ATTEND_CURRENT,
                                      UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE, PRECISION=PRECISION, SCAN_L=SCAN_L,
                                      SCAN_DL=SCAN_DL, D=D, DV=DV, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                                      BLOCK_DV=BLOCK_DV)
            b_dkt, b_dvt = _dkdv_walk(b_dkt, b_dvt, b_k, b_v, o_n, Q + off_q, DO + off_do, s_q, s_do, DELTA + off_row,
                                      TW + off_tab, TR + off_tab, seq_start, seq_end, mb_full, mb_stop, qk_scale,
                                      dz_scale, TRI_L, TRI_C, MASKED=False, SEGMENT_END=None,
                                      ATTEND_CURRENT=ATTEND_CURRENT,
                                      UPCAST=UPCAST, DOT_DTYPE=DOT_DTYPE, PRECISION=PRECISION, SCAN_L=SCAN_L,
                                      SCAN_DL=SCAN_DL, D=D, DV=DV, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                                      BLOCK_DV=BLOCK_DV)
        store_tile(DK, tl.trans(b_dkt) * tl.load(SC + BWD_DK), o_n, o_d, D, 1, m_n, D, UPCAST)
        store_tile(DV_, tl.trans(b_dvt) * tl.load(SC + BWD_DV), o_n, o_dv, DV, 1, m_n, DV, UPCAST)
        # the carries this key block wrote are read back by other threads for the next block
        tl.debug_barrier()


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def exit_bounds_kernel(LO, CU, SUF, MB_STOP, T, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       TILE: tl.constexpr):
    """For the key-major kernel under early exit, per (batch, head) row and sequence: at the start n0 of each key
    block, how many query blocks of the sequence (from its first) reach back to that block; the rows of every
    later block stopped their walks (LO, from the forward) right of it.

    A query block's rows reach back to the smallest LO among them, the blocks from m on to suf[m], the smallest of
    those from m on. suf grows with m, so the blocks that reach key block j are the first ones, as many as have
    suf[m] <= the block's last key."""
    i_bh = tl.program_id(0)
    seq_start, seq_end = seq_bounds(CU, tl.program_id(1), T, VARLEN)
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
