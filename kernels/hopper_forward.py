"""The Hopper forward (sm_90), in Triton's Gluon dialect: kernels/forward.py's walk with its tensor-core products
asynchronous (wgmma), so that each tile's elementwise work runs while a product is in flight.

The tile math is forward.py's: base-2 logits z = log2(e) * scale * q.k, log-sigmoids from one exp2 and a
polynomial log1p, the in-tile reverse cumsum of log2(1 - beta) as two float16 products with a 0/1 triangle, and
A = 2^(log2 beta + S + cumsum) into o as a float16 product with v's float16 copy (operands.forward_table). What
changes is the order. wgmma groups complete in issue order, so one warpgroup overlaps work with products by
issuing each product as early as its inputs allow and waiting for it as late as its result allows:

    tile j:   log-sigmoids of z_j            while  o += A_{j-1} v_{j-1}   runs
              issue cumsum_j (2 products), then z_{j+1} = q k_{j+1}^T
              wait cumsum_j                  (o's product, older, is done too)
              A_j = 2^(...), S += ...        while  z_{j+1}               runs
              issue o += A_j v_j,  wait z_{j+1}

Keys and values stream into a ring of three shared-memory slots by cp.async, two tiles ahead: a slot is refilled
once the product that read it (o's, of the tile before) is done.

It covers the walk without early exit for 16-bit inputs with the same head dim for q, k and v (64 or 128), GQA and
attend_current; the `tl` kernels remain the path for everything else. Gluon does not run in Triton's interpreter:
tests/test_hopper.py compiles it for sm_90 on any machine and runs it on a Hopper GPU.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper
from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, warpgroup_mma, \
    warpgroup_mma_wait
from triton.runtime.jit import constexpr_function

from .forward import FWD_V_SCALE
from .operands import forward_table

LOG2E = gl.constexpr(1.4426950408889634)
SLOTS = gl.constexpr(3)  # the ring of key and value tiles in shared memory


@constexpr_function
def mma_layout(n, num_warps):
    """wgmma's accumulator layout of a [16 * num_warps, n] tile (a warpgroup per 64 rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@constexpr_function
def a_operand(parent):
    """The layout of a 16-bit left operand in registers for a product whose result has layout `parent`."""
    return gl.DotOperandLayout(operand_index=0, parent=parent, k_width=2)


@constexpr_function
def load_layout(d, num_warps):
    """Rows of d 16-bit values loaded 16 bytes per thread."""
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (d // 8), d // 8],
                            warps_per_cta=[num_warps, 1], order=[1, 0])


@gluon.jit
def _q_tile(Q, s_qt, m0, T, Q_SMEM: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr, LOAD: gl.constexpr):
    """The program's queries (rows past T as zeros) in shared memory; Q points at the program's head."""
    o_qm = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LOAD))
    o_qd = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    b_q = gl.load(Q + gl.expand_dims(o_qm, 1) * s_qt + gl.expand_dims(o_qd, 0),
                  mask=gl.expand_dims(o_qm < T, 1) & gl.expand_dims(o_qd < D, 0), other=0.0)
    return gl.allocate_shared_memory(Q.dtype.element_ty, [BLOCK_M, D], Q_SMEM, b_q)


@gluon.jit
def _triangle(TRI_SMEM: gl.constexpr, BLOCK_N: gl.constexpr, LOAD: gl.constexpr):
    """The in-tile cumsum's 0/1 matrix in shared memory: [k, j] = 1 where key k is nearer than key j."""
    o_tk = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
    o_tj = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, LOAD))
    tri = (gl.expand_dims(o_tk, 1) > gl.expand_dims(o_tj, 0)).to(gl.float16)
    return gl.allocate_shared_memory(gl.float16, [BLOCK_N, BLOCK_N], TRI_SMEM, tri)


@gluon.jit
def _store_outputs(O, REM, SC, b_o, b_s, m0, o_m, s_ot, T, BLOCK_M: gl.constexpr, D: gl.constexpr,
                   O_MMA: gl.constexpr):
    """o (v's power-of-two scale undone) and rem = 2^S of the program's rows o_m (from m0); O and REM point at its
    head."""
    b_o = b_o * gl.load(SC + FWD_V_SCALE)
    o_om = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, O_MMA))
    o_od = gl.arange(0, D, layout=gl.SliceLayout(0, O_MMA))
    gl.store(O + gl.expand_dims(o_om, 1) * s_ot + gl.expand_dims(o_od, 0), b_o.to(O.dtype.element_ty),
             mask=gl.expand_dims(o_om < T, 1) & gl.expand_dims(o_od < D, 0))
    gl.store(REM + o_m, gl.exp2(b_s), mask=o_m < T)


