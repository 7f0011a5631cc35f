"""Context parallelism: one sequence split over the ranks of a torch.distributed group, forward and backward.

Two key segments combine associatively: for a query, a nearer segment's output and log-remainder ``(o_n, S_n)`` and
a farther one's ``(o_f, S_f)`` give ``(o_n + exp(S_n) o_f, S_n + S_f)``. So a rank computes, for each of its query
chunks, the chunk against itself (the causal op, ``stick_breaking_attention``) and against every earlier key chunk
(every key visible: the segment kernels of kernels/segment.py on the Triton path, ``blocked.segment_forward`` on
PyTorch's), as the key chunks travel around a ring of ranks, and combines them. Chunks arrive in ring order, not in order of distance; a partial waits in a *run* (an interval of chunk
indices already combined, near to far) until it can join its neighbours, and a query chunk holds at most a few
runs at a time (three for zigzag).

Layouts of a sequence of length T over W ranks: ``contiguous``, rank r holds positions [r T/W, (r+1) T/W);
``zigzag``, rank r holds chunks r and 2W-1-r of 2W equal chunks, so that every rank has the same causal work.

The backward is distributed too (nobody gathers the sequence): with the stored log-remainders of every pair, each
pair's output gradient and S gradient follow by exact sums in order of distance; a first ring pass recomputes each
pair's output for the scalars ``dO . o_pair`` those sums need, a second runs each pair's backward while the key
chunks travel with their dk, dv accumulators, which come home after one more hop. Communication is
``torch.distributed`` point-to-point (``batch_isend_irecv``): the next key chunk is in flight while this one is used.
Deterministic: every sum runs in a fixed order.

Early exit (float32 compute, i.e. 16- and 32-bit inputs): once every row of a query chunk has less than 2^-160 of
its stick left after the keys from the diagonal back to some chunk, the chunks farther back are not visited in the
forward or the backward (they still travel past: the ring serves every rank). As in the kernels' early exit,
nothing skipped survives float32's rounding.
"""
import math

import torch
import torch.distributed as dist

from .attention import stick_breaking_attention
from .blocked import DEFAULT_BLOCK, _grouped, segment_backward, segment_forward
from .validation import FLOAT_DTYPES, check_options, check_qkv, check_triton_inputs, choose_backend

LAYOUTS = ("zigzag", "contiguous")
EXHAUSTED = -160 * math.log(2)  # a stick below 2^-160 leaves nothing float32 can hold


