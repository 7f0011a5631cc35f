"""The Hopper key-major backward (sm_90), in Gluon: backward.py's dkdv_kernel with its five tensor-core products
per tile asynchronous, so that each tile's elementwise work runs while products are in flight.

The tile math is dkdv_kernel's, on the float16 operands and the table of operands.backward_operands: for a key
block (k, v resident in shared memory) and a tile of query rows, z = q k^T and p = dO v^T, the log-sigmoids of z,
log2 A by the in-tile cumsum of log2(1 - beta) (two float16 products with a 0/1 triangle), dl = A p, C by the
cumsum of dl (one product), dz = dl (1 - beta) - beta (C + g), then dv^T += dO^T A and dk^T += q^T dz ([head dim,
keys] accumulators). wgmma groups complete in issue order, so the walk issues each product as early as its inputs
allow and waits for it as late as its result allows:

    query tile j:  log-sigmoids of z_j                 while  dk^T += q_{j-1}^T dz_{j-1}   runs
                   issue cumsum_j (2), wait for all    (the products of tile j - 1 are done: its ring slot
                                                        takes tile j + 2)
                   A_j, dl_j; issue cumsum of dl_j, dv^T += dO_j^T A_j, z_{j+1}, p_{j+1}
                   wait for the cumsum of dl_j
                   dz_j                                while  dv^T, z_{j+1}, p_{j+1}         run
                   issue dk^T += q_j^T dz_j; wait for z_{j+1}, p_{j+1}

or, with fewer products in flight during dz (fewer registers), z_{j+1} and p_{j+1} issued after dz, before dk's.

Query and dO tiles stream into a ring of three shared-memory slots by cp.async, two tiles ahead. The carries of
the rows (W, R) come from the chunk's slice of the table, as in dkdv_kernel, with early exit's stop per key block.

It covers whole sequences (no cu_seqlens) with one head dim of 64 or 128 for q, k and v and 16-bit inputs (their
float16 operand copies), GQA, attend_current and early exit; dkdv_kernel is the path for everything else. Gluon
does not run in Triton's interpreter: tests/test_hopper.py compiles it for sm_90 on any machine and runs it on a
Hopper GPU.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, warpgroup_mma, \
    warpgroup_mma_wait

from .hopper_forward import a_operand, load_layout, log_sigmoids, mma_layout
from .operands import BWD_DK, BWD_DV, BWD_DZ, BWD_LOGITS, BWD_NONFINITE, BWD_TABLE

LOG2E = gl.constexpr(1.4426950408889634)
SLOTS = gl.constexpr(3)  # the ring of query and dO tiles in shared memory
TILE_M, TILE_N = 64, 32  # queries and keys per tile (one warpgroup)
# a barrier of all the program's threads: gl.thread_barrier on triton 3.6, gl.barrier from 3.7
cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier


@gluon.jit
def _triangle(TRI_SMEM: gl.constexpr, BLOCK_N: gl.constexpr, NEARER: gl.constexpr, LOAD: gl.constexpr):
    """A 0/1 matrix of the in-tile cumsums in shared memory: [k, j] = 1 where key k is nearer (or farther) than j."""
    o_tk = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD)), 1)
    o_tj = gl.expand_dims(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, LOAD)), 0)
    tri = ((o_tk > o_tj) if NEARER else (o_tk < o_tj)).to(gl.float16)
    return gl.allocate_shared_memory(gl.float16, [BLOCK_N, BLOCK_N], TRI_SMEM, tri)


@gluon.jit
def _load_rows(Q, DO, q_ring, do_ring, slot, mb, s_qt, s_dot, T, BLOCK_M: gl.constexpr, D: gl.constexpr,
               LOAD: gl.constexpr):
    """cp.async of query block mb of q and dO into a slot of the rings, as one commit group; rows past T arrive as
    zeros (and add nothing to dk and dv)."""
    o_m = gl.expand_dims(mb * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LOAD)), 1)
    o_d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LOAD)), 0)
    m_m = (o_m < T) & (o_d < D)
    async_copy.async_copy_global_to_shared(q_ring.index(slot), Q + o_m * s_qt + o_d, mask=m_m)
    async_copy.async_copy_global_to_shared(do_ring.index(slot), DO + o_m * s_dot + o_d, mask=m_m)
    async_copy.commit_group()


@gluon.jit
def _load_keys(P, o_n, s_t, T, D: gl.constexpr, LOAD: gl.constexpr):
    """A key block's rows o_n of k or v (rows past T as zeros), for its shared memory."""
    o_d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, LOAD)), 0)
    return gl.load(P + gl.expand_dims(o_n, 1) * s_t + o_d, mask=gl.expand_dims(o_n < T, 1) & (o_d < D), other=0.0)