@gluon.jit
def log_sigmoids(z):
    """(log2 beta, log2(1 - beta), beta, 1 - beta) of base-2 logits: tile_math.log_sigmoids with its short (16-bit)
    polynomial (what a kernel leaves unused costs nothing)."""
    e = gl.exp2(-gl.abs(z))
    p = e * 0.033822045969008445 - 0.14447109569887714
    p = p * e + 0.30163800973506666
    p = p * e - 0.46865887914367604
    p = p * e + 0.7203587726757784
    p = p * e - 1.4426814680651523
    nl1p = e * p
    r = gl.exp2(nl1p)
    er = e * r
    return gl.minimum(z, 0.0) + nl1p, nl1p - gl.maximum(z, 0.0), gl.where(z >= 0, r, er), gl.where(z >= 0, er, r)


@gluon.jit
def _tile_logs(b_z, qk_scale, o_m, kb, zero_s, MASKED: gl.constexpr, ATTEND_CURRENT: gl.constexpr,
               BLOCK_N: gl.constexpr, A_OP: gl.constexpr):
    """(log2 beta, log2(1 - beta)) of a tile of logits b_z (key block kb; MASKED: the keys a row may not see get
    beta = 0), and log2(1 - beta) >= -6e4 as the float16 hi + lo operands of the in-tile cumsum's two products."""
    b_lb, b_lom, _, _ = log_sigmoids(b_z * qk_scale)
    if MASKED:
        o_n = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, zero_s.type.layout))
        if ATTEND_CURRENT:
            m_vis = gl.expand_dims(o_n, 0) <= gl.expand_dims(o_m, 1)
        else:
            m_vis = gl.expand_dims(o_n, 0) < gl.expand_dims(o_m, 1)
        b_lom = gl.where(m_vis, b_lom, 0.0)
        b_lb = gl.where(m_vis, b_lb, float("-inf"))  # A = 0 where a key is not visible
    b_lc = gl.maximum(b_lom, -60000.0)
    b_hi = b_lc.to(gl.float16)
    b_lo = (b_lc - b_hi.to(gl.float32)).to(gl.float16)
    return b_lb, b_lom, gl.convert_layout(b_hi, A_OP), gl.convert_layout(b_lo, A_OP)


@gluon.jit
def _load_kv(K, V, k_ring, v_ring, slot, kb, s_kt, s_vt, T, BLOCK_N: gl.constexpr, D: gl.constexpr,
             LOAD: gl.constexpr):
    """cp.async of key block kb of K and V into a slot of the rings, as one commit group; rows outside [0, T) (and
    a kb < 0, past the start) arrive as zeros."""
    o_n = kb * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LOAD))
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
    m_n = gl.expand_dims((o_n >= 0) & (o_n < T), 1) & gl.expand_dims(o_d < D, 0)
    o_n2 = gl.expand_dims(o_n, 1)
    o_d2 = gl.expand_dims(o_d, 0)
    async_copy.async_copy_global_to_shared(k_ring.index(slot), K + o_n2 * s_kt + o_d2, mask=m_n)
    async_copy.async_copy_global_to_shared(v_ring.index(slot), V + o_n2 * s_vt + o_d2, mask=m_n)
    async_copy.commit_group()