def _world(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sb_ref.distributed needs an initialized torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks(layout, rank, world):
    """The chunk indices a rank holds, in the order of its local positions, and how many chunks a sequence has."""
    return ([rank, 2 * world - 1 - rank], 2 * world) if layout == "zigzag" else ([rank], world)


def shard_sequence(x, group=None, layout="zigzag", dim=2):
    """This rank's part of a full tensor x along ``dim`` (its length must split into the layout's chunks)."""
    _check_layout(layout)
    rank, world = _world(group)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    own, n = _chunks(layout, rank, world)
    if x.shape[dim] % n != 0:
        raise ValueError(f"the length along dim {dim} ({x.shape[dim]}) must split into {n} equal chunks for "
                         f"layout={layout!r} over {world} ranks")
    parts = x.chunk(n, dim)
    return torch.cat([parts[c] for c in own], dim)


def gather_sequence(x_loc, group=None, layout="zigzag", dim=2):
    """The full tensor on every rank from each rank's part (shard_sequence's inverse; no gradient flows back)."""
    _check_layout(layout)
    rank, world = _world(group)
    parts = [torch.empty_like(x_loc) for _ in range(world)]
    dist.all_gather(parts, x_loc.contiguous(), group=group)
    chunks = {}
    for r, part in enumerate(parts):
        own, _ = _chunks(layout, r, world)
        for c, piece in zip(own, part.chunk(len(own), dim)):
            chunks[c] = piece
    return torch.cat([chunks[c] for c in sorted(chunks)], dim)


def _check_same_shapes(q, k, v, group, world):
    """Every rank's shapes, dtypes and layout agree: checked with one small all_gather, so that a mismatch raises
    the same ValueError on every rank instead of hanging a later exchange."""
    info = torch.tensor([*q.shape, *k.shape, *v.shape, FLOAT_DTYPES.index(q.dtype)], dtype=torch.int64)
    device = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    gathered = [torch.empty_like(info, device=device) for _ in range(world)]
    dist.all_gather(gathered, info.to(device), group=group)
    shapes = [tuple(t.tolist()) for t in gathered]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("every rank must pass q, k and v of the same shapes and dtype (its own part of one "
                         f"sequence), got {[s[:-1] for s in shapes]} over the ranks")


def _ring(tensors, group, rank, world):
    """Start sending tensors to the next rank and receiving the previous rank's (same shapes); returns
    (received, wait) where wait() completes both."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    sent = [t.contiguous() for t in tensors]  # kept alive until the sends complete
    received = [torch.empty_like(t) for t in sent]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in sent]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in received]
    works = dist.batch_isend_irecv(ops)

    def wait():
        for w in works:
            w.wait()
        del sent[:]
        return received
    return wait


def _ring_walk(blocks, group, rank, world, accumulators=None):
    """(owner rank, blocks, accumulators) of every rank in ring order, starting with this rank's: the next blocks
    are in flight while the caller uses the current ones; accumulators, which the caller adds to, travel once it
    has (and, after the last step, are the caller's to send home)."""
    current, acc = blocks, accumulators
    for step in range(world):
        wait = _ring(current, group, rank, world) if step + 1 < world else None
        yield (rank - step) % world, current, acc
        if wait is not None:
            wait_acc = _ring(acc, group, rank, world) if acc is not None else None
            current = wait()
            acc = wait_acc() if wait_acc is not None else None


class _Runs:
    """The partials of one query chunk, combined into intervals of key chunks [lo, hi] as neighbours arrive:
    {lo: (hi, o, S)}, o and S of the interval's keys walked nearest first."""

    def __init__(self):
        self.runs = {}

    def add(self, chunk, o, S):
        lo, hi = chunk, chunk
        nearer = next((l for l, (h, _, _) in self.runs.items() if l == hi + 1), None)
        if nearer is not None:  # the interval just nearer: it goes first
            h, o_n, S_n = self.runs.pop(nearer)
            o, S, hi = o_n + S_n.exp()[..., None] * o, S_n + S, h
        farther = next((l for l, (h, _, _) in self.runs.items() if h == lo - 1), None)
        if farther is not None:
            _, o_f, S_f = self.runs.pop(farther)
            o, S, lo = o + S.exp()[..., None] * o_f, S + S_f, farther
        self.runs[lo] = (hi, o, S)

    def nearest(self, end, cutoff):
        """(o, S) of the keys from cutoff up to chunk end - 1: every run when all of them were visited (one run by
        then), else the run that reaches the diagonal (the others lie past the cutoff)."""
        if cutoff == 0:
            (lo, (hi, o, S)), = self.runs.items()
            return o, S
        hi, o, S = self.runs[cutoff]
        assert hi == end - 1
        return o, S

    def exhausted_below(self, end, rem_diagonal):
        """The first key chunk still worth visiting for queries of chunk `end`: the start of the run next to the
        diagonal once every row's stick is below 2^-160 after it (float32: nothing farther survives rounding, as
        in the kernels' early exit), else 0."""
        for lo, (hi, o, S) in self.runs.items():
            if hi == end - 1 and bool(((rem_diagonal.log() + S) < EXHAUSTED).all()):
                return lo
        return 0


class _Local:
    """A rank's side of the walk: its query chunks (q5, grouped as blocked._grouped makes them), its key/value
    chunks as the blocks that travel, and the work of a query chunk against an earlier key chunk (a pair): on the
    Triton path the blocks travel in the inputs' dtype and a pair runs through the segment kernels
    (kernels/segment.py), on the torch path through blocked.segment_forward / segment_backward's tiled PyTorch in
    the compute dtype."""

    def __init__(self, q, k, v, layout, group, backend):
        self.rank, self.world = _world(group)
        self.layout, self.group = layout, group
        self.own, _ = _chunks(layout, self.rank, self.world)
        self.dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.triton = choose_backend(backend, q) == "triton"
        self.qc, self.kc, self.vc = (x.chunk(len(self.own), 2) for x in (q, k, v))
        grouped = [_grouped(a, b, c, self.dtype) for a, b, c in zip(self.qc, self.kc, self.vc)]
        self.q5 = [g[0] for g in grouped]
        if self.triton:
            self.blocks = [x.contiguous() for pair in zip(self.kc, self.vc) for x in pair]
        else:
            self.blocks = [x for g in grouped for x in g[1:]]  # k, v of each local chunk

    def pair_forward(self, i, k_b, v_b, scale, block):
        """(o, S) of query chunk i against the key chunk (k_b, v_b), grouped as q5 (o (B, Hk, G, T, Dv))."""
        if not self.triton:
            return segment_forward(self.q5[i], k_b, v_b, scale, block)
        from .kernels.segment import segment_forward_triton
        o, S = segment_forward_triton(self.qc[i], k_b, v_b, scale)
        return o.reshape(self.q5[i].shape[:-1] + (v_b.shape[-1],)), S.reshape(self.q5[i].shape[:-1])

    def pair_backward(self, i, k_b, v_b, do5, dS, scale, block):
        """(dq grouped as q5, dk, dv as (B, Hk, 1, T, *)) of pair_forward for the gradients do5 of o and dS of S."""
        if not self.triton:
            return segment_backward(self.q5[i], k_b, v_b, do5, dS, scale, block)
        from .kernels.segment import segment_backward_triton
        q = self.qc[i]
        dq, dk, dv = segment_backward_triton(q, k_b, v_b, do5.reshape(q.shape[:-1] + (v_b.shape[-1],)),
                                             dS.reshape(q.shape[:-1]), scale)
        return dq.reshape(self.q5[i].shape), dk.unsqueeze(2), dv.unsqueeze(2)

    def zero_accumulators(self):
        """dk, dv accumulators for the travelling blocks, in the compute dtype, shaped (B, Hk, 1, T, *)."""
        return [x.new_zeros(x.shape[:2] + (1,) + x.shape[-2:], dtype=self.dtype) for x in self.blocks]

    def pairs(self, accumulators=None):
        """(query chunk index, key chunk, its k, its v, the accumulators this rank holds, their index) for every
        pair of a local query chunk and an earlier key chunk, in ring order; afterwards self.accumulators holds
        those of the last step, whether or not this rank had a pair then."""
        for owner, blocks, acc in _ring_walk(self.blocks, self.group, self.rank, self.world, accumulators):
            self.accumulators = acc
            for j, chunk in enumerate(_chunks(self.layout, owner, self.world)[0]):
                for i, a in enumerate(self.own):
                    if chunk < a:
                        yield i, chunk, blocks[2 * j], blocks[2 * j + 1], acc, 2 * j


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, attend_current, layout, group, backend, block):
        loc = _Local(q, k, v, layout, group, backend)
        own, qc, kc, vc, q5, dtype = loc.own, loc.qc, loc.kc, loc.vc, loc.q5, loc.dtype
        diag = [_diagonal(qc[i], kc[i], vc[i], scale, attend_current, backend, dtype) for i in range(len(own))]
        rem_d5 = [r.to(dtype).reshape(q5[i].shape[:-1]) for i, (_, r) in enumerate(diag)]
        runs = [_Runs() for _ in own]
        cutoff = [0] * len(own)  # key chunks below it are not visited: the sticks are used up before them
        S_pair = {}  # (query chunk index, key chunk) -> S of the pair, for the backward
        for i, b, k_b, v_b, _, _ in loc.pairs():
            if b < cutoff[i]:
                continue
            o_p, S_p = loc.pair_forward(i, k_b, v_b, scale, block)
            runs[i].add(b, o_p, S_p)
            S_pair[i, b] = S_p
            if dtype == torch.float32:
                cutoff[i] = runs[i].exhausted_below(own[i], rem_d5[i])
        outs, rems, saved = [], [], []
        for i in range(len(own)):
            o_d5 = diag[i][0].to(dtype).reshape(q5[i].shape[:-1] + (v.shape[-1],))
            if runs[i].runs:
                o_off, S_off = runs[i].nearest(own[i], cutoff[i])
                o_i, rem_i = o_d5 + rem_d5[i][..., None] * o_off, rem_d5[i] * S_off.exp()
            else:
                o_off = S_off = None
                o_i, rem_i = o_d5, rem_d5[i]
            outs.append(o_i.reshape(qc[i].shape[:-1] + (v.shape[-1],)))
            rems.append(rem_i.reshape(qc[i].shape[:-1]))
            saved.append((o_off, S_off, rem_d5[i], rem_i))
        S_pair = {(i, b): S for (i, b), S in S_pair.items() if b >= cutoff[i]}
        ctx.save_for_backward(q, k, v)
        ctx.state = (scale, attend_current, layout, group, backend, block, S_pair, saved)
        o = torch.cat(outs, 2).to(q.dtype)
        return o, torch.cat(rems, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, drem):
        q, k, v = ctx.saved_tensors
        scale, attend_current, layout, group, backend, block, S_pair, saved = ctx.state
        loc = _Local(q, k, v, layout, group, backend)
        own, qc, kc, vc, q5, dtype = loc.own, loc.qc, loc.kc, loc.vc, loc.q5, loc.dtype
        do = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=dtype, device=q.device) if do is None else do
        drem = torch.zeros(q.shape[:-1], dtype=dtype, device=q.device) if drem is None else drem
        do5 = [x.to(dtype).reshape(q5[i].shape[:-1] + (v.shape[-1],)) for i, x in enumerate(do.chunk(len(own), 2))]
        drem5 = [x.to(dtype).reshape(q5[i].shape[:-1]) for i, x in enumerate(drem.chunk(len(own), 2))]

        # per query chunk: the gradients of the combined off-diagonal part, and each pair's weight exp(sum of the
        # nearer pairs' S)
        d_off, weight = [], {}
        for i, a in enumerate(own):
            o_off, S_off, rem_d, rem_i = saved[i]
            near = torch.zeros_like(rem_d)
            for b in range(a - 1, -1, -1):
                if (i, b) in S_pair:
                    weight[i, b] = near.exp()
                    near = near + S_pair[i, b]
            d_off.append(None if o_off is None else (rem_d[..., None] * do5[i], drem5[i] * rem_i))
        # first pass: dO_off . o_pair for every pair, then each pair's dS as a sum over the farther pairs
        g_pair = {}
        for i, b, k_b, v_b, _, _ in loc.pairs():
            if (i, b) in S_pair:
                g_pair[i, b] = (d_off[i][0] * loc.pair_forward(i, k_b, v_b, scale, block)[0]).sum(-1)
        dS_pair = {}
        for i, a in enumerate(own):
            farther = torch.zeros_like(drem5[i])
            for b in range(a):
                if (i, b) in S_pair:
                    dS_pair[i, b] = d_off[i][1] + farther
                    farther = farther + weight[i, b] * g_pair[i, b]
        # second pass: each pair's backward; the key chunks travel with their dk, dv accumulators
        dq5 = [torch.zeros_like(x) for x in q5]
        for i, b, k_b, v_b, acc, j in loc.pairs(loc.zero_accumulators()):
            if (i, b) not in S_pair:
                continue
            dq_p, dk_p, dv_p = loc.pair_backward(i, k_b, v_b, weight[i, b][..., None] * d_off[i][0],
                                                 dS_pair[i, b], scale, block)
            dq5[i] += dq_p
            acc[j] += dk_p
            acc[j + 1] += dv_p
        accumulators = loc.accumulators
        if loc.world > 1:  # one more hop: each chunk's accumulators come home
            accumulators = _ring(accumulators, group, loc.rank, loc.world)()
        dq, dk, dv = [], [], []
        for i in range(len(own)):
            o_off, S_off, rem_d, rem_i = saved[i]
            d_rem_d = drem5[i] if o_off is None else (do5[i] * o_off).sum(-1) + drem5[i] * S_off.exp()
            dq_d, dk_d, dv_d = _diagonal_backward(qc[i], kc[i], vc[i], do5[i], d_rem_d, scale, attend_current,
                                                  backend, dtype)
            dq.append(dq5[i].reshape(qc[i].shape) + dq_d)
            dk.append(accumulators[2 * i].squeeze(2) + dk_d)
            dv.append(accumulators[2 * i + 1].squeeze(2) + dv_d)
        return (torch.cat(dq, 2).to(q.dtype), torch.cat(dk, 2).to(k.dtype), torch.cat(dv, 2).to(v.dtype),
                None, None, None, None, None, None)


