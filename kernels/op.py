"""The op: launchers of the forward and backward kernels, the ``torch.library`` custom ops (forward, backward,
fake tensors, autograd) and the public function ``stick_breaking_attention_triton``.

A call works out its Problem once (shapes, numerics, the LaunchConfig it was given); the custom ops carry the
configuration by its key, since their schema takes no objects. ``record``, where a launcher takes one, is a dict
that receives the compiled kernel of each launch (benchmarks/ report its registers and spills).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .backward import dkdv_kernel, dq_kernel, exit_bounds_kernel
from .config import LaunchConfig, Problem, config_of
from .forward import FWD_NONFINITE, forward_kernel
from .operands import backward_operands, forward_table
from .tile_math import TL_DTYPE


def forward(p, q, k, v, scale, attend_current, record=None):
    """(o, rem, lo) of problem p: lo (B, H, T) int32 holds the first key each row's block walked, for the backward,
    where early exit applies to the call; else it is empty and the backward walks everything."""
    o = torch.empty(p.B, p.H, p.T, p.DV, dtype=q.dtype, device=q.device)
    rem = torch.empty(p.B, p.H, p.T, dtype=torch.float32, device=q.device)
    lo = torch.empty(p.config.exit_rows(p.B, p.H, p.T, p.varlen), dtype=torch.int32, device=q.device)
    exit_early = p.walks_can_stop(lo)
    tile = p.tile("fwd")
    grid = (p.B * p.n_seq * p.H, triton.cdiv(p.max_len, tile.block_m))
    if grid[1] == 0:
        return o, rem, lo
    v_op, table = forward_table(v, copy=p.f16_products and v.dtype == torch.bfloat16)

    def launch(early_exit, redo):
        return forward_kernel[grid](
            q, k, v_op, o, rem, lo if exit_early else rem, p.cu, table, q.stride(), k.stride(), v_op.stride(),
            o.stride(), float(scale), **p.sizes(q.dtype), ATTEND_CURRENT=bool(attend_current),
            OP_DTYPE=tl.float16 if p.f16_products else TL_DTYPE[q.dtype],
            SPLIT_A=p.dtype != torch.float32 and not p.config.f16_products, SCAN_L=tile.scan_l,
            EARLY_EXIT=early_exit, EXIT_SEGMENT=p.target.exit_segment, REDO=redo, BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n, **tile.launch_options())

    compiled = launch(exit_early, False)
    if record is not None:
        record["fwd"] = compiled
    # NaN in, NaN out: blocks that stopped early in a head with a non-finite key or value walk everything. On a GPU
    # the second launch always runs (reading the flags would wait for the GPU); CPU tensors (Triton's interpreter,
    # where a launch is dear) read them first
    if exit_early and (q.device.type == "cuda" or bool(table[..., FWD_NONFINITE.value].any())):
        launch(False, True)
    return o, rem, lo


def backward_dq(p, ops, drem, rem, scale, attend_current, record=None):
    """The query-major kernel: (dq, delta + g per row, the (W, R) carries at the chunk boundaries, chunk size)."""
    do, q, k, v, table = ops
    chunk = p.chunk_size()
    n_chunks = max(1, triton.cdiv(p.max_len, chunk))
    # (W, R) carries at the right end of each chunk, per query row; rows left of a boundary keep an empty carry
    tw = torch.zeros(p.B, p.H, n_chunks, p.T, dtype=torch.float32, device=q.device)
    tr = torch.zeros(p.B, p.H, n_chunks, p.T, dtype=torch.float32, device=q.device)
    delta_g = torch.empty(p.B, p.H, p.T, dtype=torch.float32, device=q.device)
    dq = torch.empty(p.B, p.H, p.T, p.D, dtype=p.dtype, device=q.device)
    tile = p.tile("dq")
    assert chunk % tile.block_m == 0 and chunk % tile.block_n == 0
    grid = (p.B * p.n_seq * p.H, triton.cdiv(p.max_len, tile.block_m))
    compiled = dq_kernel[grid](
        q, k, v, do, rem, drem, dq, delta_g, tw, tr, p.cu, table, scale=float(scale), CHUNK=chunk,
        N_CHUNKS=n_chunks, s_q=q.stride(), s_k=k.stride(), s_v=v.stride(), s_do=do.stride(), **p.sizes(q.dtype), ATTEND_CURRENT=bool(attend_current), SCAN_L=tile.scan_l,
        SCAN_DL=tile.scan_dl, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, **tile.launch_options())
    if record is not None:
        record["dq"] = compiled
    return dq, delta_g, tw, tr, chunk


def exit_bounds(lo, cu, n_seq, varlen, block_m, block_n):
    """MB_STOP (B, H, T) int32 for the key-major kernel, set at each key block's first key (exit_bounds_kernel),
    from the forward's lo and the sequences (n_seq of them, at cu where varlen)."""
    B, H, T = lo.shape
    suf = torch.empty_like(lo)
    mb_stop = torch.empty_like(lo)
    exit_bounds_kernel[(B * H, n_seq)](lo, cu, suf, mb_stop, T, VARLEN=varlen, BLOCK_M=block_m, BLOCK_N=block_n,
                                       TILE=64)
    return mb_stop


