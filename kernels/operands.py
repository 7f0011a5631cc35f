"""The kernels' operands and scale tables: 16-bit products in float16, bfloat16 inputs as float16 copies scaled by
powers of two (kernels/README.md, "16-bit products").

Every product of a computed tile is one float16 product. A bfloat16 tensor enters as a float16 copy scaled per
(batch, kv-head) by a power of two that puts its largest magnitude in [2^13, 2^14) (scaled_f16: every bfloat16
value keeps all its bits unless it is 2^28 times smaller than the head's largest), and the accumulators are scaled
back from a small table per (batch, kv-head), whose slots are named below.
"""
import torch
import triton
import triton.language as tl

from .forward import FWD_NONFINITE, FWD_TABLE, FWD_V_SCALE
from .tile_math import pow2_scale

# The backward's table (B, Hk, BWD_TABLE): the factor of the logits (1 / (s_q s_k)), of g (G dz_scale), dz_scale,
# the factors that turn the accumulators into dq, dk and dv, log2(dz_scale), and 1 where an input or a gradient is
# not finite (which turns early exit off: NaN in, NaN out).
BWD_LOGITS = tl.constexpr(0)
BWD_G = tl.constexpr(1)
BWD_DZ = tl.constexpr(2)
BWD_DQ = tl.constexpr(3)
BWD_DK = tl.constexpr(4)
BWD_DV = tl.constexpr(5)
BWD_LOG2_DZ = tl.constexpr(6)
BWD_NONFINITE = tl.constexpr(7)
BWD_TABLE = tl.constexpr(8)