@gluon.jit
def _tile(it, nb_hi, b_z, b_o, b_s, b_ap, q_smem, k_ring, v_ring, a_smem, tri_smem, zero_s, o_m, K, V, s_kt, s_vt, T,
          qk_scale, MASKED: gl.constexpr, ATTEND_CURRENT: gl.constexpr, A_IN_REGISTERS: gl.constexpr,
          IN_FLIGHT: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, LOAD: gl.constexpr, A_OP: gl.constexpr,
          AV_OP: gl.constexpr):
    """Tile it of the walk (key block nb_hi - 1 - it): takes its logits b_z, issues the next tile's, and returns
    (the next logits, o's accumulator with this tile's product in flight, S, A's operand)."""
    kb = nb_hi - 1 - it
    # log-sigmoids of this tile (the product of the tile before still runs), then the cumsum's products
    b_lb, b_lom, b_hi, b_lo = _tile_logs(b_z, qk_scale, o_m, kb, zero_s, MASKED, ATTEND_CURRENT, BLOCK_N, A_OP)
    b_c = warpgroup_mma(b_hi, tri_smem, zero_s, use_acc=False, is_async=True)
    b_c = warpgroup_mma(b_lo, tri_smem, b_c, is_async=True)
    # the next tile's logits go in behind it
    async_copy.wait_group(0)
    fence_async_shared()
    b_zn = warpgroup_mma(q_smem, k_ring.index((it + 1) % SLOTS).permute((1, 0)), zero_s, use_acc=False,
                         is_async=True)
    b_c, b_o, b_hi, b_lo, b_ap = warpgroup_mma_wait(IN_FLIGHT, deps=(b_c, b_o, b_hi, b_lo, b_ap))
    # o's product of the tile before is done: its slot takes the tile after next
    _load_kv(K, V, k_ring, v_ring, (it + 2) % SLOTS, kb - 2, s_kt, s_vt, T, BLOCK_N, D, LOAD)
    # the weights, while the next logits are computed
    b_a = gl.exp2(b_lb + (gl.expand_dims(b_s, 1) + b_c))
    b_s += gl.sum(b_lom, axis=1)
    if A_IN_REGISTERS:
        b_ap = gl.convert_layout(b_a.to(gl.float16), AV_OP)
        b_o = warpgroup_mma(b_ap, v_ring.index(it % SLOTS), b_o, is_async=True)
    else:
        a_smem.store(b_a.to(gl.float16))
        fence_async_shared()
        b_o = warpgroup_mma(a_smem, v_ring.index(it % SLOTS), b_o, is_async=True)
    b_z = warpgroup_mma_wait(IN_FLIGHT, deps=(b_zn,))
    return b_z, b_o, b_s, b_ap