def backward_dkdv(p, ops, lo, delta_g, tw, tr, chunk, scale, attend_current, record=None):
    """The key-major kernel: dk and dv, reading and advancing the table's carries chunk by chunk; lo None (walk
    everything) or the forward's first keys walked."""
    do, q, k, v, table = ops
    hk = k.shape[1]
    dk = torch.empty(p.B, hk, p.T, p.D, dtype=p.dtype, device=q.device)
    dv = torch.empty(p.B, hk, p.T, p.DV, dtype=p.dtype, device=q.device)
    tile = p.tile("dkdv")
    assert chunk % tile.block_n == 0
    n_chunks = tw.shape[2]
    mb_stop = None if lo is None else exit_bounds(lo, p.cu, p.n_seq, p.varlen, tile.block_m, tile.block_n)
    if p.config.hopper_dkdv and not p.upcast:
        from . import hopper_backward  # Gluon: imported only where it can run
        if hopper_backward.covers(p):
            return hopper_backward.hopper_dkdv(p, ops, mb_stop, delta_g, tw, tr, chunk, scale, attend_current)
    compiled = dkdv_kernel[(p.B * p.n_seq * hk, n_chunks)](
        q, k, v, do, delta_g, tw, tr, dk, dv, tw if mb_stop is None else mb_stop, p.cu, table, scale=float(scale), CHUNK=chunk,
        N_CHUNKS=n_chunks, s_q=q.stride(), s_k=k.stride(), s_v=v.stride(), s_do=do.stride(), **p.sizes(q.dtype), ATTEND_CURRENT=bool(attend_current), SCAN_L=tile.scan_l,
        SCAN_DL=tile.scan_dl, EARLY_EXIT=lo is not None, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        **tile.launch_options())
    if record is not None:
        record["dkdv"] = compiled
    return dk, dv


def backward(p, do, drem, q, k, v, rem, lo, scale, attend_current):
    if p.max_len == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    drem = drem.to(torch.float32).contiguous()
    ops = backward_operands(scale, p.DV, do, drem * rem, q, k, v)
    dq, delta_g, tw, tr, chunk = backward_dq(p, ops, drem, rem, scale, attend_current)
    dk, dv = backward_dkdv(p, ops, lo if p.walks_can_stop(lo) else None, delta_g, tw, tr, chunk, scale,
                           attend_current)
    return dq, dk, dv


@torch.library.custom_op("sb_ref::stick_breaking_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attend_current: bool,
            cu_seqlens: Optional[torch.Tensor], max_len: int, config: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = Problem.of(q, k, v, cu_seqlens, max_len, config_of(config))
    return forward(p, q, k, v, scale, attend_current)


@_fwd_op.register_fake
def _(q, k, v, scale, attend_current, cu_seqlens, max_len, config):
    B, H, T, _ = q.shape
    lo = q.new_empty(config_of(config).exit_rows(B, H, T, cu_seqlens is not None), dtype=torch.int32)
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32), lo


@torch.library.custom_op("sb_ref::stick_breaking_triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, drem: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            rem: torch.Tensor, lo: torch.Tensor, scale: float, attend_current: bool,
            cu_seqlens: Optional[torch.Tensor], max_len: int, config: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = Problem.of(q, k, v, cu_seqlens, max_len, config_of(config))
    return backward(p, do, drem, q, k, v, rem, lo, scale, attend_current)


@_bwd_op.register_fake
def _(do, drem, q, k, v, rem, lo, scale, attend_current, cu_seqlens, max_len, config):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, attend_current, cu_seqlens, max_len, config = inputs
    _, rem, lo = output
    # the backward recomputes everything from q, k, v, one float32 per row (the remainder, for g = dRem * rem) and
    # under early exit one int32 per row (how far the forward walked)
    ctx.save_for_backward(q, k, v, rem, lo, cu_seqlens)
    ctx.mark_non_differentiable(lo)
    ctx.scale = scale
    ctx.attend_current = attend_current
    ctx.max_len = max_len
    ctx.config = config


def _autograd_backward(ctx, do, drem, _):
    q, k, v, rem, lo, cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    if drem is None:
        drem = torch.zeros_like(rem)
    dq, dk, dv = _bwd_op(do, drem, q, k, v, rem, lo, ctx.scale, ctx.attend_current, cu_seqlens, ctx.max_len,
                         ctx.config)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def max_seqlen_of(T, cu_seqlens):
    """The longest sequence: T, or the widest gap of cu_seqlens (read back from the GPU)."""
    if cu_seqlens is None:
        return T
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


DEFAULT_CONFIG = LaunchConfig()


def stick_breaking_attention_triton(q, k, v, scale: float, attend_current: bool, cu_seqlens=None,
                                    max_seqlen=None, config: LaunchConfig = DEFAULT_CONFIG):
    """(o, rem) of stick-breaking attention through the Triton kernels; inputs are validated by sb_ref.

    q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv) in one of float16/bfloat16/float32; cu_seqlens None or
    (N+1,) int offsets with B == 1, and max_seqlen the longest of its sequences (read from cu_seqlens, one wait
    for the GPU, when not given; pass it when it is known on the host: the kernels trust it, and a shorter one
    leaves rows unwritten). config: how the kernels launch (tiles, early exit, product precision). Returns
    o (B, Hq, T, Dv) in q.dtype and rem (B, Hq, T) float32, both differentiable in q, k and v. The backward is
    deterministic (no atomics).
    """
    if cu_seqlens is None or max_seqlen is None:
        max_seqlen = max_seqlen_of(q.shape[2], cu_seqlens)
    o, rem, _ = _fwd_op(q, k, v, float(scale), bool(attend_current), cu_seqlens, int(max_seqlen),
                        config.key)
    return o, rem
