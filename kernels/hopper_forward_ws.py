"""The Hopper forward with a producer warp (sm_90, Gluon): kernels/hopper_forward.py's consumer loop, fed by TMA.

The cp.async ring of hopper_forward.py costs every thread of the warpgroup addresses, masks and a CTA-wide
barrier per tile. Here one producer warp (warp specialization) streams key and value tiles with TMA into the ring,
each slot guarded by two mbarriers: `ready` (the tile has landed: the TMA unit counts its bytes) and `empty` (the
consumer's products that read the slot are done). The consumer warpgroup runs the same tile schedule as
hopper_forward.py (A from registers, products asynchronous) and never waits at a barrier of the whole CTA.

TMA reads k and v as (B * Hk * T, D) matrices, so a tile past a head's last key would hold the next head's first
keys: the path takes sequences whose length is a multiple of the tile, where that never happens.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .forward import FWD_V_SCALE
from .hopper_forward import LOG2E, SLOTS, _q_tile, _tile_logs, _triangle, a_operand, load_layout, mma_layout, \
    shared_layouts
from .operands import forward_table


@gluon.jit
def _producer(k_desc, v_desc, k_ring, v_ring, ready, empty, row0, nb_hi, BLOCK_N: gl.constexpr,
              TILE_BYTES: gl.constexpr):
    """Key blocks nb_hi - 1 down to -1 (one past the start: the consumer's last look-ahead, never used) into the
    ring, each once its slot is empty."""
    for it in range(0, nb_hi + 1):
        slot = it % SLOTS
        mbarrier.wait(empty.index(slot), ((it // SLOTS) & 1) ^ 1)  # a fresh slot counts as empty
        mbarrier.expect(ready.index(slot), TILE_BYTES)
        row = row0 + (nb_hi - 1 - it) * BLOCK_N
        tma.async_copy_global_to_shared(k_desc, [row, 0], ready.index(slot), k_ring.index(slot))
        tma.async_copy_global_to_shared(v_desc, [row, 0], ready.index(slot), v_ring.index(slot))


@gluon.jit
def _consumer_tile(it, nb_hi, b_z, b_o, b_s, b_ap, q_smem, k_ring, v_ring, ready, empty, tri_smem, zero_s, o_m,
                   qk_scale, MASKED: gl.constexpr, ATTEND_CURRENT: gl.constexpr, BLOCK_N: gl.constexpr,
                   A_OP: gl.constexpr, AV_OP: gl.constexpr):
    """hopper_forward._tile with the ring's mbarriers in place of cp.async groups and CTA barriers."""
    b_lb, b_lom, b_hi, b_lo = _tile_logs(b_z, qk_scale, o_m, nb_hi - 1 - it, zero_s, MASKED, ATTEND_CURRENT,
                                          BLOCK_N, A_OP)
    b_c = warpgroup_mma(b_hi, tri_smem, zero_s, use_acc=False, is_async=True)
    b_c = warpgroup_mma(b_lo, tri_smem, b_c, is_async=True)
    nxt = (it + 1) % SLOTS
    mbarrier.wait(ready.index(nxt), ((it + 1) // SLOTS) & 1)
    b_zn = warpgroup_mma(q_smem, k_ring.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    b_c, b_o, b_hi, b_lo, b_ap = warpgroup_mma_wait(1, deps=(b_c, b_o, b_hi, b_lo, b_ap))
    # the previous tile's products are done: its slot goes back to the producer
    mbarrier.arrive(empty.index((it + SLOTS - 1) % SLOTS), count=1, pred=it > 0)
    b_a = gl.exp2(b_lb + (gl.expand_dims(b_s, 1) + b_c))
    b_s += gl.sum(b_lom, axis=1)
    b_ap = gl.convert_layout(b_a.to(gl.float16), AV_OP)
    b_o = warpgroup_mma(b_ap, v_ring.index(it % SLOTS), b_o, is_async=True)
    b_z = warpgroup_mma_wait(1, deps=(b_zn,))
    return b_z, b_o, b_s, b_ap


@gluon.jit
def _consumer(O, REM, SC, s_o0, s_o1, s_ot, i_b, i_h, H, T, m0, nb_hi, n_masked, qk_scale, q_smem, k_ring, v_ring,
              ready, empty, tri_smem, ATTEND_CURRENT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              D: gl.constexpr, num_warps: gl.constexpr):
    """The walk over the key blocks (the default partition, one warpgroup), then o and rem."""
    S_MMA: gl.constexpr = mma_layout(BLOCK_N, num_warps)
    O_MMA: gl.constexpr = mma_layout(D, num_warps)
    A_OP: gl.constexpr = a_operand(S_MMA)
    AV_OP: gl.constexpr = a_operand(O_MMA)
    ROWS: gl.constexpr = gl.SliceLayout(1, S_MMA)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_MMA)
    mbarrier.wait(ready.index(0), 0)
    b_z = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    b_z = warpgroup_mma_wait(0, deps=(b_z,))
    o_m = m0 + gl.arange(0, BLOCK_M, layout=ROWS)
    b_o = hopper.warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, O_MMA))
    b_s = gl.zeros([BLOCK_M], gl.float32, ROWS)
    b_ap = gl.zeros([BLOCK_M, BLOCK_N], gl.float16, AV_OP)
    for it in range(0, n_masked):
        b_z, b_o, b_s, b_ap = _consumer_tile(it, nb_hi, b_z, b_o, b_s, b_ap, q_smem, k_ring, v_ring, ready, empty,
                                             tri_smem, zero_s, o_m, qk_scale, True, ATTEND_CURRENT, BLOCK_N, A_OP,
                                             AV_OP)
    for it in range(n_masked, nb_hi):
        b_z, b_o, b_s, b_ap = _consumer_tile(it, nb_hi, b_z, b_o, b_s, b_ap, q_smem, k_ring, v_ring, ready, empty,
                                             tri_smem, zero_s, o_m, qk_scale, False, ATTEND_CURRENT, BLOCK_N, A_OP,
                                             AV_OP)
    b_o = warpgroup_mma_wait(0, deps=(b_o,))

    b_o = b_o * gl.load(SC + FWD_V_SCALE)
    O += i_b.to(gl.int64) * s_o0 + i_h.to(gl.int64) * s_o1
    o_om = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, O_MMA))
    o_od = gl.arange(0, D, layout=gl.SliceLayout(0, O_MMA))
    gl.store(O + gl.expand_dims(o_om, 1) * s_ot + gl.expand_dims(o_od, 0), b_o.to(O.dtype.element_ty),
             mask=gl.expand_dims(o_om < T, 1) & gl.expand_dims(o_od < D, 0))
    gl.store(REM + (i_b * H + i_h).to(gl.int64) * T + o_m, gl.exp2(b_s), mask=o_m < T)