@gluon.jit
def _store_keys(P, b_t, factor, n0, T, BLOCK_N: gl.constexpr, D: gl.constexpr, ACC: gl.constexpr):
    """A transposed accumulator [head dim, keys] times factor into rows n0.. of a (T, D) gradient."""
    o_d = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(1, ACC)), 1)
    o_n = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC)), 0)
    gl.store(P + o_n * D + o_d, (b_t * factor).to(P.dtype.element_ty), mask=(o_n < T) & (o_d < D))


@gluon.jit
def _next_products(it, q_ring, do_ring, k_smem, v_smem, zero_s):
    """Issues z = q k^T and p = dO v^T of the tile after tile it, once its rows have landed (the one after may
    still be in flight)."""
    async_copy.wait_group(1)
    fence_async_shared()
    slot = (it + 1) % SLOTS
    b_zn = warpgroup_mma(q_ring.index(slot), k_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    b_pn = warpgroup_mma(do_ring.index(slot), v_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    return b_zn, b_pn


@gluon.jit
def _tile(it, mb_lo, b_z, b_p, b_dkt, b_dvt, q_ring, do_ring, k_smem, v_smem, a_smem, dz_smem, tri_l, tri_c, zero_s,
          o_n, Q, DO, s_qt, s_dot, DELTA, TW, TR, T, qk_scale, dz_scale, MASKED: gl.constexpr,
          ATTEND_CURRENT: gl.constexpr, EARLY_NEXT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
          D: gl.constexpr, LOAD: gl.constexpr, A_OP: gl.constexpr, ROWS: gl.constexpr):
    """Query tile it of the walk (block mb_lo + it): takes its products z and p, issues the next tile's, and returns
    (the next z and p, dk^T with this tile's product in flight, dv^T)."""
    mb = mb_lo + it
    o_m = mb * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROWS)
    m_m = o_m < T
    b_w = gl.load(TW + o_m, mask=m_m, other=0.0)
    b_r = gl.load(TR + o_m, mask=m_m, other=0.0)
    b_dg = gl.load(DELTA + o_m, mask=m_m, other=0.0)
    # log-sigmoids (q_{j-1}^T dz_{j-1} still runs), then the cumsum of log2(1 - beta) as hi + lo float16 products
    b_lb, b_lom, b_beta, b_om = log_sigmoids(b_z * qk_scale)
    if MASKED:
        if ATTEND_CURRENT:
            m_vis = gl.expand_dims(o_n, 0) <= gl.expand_dims(o_m, 1)
        else:
            m_vis = gl.expand_dims(o_n, 0) < gl.expand_dims(o_m, 1)
        b_lom = gl.where(m_vis, b_lom, 0.0)
        b_lb = gl.where(m_vis, b_lb, float("-inf"))  # A = 0, so dl = 0, where a key is not visible ...
        b_beta = gl.where(m_vis, b_beta, 0.0)  # ... and with beta = 0 there, dz = 0
    b_lc = gl.maximum(b_lom, -60000.0)
    b_hi = b_lc.to(gl.float16)
    b_lo = (b_lc - b_hi.to(gl.float32)).to(gl.float16)
    b_hi = gl.convert_layout(b_hi, A_OP)
    b_lo = gl.convert_layout(b_lo, A_OP)
    b_c = warpgroup_mma(b_hi, tri_l, zero_s, use_acc=False, is_async=True)
    b_c = warpgroup_mma(b_lo, tri_l, b_c, is_async=True)
    b_c, b_dkt, b_dvt, b_hi, b_lo = warpgroup_mma_wait(0, deps=(b_c, b_dkt, b_dvt, b_hi, b_lo))
    # tile j - 1's products are done: its slot takes tile j + 2
    _load_rows(Q, DO, q_ring, do_ring, (it + 2) % SLOTS, mb + 2, s_qt, s_dot, T, BLOCK_M, D, LOAD)
    # A (times dz_scale in dl) and dl; the cumsum of dl and dv^T's product go in, then the next tile's z and p
    b_a = gl.exp2(b_lb + (gl.expand_dims(b_w, 1) + b_c))
    b_w_next = b_w + gl.sum(b_lom, axis=1)
    b_dl = b_a * b_p * dz_scale
    b_dl_sum = gl.sum(b_dl, axis=1)
    b_dlh = gl.convert_layout(b_dl.to(gl.float16), A_OP)
    b_cdl = warpgroup_mma(b_dlh, tri_c, zero_s, use_acc=False, is_async=True)
    a_smem.store(b_a.to(gl.float16))
    fence_async_shared()
    slot = it % SLOTS
    b_dvt = warpgroup_mma(do_ring.index(slot).permute((1, 0)), a_smem, b_dvt, is_async=True)
    # the next tile's z and p go in before dz's elementwise work (EARLY_NEXT) or after it, before dk's product
    if EARLY_NEXT:
        b_zn, b_pn = _next_products(it, q_ring, do_ring, k_smem, v_smem, zero_s)
        b_cdl, b_dlh = warpgroup_mma_wait(3, deps=(b_cdl, b_dlh))
    else:
        b_cdl, b_dlh = warpgroup_mma_wait(1, deps=(b_cdl, b_dlh))
    # C_ik + g_i: the keys beyond the tile (delta + g - R - this tile's dl), then those of the tile
    b_cg = gl.expand_dims(b_dg - (b_r + b_dl_sum), 1) + b_cdl
    b_dz = (b_dl * b_om - b_beta * b_cg).to(gl.float16)
    if not EARLY_NEXT:
        b_zn, b_pn = _next_products(it, q_ring, do_ring, k_smem, v_smem, zero_s)
    dz_smem.store(b_dz)
    fence_async_shared()
    b_dkt = warpgroup_mma(q_ring.index(slot).permute((1, 0)), dz_smem, b_dkt, is_async=True)
    # the carries move left past this key block; the next (left) key block reads them back
    gl.store(TW + o_m, b_w_next, mask=m_m)
    gl.store(TR + o_m, b_r + b_dl_sum, mask=m_m)
    b_zn, b_pn, b_dvt = warpgroup_mma_wait(1, deps=(b_zn, b_pn, b_dvt))
    return b_zn, b_pn, b_dkt, b_dvt


@gluon.jit
def hopper_dkdv_kernel(Q, K, V, DO, DELTA, TW, TR, DK, DV_, MB_STOP, SC, s_q0, s_q1, s_qt, s_k0, s_k1, s_kt, s_v0,
                       s_v1, s_vt, s_do0, s_do1, s_dot, scale, T, CHUNK, N_CHUNKS, H, GROUP, D: gl.constexpr,
                       ATTEND_CURRENT: gl.constexpr, EARLY_EXIT: gl.constexpr, EARLY_NEXT: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, QT_SMEM: gl.constexpr, KT_SMEM: gl.constexpr,
                       S_SMEM: gl.constexpr, TRI_SMEM: gl.constexpr, num_warps: gl.constexpr):
    """dk and dv of one chunk of keys of one kv-head (dkdv_kernel's grid and table), one warpgroup (BLOCK_M = 64).
    QT_SMEM is the shared layout of the query and dO tiles, KT_SMEM of k and v, S_SMEM of A and dz, TRI_SMEM of the
    triangles; s_* the strides of batch, head and time (the dim's stride is 1)."""
    S_MMA: gl.constexpr = mma_layout(BLOCK_N, num_warps)  # [queries, keys] tiles and [head dim, keys] accumulators
    A_OP: gl.constexpr = a_operand(S_MMA)
    LOAD: gl.constexpr = load_layout(D, num_warps)
    ROWS: gl.constexpr = gl.SliceLayout(1, S_MMA)
    KEYS: gl.constexpr = gl.SliceLayout(0, S_MMA)

    i_bh = gl.program_id(0)
    i_c = gl.program_id(1)
    HK = H // GROUP
    i_b = i_bh // HK
    i_hk = i_bh % HK
    SC += (i_b * HK + i_hk) * BWD_TABLE
    qk_scale = scale * LOG2E * gl.load(SC + BWD_LOGITS)
    dz_scale = gl.load(SC + BWD_DZ)
    walk_all = gl.load(SC + BWD_NONFINITE) != 0
    c0 = i_c * CHUNK
    nkb = gl.cdiv(gl.minimum(c0 + CHUNK, T) - c0, BLOCK_N)
    mb_end = gl.cdiv(T, BLOCK_M)
    K += i_b.to(gl.int64) * s_k0 + i_hk.to(gl.int64) * s_k1
    V += i_b.to(gl.int64) * s_v0 + i_hk.to(gl.int64) * s_v1
    DK += (i_b * HK + i_hk).to(gl.int64) * T * D
    DV_ += (i_b * HK + i_hk).to(gl.int64) * T * D

    q_ring = gl.allocate_shared_memory(Q.dtype.element_ty, [SLOTS, BLOCK_M, D], QT_SMEM)
    do_ring = gl.allocate_shared_memory(DO.dtype.element_ty, [SLOTS, BLOCK_M, D], QT_SMEM)
    k_smem = gl.allocate_shared_memory(K.dtype.element_ty, [BLOCK_N, D], KT_SMEM)
    v_smem = gl.allocate_shared_memory(V.dtype.element_ty, [BLOCK_N, D], KT_SMEM)
    a_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_M, BLOCK_N], S_SMEM)
    dz_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_M, BLOCK_N], S_SMEM)
    tri_l = _triangle(TRI_SMEM, BLOCK_N, True, LOAD)
    tri_c = _triangle(TRI_SMEM, BLOCK_N, False, LOAD)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_MMA)

    for kb in range(nkb):
        n0 = c0 + (nkb - 1 - kb) * BLOCK_N
        o_kn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
        k_smem.store(_load_keys(K, o_kn, s_kt, T, D, LOAD))
        v_smem.store(_load_keys(V, o_kn, s_vt, T, D, LOAD))
        o_n = n0 + gl.arange(0, BLOCK_N, layout=KEYS)
        b_dkt = hopper.warpgroup_mma_init(gl.zeros([D, BLOCK_N], gl.float32, S_MMA))
        b_dvt = gl.zeros([D, BLOCK_N], gl.float32, S_MMA)
        # query blocks [mb_lo, mb_full) cross the diagonal; from mb_full on every row sees every key of the block
        mb_lo = n0 // BLOCK_M
        mb_full = gl.minimum(gl.cdiv(n0 + BLOCK_N, BLOCK_M), mb_end)
        for g in range(GROUP):
            i_h = i_hk * GROUP + g
            off_row = (i_b * H + i_h).to(gl.int64) * T
            if EARLY_EXIT:
                # the query blocks from mb_stop on used up their sticks before this key block (exit_bounds_kernel)
                mb_stop = gl.minimum(gl.maximum(gl.load(MB_STOP + off_row + n0), mb_full), mb_end)
                mb_stop = gl.where(walk_all, mb_end, mb_stop)
            else:
                mb_stop = mb_end
            Qh = Q + i_b.to(gl.int64) * s_q0 + i_h.to(gl.int64) * s_q1
            DOh = DO + i_b.to(gl.int64) * s_do0 + i_h.to(gl.int64) * s_do1
            off_tab = ((i_b * H + i_h).to(gl.int64) * N_CHUNKS + i_c) * T
            _load_rows(Qh, DOh, q_ring, do_ring, 0, mb_lo, s_qt, s_dot, T, BLOCK_M, D, LOAD)
            _load_rows(Qh, DOh, q_ring, do_ring, 1, mb_lo + 1, s_qt, s_dot, T, BLOCK_M, D, LOAD)
            async_copy.wait_group(1)
            fence_async_shared()
            b_z = warpgroup_mma(q_ring.index(0), k_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            b_p = warpgroup_mma(do_ring.index(0), v_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            b_z, b_p = warpgroup_mma_wait(0, deps=(b_z, b_p))
            for it in range(0, mb_full - mb_lo):
                b_z, b_p, b_dkt, b_dvt = _tile(it, mb_lo, b_z, b_p, b_dkt, b_dvt, q_ring, do_ring, k_smem, v_smem,
                                               a_smem, dz_smem, tri_l, tri_c, zero_s, o_n, Qh, DOh, s_qt, s_dot,
                                               DELTA + off_row, TW + off_tab, TR + off_tab, T, qk_scale, dz_scale,
                                               True, ATTEND_CURRENT, EARLY_NEXT, BLOCK_M, BLOCK_N, D, LOAD, A_OP,
                                               ROWS)
            for it in range(mb_full - mb_lo, mb_stop - mb_lo):
                b_z, b_p, b_dkt, b_dvt = _tile(it, mb_lo, b_z, b_p, b_dkt, b_dvt, q_ring, do_ring, k_smem, v_smem,
                                               a_smem, dz_smem, tri_l, tri_c, zero_s, o_n, Qh, DOh, s_qt, s_dot,
                                               DELTA + off_row, TW + off_tab, TR + off_tab, T, qk_scale, dz_scale,
                                               False, ATTEND_CURRENT, EARLY_NEXT, BLOCK_M, BLOCK_N, D, LOAD, A_OP,
                                               ROWS)
            b_dkt, b_dvt = warpgroup_mma_wait(0, deps=(b_dkt, b_dvt))
            b_dkt = hopper.warpgroup_mma_init(b_dkt)  # dk^T goes on as an accumulator in flight
            async_copy.wait_group(0)
        _store_keys(DK, warpgroup_mma_wait(0, deps=(b_dkt,)), gl.load(SC + BWD_DK), n0, T, BLOCK_N, D, S_MMA)
        _store_keys(DV_, b_dvt, gl.load(SC + BWD_DV), n0, T, BLOCK_N, D, S_MMA)
        # the carries this key block wrote are read back by other threads for the next block, and k and v's
        # shared memory takes the next block
        cta_barrier()


def shared_layouts(block_m, block_n, d):
    """The shared layouts of the query and dO tiles, k and v, A and dz, and the triangles (float16 operands)."""
    return dict(QT_SMEM=gl.NVMMASharedLayout.get_default_for([block_m, d], gl.float16),
                KT_SMEM=gl.NVMMASharedLayout.get_default_for([block_n, d], gl.float16),
                S_SMEM=gl.NVMMASharedLayout.get_default_for([block_m, block_n], gl.float16),
                TRI_SMEM=gl.NVMMASharedLayout.get_default_for([block_n, block_n], gl.float16))


def covers(p):
    """Whether the Gluon dkdv covers problem p (a kernels.config.Problem): a Hopper GPU, whole sequences, one head
    dim of 64 or 128, 16-bit inputs with float16 products."""
    return (not p.upcast and torch.cuda.get_device_capability()[0] == 9 and not p.varlen and p.D == p.DV
            and p.D in (64, 128) and p.f16_products)


def hopper_dkdv(p, ops, mb_stop, delta_g, tw, tr, chunk, scale, attend_current, early_next=False, maxnreg=None):
    """(dk, dv) of problem p by the Gluon kernel, with op.backward_dkdv's arguments: the float16 operands and table
    of operands.backward_operands, mb_stop None (walk everything) or exit_bounds' stops, the dq kernel's delta + g
    and (W, R) table of `chunk` keys per chunk. Tiles are 64 queries x 32 keys (as dkdv_kernel's, whose early-exit
    stops exit_bounds counts in those blocks). early_next issues the next tile's products before dz's elementwise
    work instead of after it (more overlap, more registers)."""
    do, q, k, v, table = ops
    hk = k.shape[1]
    dk = torch.empty(p.B, hk, p.T, p.D, dtype=p.dtype, device=q.device)
    dv = torch.empty(p.B, hk, p.T, p.DV, dtype=p.dtype, device=q.device)
    assert chunk % TILE_N == 0 and all(x.stride(-1) == 1 for x in (q, k, v, do))
    hopper_dkdv_kernel[(p.B * hk, tw.shape[2])](
        q, k, v, do, delta_g, tw, tr, dk, dv, tw if mb_stop is None else mb_stop, table, *q.stride()[:3],
        *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], float(scale), p.T, chunk, tw.shape[2], p.H, p.group,
        D=p.D, ATTEND_CURRENT=bool(attend_current), EARLY_EXIT=mb_stop is not None, EARLY_NEXT=bool(early_next),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, **shared_layouts(TILE_M, TILE_N, p.D), num_warps=4,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return dk, dv