def _diagonal(q, k, v, scale, attend_current, backend, dtype):
    """A chunk against itself: the single-process op. On the torch backend 16-bit inputs go in as the compute
    dtype, so that o is rounded once, at the end; the Triton path keeps their dtype (its float32 path is IEEE
    products, many times slower)."""
    if choose_backend(backend, q) == "torch" and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return stick_breaking_attention(q, k, v, scale=scale, attend_current=attend_current, return_remainder=True,
                                    backend=backend)


def _diagonal_backward(q, k, v, do5, d_rem, scale, attend_current, backend, dtype):
    """Gradients of _diagonal for the gradients of its o (grouped like do5) and rem."""
    with torch.enable_grad():
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        o, rem = _diagonal(*x, scale, attend_current, backend, dtype)
        grads = torch.autograd.grad((o, rem), x, (do5.reshape(o.shape).to(o.dtype), d_rem.reshape(rem.shape).to(
            rem.dtype)))
    return [g.to(dtype) for g in grads]


def context_parallel_attention(q_loc, k_loc, v_loc, *, group=None, layout="zigzag", scale=None,
                               attend_current=False, return_remainder=False, backend="auto",
                               block=DEFAULT_BLOCK):
    """Causal stick-breaking attention of one sequence split over the ranks of ``group`` (every rank calls it).

    Args:
        q_loc, k_loc, v_loc: this rank's part (``shard_sequence``) of q (B, Hq, T, D), k (B, Hk, T, D) and
            v (B, Hk, T, Dv); the same shapes on every rank.
        group: the torch.distributed group (None: the default group); layout: "zigzag" or "contiguous".
        scale, attend_current, return_remainder, backend: as in ``stick_breaking_attention``; backend picks the
            path of each chunk against itself and against earlier chunks (Triton's segment kernels or tiled
            PyTorch).
        block: keys per tile of the chunk-against-chunk work in PyTorch.

    Returns:
        ``o_loc`` (B, Hq, T_local, Dv) in q's dtype, or ``(o_loc, rem_loc)``, the local part of the single-process
        op's result. Differentiable in q, k and v (also through rem), with a distributed backward.
    """
    _check_layout(layout)
    check_qkv(q_loc, k_loc, v_loc, ("q_loc", "k_loc", "v_loc"), True)
    check_options(scale, attend_current, return_remainder, backend)
    if backend == "triton":
        check_triton_inputs(q_loc)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    rank, world = _world(group)
    _check_same_shapes(q_loc, k_loc, v_loc, group, world)
    own, _ = _chunks(layout, rank, world)
    if q_loc.shape[2] % len(own) != 0:
        raise ValueError(f"layout='zigzag' holds two equal chunks per rank, so the local length must be even, got "
                         f"{q_loc.shape[2]}")
    scale = q_loc.shape[-1] ** -0.5 if scale is None else float(scale)
    o, rem = _ContextParallelAttention.apply(q_loc, k_loc, v_loc, scale, attend_current, layout, group, backend,
                                             block)
    return (o, rem) if return_remainder else o