@gluon.jit
def hopper_forward_ws_kernel(Q, k_desc, v_desc, O, REM, SC, s_q0, s_q1, s_qt, s_o0, s_o1, s_ot, scale, T, H, GROUP,
                             D: gl.constexpr, ATTEND_CURRENT: gl.constexpr, BLOCK_M: gl.constexpr,
                             BLOCK_N: gl.constexpr, Q_SMEM: gl.constexpr, TRI_SMEM: gl.constexpr,
                             num_warps: gl.constexpr):
    """o and rem of one query block: k_desc and v_desc are TMA descriptors of k and v as (B * Hk * T, D)."""
    LOAD: gl.constexpr = load_layout(D, num_warps)
    i_bh = gl.program_id(0)
    i_m = gl.num_programs(1) - 1 - gl.program_id(1)  # heaviest blocks first
    i_b = i_bh // H
    i_h = i_bh % H
    m0 = i_m * BLOCK_M
    nb_hi = gl.cdiv(gl.minimum(m0 + BLOCK_M, T), BLOCK_N)
    n_masked = nb_hi - gl.minimum(m0 // BLOCK_N, nb_hi)
    SC += (i_b * (H // GROUP) + i_h // GROUP) * 2

    Q += i_b.to(gl.int64) * s_q0 + i_h.to(gl.int64) * s_q1
    q_smem = _q_tile(Q, s_qt, m0, T, Q_SMEM, BLOCK_M, D, LOAD)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [SLOTS, BLOCK_N, D], k_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [SLOTS, BLOCK_N, D], v_desc.layout)
    tri_smem = _triangle(TRI_SMEM, BLOCK_N, LOAD)
    fence_async_shared()
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)

    row0 = ((i_b * (H // GROUP) + i_h // GROUP) * T).to(gl.int32)
    gl.warp_specialize([
        (_consumer, (O, REM, SC, s_o0, s_o1, s_ot, i_b, i_h, H, T, m0, nb_hi, n_masked, scale * LOG2E, q_smem,
                     k_ring, v_ring, ready, empty, tri_smem, ATTEND_CURRENT, BLOCK_M, BLOCK_N, D, num_warps)),
        (_producer, (k_desc, v_desc, k_ring, v_ring, ready, empty, row0, nb_hi, BLOCK_N, 4 * BLOCK_N * D)),
    ], [1], [24])
    for i in gl.static_range(SLOTS):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))


def tma_descriptors(k, v_op, block_n, layouts):
    """TMA descriptors of k and v's operand as (B * Hk * T, D) matrices, tiles of block_n keys."""
    descs = []
    for x, layout in ((k, layouts["K_SMEM"]), (v_op, layouts["V_SMEM"])):
        x = x.contiguous().view(-1, x.shape[-1])
        descs.append(TensorDescriptor(x, list(x.shape), list(x.stride()), [block_n, x.shape[-1]], layout))
    return descs


def hopper_forward_ws(q, k, v, scale, attend_current, block_n=32, maxnreg=None, warpgroups=1):
    """(o, rem) as hopper_forward (and for the inputs it takes), with the producer warp, for lengths that are a
    multiple of block_n; warpgroups: consumer warpgroups per program, 64 query rows each."""
    B, H, T, D = q.shape
    o = torch.empty_like(q)
    rem = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    if T == 0 or B * H == 0:
        return o, rem
    v_op, table = forward_table(v, copy=v.dtype == torch.bfloat16)
    block_m = 64 * warpgroups
    layouts = shared_layouts(q.dtype, block_m, block_n, D)
    k_desc, v_desc = tma_descriptors(k, v_op, block_n, layouts)
    grid = (B * H, triton.cdiv(T, block_m))
    hopper_forward_ws_kernel[grid](q, k_desc, v_desc, o, rem, table, *q.stride()[:3], *o.stride()[:3], float(scale),
                                   T, H, H // k.shape[1], D=D, ATTEND_CURRENT=bool(attend_current), BLOCK_M=block_m,
                                   BLOCK_N=block_n, Q_SMEM=layouts["Q_SMEM"], TRI_SMEM=layouts["TRI_SMEM"],
                                   num_warps=4 * warpgroups, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return o, rem