@gluon.jit
def hopper_forward_kernel(Q, K, V, O, REM, SC, s_q0, s_q1, s_qt, s_k0, s_k1, s_kt, s_v0, s_v1, s_vt, s_o0, s_o1,
                          s_ot, scale, T, H, GROUP, D: gl.constexpr, ATTEND_CURRENT: gl.constexpr,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, Q_SMEM: gl.constexpr,
                          K_SMEM: gl.constexpr, V_SMEM: gl.constexpr, A_SMEM: gl.constexpr, TRI_SMEM: gl.constexpr,
                          OVERLAP: gl.constexpr, A_IN_REGISTERS: gl.constexpr, num_warps: gl.constexpr):
    """o and rem of one query block, one warpgroup (BLOCK_M = 64). The *_SMEM are the shared layouts of each
    operand (hopper_forward picks them); s_* the strides of batch, head and time (the dim's stride is 1). Without
    OVERLAP every wait waits for all products issued (the same work, synchronous: the overlap's ablation). With
    A_IN_REGISTERS, A enters its product from registers (kept alive until that product is waited for) instead of
    through shared memory."""
    IN_FLIGHT: gl.constexpr = 1 if OVERLAP else 0
    S_MMA: gl.constexpr = mma_layout(BLOCK_N, num_warps)
    O_MMA: gl.constexpr = mma_layout(D, num_warps)
    A_OP: gl.constexpr = a_operand(S_MMA)
    AV_OP: gl.constexpr = a_operand(O_MMA)
    LOAD: gl.constexpr = load_layout(D, num_warps)
    ROWS: gl.constexpr = gl.SliceLayout(1, S_MMA)

    i_bh = gl.program_id(0)
    i_m = gl.num_programs(1) - 1 - gl.program_id(1)  # heaviest blocks first
    i_b = i_bh // H
    i_h = i_bh % H
    m0 = i_m * BLOCK_M
    nb_hi = gl.cdiv(gl.minimum(m0 + BLOCK_M, T), BLOCK_N)
    n_masked = nb_hi - gl.minimum(m0 // BLOCK_N, nb_hi)  # the key blocks that cross the diagonal
    qk_scale = scale * LOG2E
    Q += i_b.to(gl.int64) * s_q0 + i_h.to(gl.int64) * s_q1
    K += i_b.to(gl.int64) * s_k0 + (i_h // GROUP).to(gl.int64) * s_k1
    V += i_b.to(gl.int64) * s_v0 + (i_h // GROUP).to(gl.int64) * s_v1
    O += i_b.to(gl.int64) * s_o0 + i_h.to(gl.int64) * s_o1
    REM += (i_b * H + i_h).to(gl.int64) * T
    SC += (i_b * (H // GROUP) + i_h // GROUP) * 2

    # shared memory: q, the rings of k and v, A's tile, the triangle of the in-tile cumsum
    q_smem = _q_tile(Q, s_qt, m0, T, Q_SMEM, BLOCK_M, D, LOAD)
    k_ring = gl.allocate_shared_memory(K.dtype.element_ty, [SLOTS, BLOCK_N, D], K_SMEM)
    v_ring = gl.allocate_shared_memory(V.dtype.element_ty, [SLOTS, BLOCK_N, D], V_SMEM)
    a_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_M, BLOCK_N], A_SMEM)
    tri_smem = _triangle(TRI_SMEM, BLOCK_N, LOAD)

    _load_kv(K, V, k_ring, v_ring, 0, nb_hi - 1, s_kt, s_vt, T, BLOCK_N, D, LOAD)
    _load_kv(K, V, k_ring, v_ring, 1, nb_hi - 2, s_kt, s_vt, T, BLOCK_N, D, LOAD)
    async_copy.wait_group(1)
    fence_async_shared()
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, S_MMA)
    b_z = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    b_z = warpgroup_mma_wait(0, deps=(b_z,))

    o_m = m0 + gl.arange(0, BLOCK_M, layout=ROWS)
    b_o = hopper.warpgroup_mma_init(gl.zeros([BLOCK_M, D], gl.float32, O_MMA))
    b_s = gl.zeros([BLOCK_M], gl.float32, ROWS)
    b_ap = gl.zeros([BLOCK_M, BLOCK_N], gl.float16, AV_OP)  # A's last operand, with A_IN_REGISTERS
    # the blocks that cross the diagonal, masked; then the rest
    for it in range(0, n_masked):
        b_z, b_o, b_s, b_ap = _tile(it, nb_hi, b_z, b_o, b_s, b_ap, q_smem, k_ring, v_ring, a_smem, tri_smem, zero_s,
                                    o_m, K, V, s_kt, s_vt, T, qk_scale, True, ATTEND_CURRENT, A_IN_REGISTERS,
                                    IN_FLIGHT, BLOCK_N, D, LOAD, A_OP, AV_OP)
    for it in range(n_masked, nb_hi):
        b_z, b_o, b_s, b_ap = _tile(it, nb_hi, b_z, b_o, b_s, b_ap, q_smem, k_ring, v_ring, a_smem, tri_smem, zero_s,
                                    o_m, K, V, s_kt, s_vt, T, qk_scale, False, ATTEND_CURRENT, A_IN_REGISTERS,
                                    IN_FLIGHT, BLOCK_N, D, LOAD, A_OP, AV_OP)
    b_o = warpgroup_mma_wait(0, deps=(b_o,))
    async_copy.wait_group(0)
    _store_outputs(O, REM, SC, b_o, b_s, m0, o_m, s_ot, T, BLOCK_M, D, O_MMA)


def shared_layouts(dtype, block_m, block_n, d):
    """The shared layouts of q, k, v, A and the triangle (NVMMA swizzles that wgmma reads directly)."""
    gdtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    return dict(Q_SMEM=gl.NVMMASharedLayout.get_default_for([block_m, d], gdtype),
                K_SMEM=gl.NVMMASharedLayout.get_default_for([block_n, d], gdtype),
                V_SMEM=gl.NVMMASharedLayout.get_default_for([block_n, d], gl.float16),
                A_SMEM=gl.NVMMASharedLayout.get_default_for([block_m, block_n], gl.float16),
                TRI_SMEM=gl.NVMMASharedLayout.get_default_for([block_n, block_n], gl.float16))


def hopper_forward(q, k, v, scale, attend_current, block_n=32, maxnreg=None, overlap=True, a_in_registers=False,
                   warpgroups=1):
    """(o, rem) of q (B, H, T, D), k and v (B, Hk, T, D) on an sm_90 GPU, walking every key: 16-bit inputs, one
    head dim of 64 or 128 for q, k and v, whole sequences, unit stride along the head dim.
    block_n: keys per tile; maxnreg caps the registers per thread (ptxas), for more programs per SM; overlap=False
    waits for every product right away (the ablation); a_in_registers feeds A to its product from registers;
    warpgroups: warpgroups per program, 64 query rows each."""
    B, H, T, D = q.shape
    o = torch.empty_like(q)
    rem = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    v_op, table = forward_table(v, copy=v.dtype == torch.bfloat16)
    block_m = 64 * warpgroups
    grid = (B * H, triton.cdiv(T, block_m))
    if T == 0 or B * H == 0:
        return o, rem
    hopper_forward_kernel[grid](q, k, v_op, o, rem, table, *q.stride()[:3], *k.stride()[:3], *v_op.stride()[:3],
                                *o.stride()[:3], float(scale), T, H, H // k.shape[1], D=D,
                                ATTEND_CURRENT=bool(attend_current), BLOCK_M=block_m, BLOCK_N=block_n,
                                OVERLAP=bool(overlap), A_IN_REGISTERS=bool(a_in_registers),
                                **shared_layouts(q.dtype, block_m, block_n, D), num_warps=4 * warpgroups,
                                **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return o, rem