def group_amax(x, hk):
    """The largest magnitude of x (B, heads, T[, d]) per (batch, kv-head): the q-heads of a GQA group together."""
    x = x.detach().unflatten(1, (hk, x.shape[1] // hk))
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=tuple(range(2, x.dim())), dtype=torch.float32)


@triton.jit
def _scaled_f16_kernel(X, S, Y, T, s_x, H, GROUP, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Y = X * S as float16, one [BLOCK_T, D] tile of one head per program; S per (batch, kv-head)."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    b_s = tl.load(S + i_b * (H // GROUP) + i_h // GROUP)
    o_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m = (o_t[:, None] < T) & (o_d[None, :] < D)
    b_x = tl.load(X + i_b * s_x[0] + i_h * s_x[1] + o_t[:, None] * s_x[2] + o_d[None, :] * s_x[3], mask=m, other=0.0)
    b_y = b_x.to(tl.float32) * b_s
    tl.store(Y + (i_bh * T + o_t[:, None]) * D + o_d[None, :], b_y.to(tl.float16), mask=m)


def scaled_f16(x, s):
    """x * s as float16 for a bfloat16 x (B, heads, T, d) and s (B, Hk) from pow2_scale, contiguous: bfloat16 values
    keep every bit (only values 2^28 times smaller than the largest reach float16's subnormals, where they keep an
    absolute accuracy of 2^-39 of it). One pass of a small kernel, any strides in. (PyTorch's mul with a float16
    `out` took the generic, unvectorized path: about 100 us for a (4, 12, 4096, 128) tensor on an H100, five times
    per forward+backward.)"""
    B, H, T, d = x.shape
    y = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    block_d = triton.next_power_of_2(d)
    block_t = max(1, 8192 // block_d)
    grid = (B * H, triton.cdiv(T, block_t))
    if grid[1] > 0 and B * H > 0:
        _scaled_f16_kernel[grid](x.detach(), s.contiguous(), y, T, x.stride(), H, H // s.shape[1], D=d,
                                 BLOCK_T=block_t, BLOCK_D=block_d)
    return y


@triton.jit
def _forward_table_kernel(AMAX_V, S, TABLE, N, COPY: tl.constexpr, BLOCK: tl.constexpr):
    """Per (batch, kv-head): S, the scale of v's float16 copy (COPY), and the forward's TABLE."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_inv = tl.full([BLOCK], 1.0, dtype=tl.float32)
    if COPY:
        b_s = pow2_scale(tl.load(AMAX_V + o, mask=m, other=0.0))
        tl.store(S + o, b_s, mask=m)
        b_inv = 1.0 / b_s
    tl.store(TABLE + FWD_TABLE * o + FWD_V_SCALE, b_inv, mask=m)
    tl.store(TABLE + FWD_TABLE * o + FWD_NONFINITE, tl.zeros([BLOCK], dtype=tl.float32), mask=m)


def forward_table(v, copy):
    """The forward's v operand and its table (B, Hk, FWD_TABLE) per kv-head: 1 / the scale of v, and a flag the
    early-exit forward sets where the kv-head's k or v holds a NaN or an infinity. With copy (f16 products of a
    bfloat16 v), v goes in as a float16 copy and o is scaled back; else v itself and 1."""
    B, hk = v.shape[:2]
    table = torch.empty(B, hk, FWD_TABLE.value, dtype=torch.float32, device=v.device)
    s = torch.empty(B, hk, dtype=torch.float32, device=v.device) if copy else None
    # without a copy the unused pointers get the table (a kernel takes tensors where a launch may leave them out)
    _forward_table_kernel[(triton.cdiv(B * hk, 128),)](group_amax(v, hk) if copy else table,
                                                       table if s is None else s, table, B * hk, COPY=copy,
                                                       BLOCK=128)
    return (scaled_f16(v, s) if copy else v), table


@triton.jit
def _backward_table_kernel(AMAX, S, TABLE, N, scale, DV, COPY: tl.constexpr, DZ: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Per (batch, kv-head), from AMAX (5, N) of q, k, v, dO, g: S (4, N), the scales of the float16 copies of
    q, k, v, dO (COPY), and the backward's TABLE, in float64 until the store."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_aq = tl.load(AMAX + o, mask=m, other=0.0)
    b_ak = tl.load(AMAX + N + o, mask=m, other=0.0)
    b_av = tl.load(AMAX + 2 * N + o, mask=m, other=0.0)
    b_ado = tl.load(AMAX + 3 * N + o, mask=m, other=0.0)
    b_ag = tl.load(AMAX + 4 * N + o, mask=m, other=0.0)
    if COPY:
        b_sq, b_sk, b_sv, b_sdo = pow2_scale(b_aq), pow2_scale(b_ak), pow2_scale(b_av), pow2_scale(b_ado)
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
    finite = (b_aq < float("inf")) & (b_ak < float("inf")) & (b_av < float("inf")) & (b_ado < float("inf"))
    b_walk_all = tl.where(finite & (b_ag < float("inf")), 0.0, 1.0)
    scale64 = tl.full([BLOCK], scale, dtype=tl.float64)
    p = TABLE + BWD_TABLE * o
    tl.store(p + BWD_LOGITS, (1.0 / (b_sq * b_sk)).to(tl.float32), mask=m)
    tl.store(p + BWD_G, b_gdz.to(tl.float32), mask=m)
    tl.store(p + BWD_DZ, b_dz.to(tl.float32), mask=m)
    tl.store(p + BWD_DQ, (scale64 / (b_gdz * b_sk)).to(tl.float32), mask=m)
    tl.store(p + BWD_DK, (scale64 / (b_gdz * b_sq)).to(tl.float32), mask=m)
    tl.store(p + BWD_DV, (1.0 / b_sdo).to(tl.float32), mask=m)
    tl.store(p + BWD_LOG2_DZ, b_e.to(tl.float32), mask=m)
    tl.store(p + BWD_NONFINITE, b_walk_all, mask=m)


def backward_operands(scale, DV, do, g, q, k, v):
    """The backward's operands (float16 copies of bfloat16 ones, else the inputs) and its table (B, Hk, BWD_TABLE).

    With G = s_dO s_v the product of the copies gives G dO.v; the kernels multiply dl by dz_scale, a power of two
    such that G dz_scale |dl|, |C + g| and |dz| stay below 2^15 however the head's numbers fall (dl, C and dz go to
    float16 products): |dz| <= |dl| + |C + g| <= 2 max|dO . v| + max|g|, max|dO . v| <= Dv max|dO| max|v|.
    Returns (do, q, k, v, table)."""
    B, hk = k.shape[:2]
    # the largest magnitudes of q, k, v, dO and g per (batch, kv-head) in one (5, B, Hk) tensor
    amax = torch.stack([group_amax(x, hk) for x in (q, k, v, do, g)])
    copy = q.dtype == torch.bfloat16
    s = torch.empty(4, B, hk, dtype=torch.float32, device=q.device) if copy else None
    table = torch.empty(B, hk, BWD_TABLE.value, dtype=torch.float32, device=q.device)
    _backward_table_kernel[(triton.cdiv(B * hk, 128),)](amax, table if s is None else s, table, B * hk,
                                                        float(scale), DV, COPY=copy, DZ=q.dtype != torch.float32,
                                                        BLOCK=128)
    if copy:
        q, k, v, do = (scaled_f16(x, s[i]) for i, x in enumerate((q, k, v, do)))
    return do, q, k, v, table
