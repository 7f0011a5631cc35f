"""Stick-breaking attention in PyTorch, tiled the way the GPU kernel is: the ``torch`` backend.

The sequence is cut into blocks of ``block`` positions. Query block ``b`` walks key blocks ``b, b-1, ..., 0``
(from the diagonal back toward position 0), carrying per query row the sum ``S`` of ``log(1 - beta)`` over the
keys already visited, so that inside a tile::

    log A[i, j] = log beta[i, j] + S[i] + sum_{k in tile, k > j} log(1 - beta[i, k])

Step ``s`` handles the tiles ``(b, b - s)`` of every query block at once, so the Python loop runs once per
block distance and every tensor holds at most ``T * block`` scores per head: memory is O(T * block), never
O(T^2). The backward pass recomputes the same tiles instead of storing them. Gradients (notation of
``kernels/README.md``)::

    dl[i, j] = A[i, j] * (dO[i] . v[j])                 the gradient of the loss with respect to log A[i, j]
    dz[i, k] = dl[i, k] (1 - beta[i, k]) - beta[i, k] (C[i, k] + dRem[i] rem[i]),   C[i, k] = sum_{j < k} dl[i, j]

``C`` sums over keys farther than ``k``, while the walk goes nearest first, so it is taken as
``delta[i] - R[i, k]`` with ``R`` the running sum of ``dl`` over keys at or nearer than ``k`` and
``delta[i] = sum_j dl[i, j]``. ``delta`` could be had as ``dO[i] . o[i]``, but rounded differently from ``R``
it leaves a small constant error in ``C`` for every far key, which ``dq`` sums over thousands of keys. So a
first walk accumulates ``delta`` exactly as the second accumulates ``R``: where the far keys contribute
nothing (a used-up stick), ``C`` is exactly zero. Everything runs in float32 (float64 for float64 inputs);
gradients never accumulate in half precision.
"""
import torch
import torch.nn.functional as F

from .weights import reverse_exclusive_cumsum, visible_mask

DEFAULT_BLOCK = 64


def _tiles(x, block):
    """(..., T, D) -> (..., n_blocks, block, D), zero-padded at the end."""
    pad = -x.shape[-2] % block
    return F.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, block))


def _scores(q_tiles, k_tiles, carry, s, scale, attend_current):
    """Log-space quantities of the tiles (b, b - s) for every query block b >= s."""
    block = q_tiles.shape[-2]
    z = scale * q_tiles[..., s:, :, :] @ k_tiles[..., : k_tiles.shape[-3] - s, :, :].transpose(-1, -2)
    log_keep = F.logsigmoid(-z)  # log(1 - beta)
    visible = None
    if s == 0:  # only diagonal tiles are cut by causality
        visible = visible_mask(block, block, attend_current, device=z.device)
        log_keep = log_keep.masked_fill(~visible, 0.0)
    log_A = F.logsigmoid(z) + carry[..., s:, :, None] + reverse_exclusive_cumsum(log_keep)
    A = log_A.exp()
    if visible is not None:
        A = A.masked_fill(~visible, 0.0)
    return z, log_keep, A, visible


def _forward(q, k, v, scale, attend_current, block):
    """q (B, Hk, G, T, D), k (B, Hk, 1, T, D), v (B, Hk, 1, T, Dv) -> o (B, Hk, G, T, Dv), log_rem (B, Hk, G, T)."""
    T = q.shape[-2]
    q_t, k_t, v_t = (_tiles(x, block) for x in (q, k, v))
    n = q_t.shape[-3]
    o = q.new_zeros(*q_t.shape[:-1], v.shape[-1])
    carry = q.new_zeros(q_t.shape[:-1])  # sum of log(1 - beta) over the keys visited so far
    for s in range(n):
        _, log_keep, A, _ = _scores(q_t, k_t, carry, s, scale, attend_current)
        o[..., s:, :, :] += A @ v_t[..., : n - s, :, :]
        carry[..., s:, :] += log_keep.sum(-1)
    return o.flatten(-3, -2)[..., :T, :], carry.flatten(-2)[..., :T]


def _log_weight_grads(q_t, k_t, v_t, do_t, carry, s, scale, attend_current):
    """Step s of a backward walk: the tiles' scores, dl = A * (dO . v) and its sums over the keys at or nearer
    than each key of the tile (``[..., 0]`` is the tile's row sum, so both walks add the very same numbers)."""
    z, log_keep, A, visible = _scores(q_t, k_t, carry, s, scale, attend_current)
    dl = A * (do_t[..., s:, :, :] @ v_t[..., : v_t.shape[-3] - s, :, :].transpose(-1, -2))
    return z, log_keep, A, visible, dl, dl.flip(-1).cumsum(-1).flip(-1)


def _backward(q, k, v, log_rem, do, drem, scale, attend_current, block):
    """Gradients of the tiled forward; shapes as in _forward, do like its o, drem like log_rem."""
    T = q.shape[-2]
    q_t, k_t, v_t, do_t = (_tiles(x, block) for x in (q, k, v, do))
    g = _tiles((drem * log_rem.exp()).unsqueeze(-1), block)[..., 0]
    n = q_t.shape[-3]
    carry = q.new_zeros(q_t.shape[:-1])
    delta = q.new_zeros(q_t.shape[:-1])
    for s in range(n):  # first walk: delta = sum of dl, accumulated as the second walk accumulates R
        _, log_keep, _, _, _, suffix = _log_weight_grads(q_t, k_t, v_t, do_t, carry, s, scale, attend_current)
        carry[..., s:, :] += log_keep.sum(-1)
        delta[..., s:, :] += suffix[..., 0]
    dq, dk, dv = torch.zeros_like(q_t), torch.zeros_like(k_t), torch.zeros_like(v_t)
    carry = q.new_zeros(q_t.shape[:-1])
    nearer = q.new_zeros(q_t.shape[:-1])  # R: sum of dl over the keys visited so far
    for s in range(n):
        z, log_keep, A, visible, dl, suffix = _log_weight_grads(
            q_t, k_t, v_t, do_t, carry, s, scale, attend_current)
        k_s, do_s, q_s = k_t[..., : n - s, :, :], do_t[..., s:, :, :], q_t[..., s:, :, :]
        farther = delta[..., s:, :, None] - (nearer[..., s:, :, None] + suffix)
        beta = torch.sigmoid(z)
        dz = dl * torch.sigmoid(-z) - beta * (farther + g[..., s:, :, None])
        if visible is not None:
            dz = dz.masked_fill(~visible, 0.0)
        dq[..., s:, :, :] += scale * (dz @ k_s)
        dk[..., : n - s, :, :] += scale * (dz.transpose(-1, -2) @ q_s).sum(2, keepdim=True)
        dv[..., : n - s, :, :] += (A.transpose(-1, -2) @ do_s).sum(2, keepdim=True)
        carry[..., s:, :] += log_keep.sum(-1)
        nearer[..., s:, :] += suffix[..., 0]
    return tuple(x.flatten(-3, -2)[..., :T, :] for x in (dq, dk, dv))


def _key_tiles(k, v, block):
    """Key tiles of a segment, nearest (last) first: [(k tile, v tile)], each (..., <= block, *)."""
    T = k.shape[-2]
    return [(k[..., a:min(a + block, T), :], v[..., a:min(a + block, T), :])
            for a in range(((T - 1) // block) * block, -1, -block)]


def segment_forward(q, k, v, scale, block=DEFAULT_BLOCK):
    """Queries against a whole earlier segment of keys (every key visible, none nearer than the segment): (o, S)
    with ``S = sum over the segment of log(1 - beta)``, the log of what the segment leaves of each stick. Shapes
    as in _forward; memory O(Tq * block). Two segments combine as ``o = o_near + exp(S_near) o_far``."""
    o = q.new_zeros(*q.shape[:-1], v.shape[-1])
    carry = q.new_zeros(q.shape[:-1])
    for k_t, v_t in _key_tiles(k, v, block):
        z = scale * q @ k_t.transpose(-1, -2)
        log_keep = F.logsigmoid(-z)
        o = o + (F.logsigmoid(z) + carry[..., None] + reverse_exclusive_cumsum(log_keep)).exp() @ v_t
        carry = carry + log_keep.sum(-1)
    return o, carry


def segment_backward(q, k, v, do, dS, scale, block=DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of segment_forward for the gradients do of o and dS of S (the tiled backward's
    formulas with every key visible and ``g = dS``)."""
    tiles = _key_tiles(k, v, block)

    def walk():
        carry = q.new_zeros(q.shape[:-1])
        for k_t, v_t in tiles:
            z = scale * q @ k_t.transpose(-1, -2)
            log_keep = F.logsigmoid(-z)
            A = (F.logsigmoid(z) + carry[..., None] + reverse_exclusive_cumsum(log_keep)).exp()
            dl = A * (do @ v_t.transpose(-1, -2))
            yield k_t, v_t, z, A, dl, dl.flip(-1).cumsum(-1).flip(-1)
            carry = carry + log_keep.sum(-1)

    delta = q.new_zeros(q.shape[:-1])
    for *_, suffix in walk():  # first walk: delta = sum of dl, accumulated as the second accumulates R
        delta = delta + suffix[..., 0]
    dq, dk, dv = torch.zeros_like(q), [], []
    nearer = q.new_zeros(q.shape[:-1])
    for k_t, v_t, z, A, dl, suffix in walk():
        farther = delta[..., None] - (nearer[..., None] + suffix)
        dz = dl * torch.sigmoid(-z) - torch.sigmoid(z) * (farther + dS[..., None])
        dq = dq + scale * (dz @ k_t)
        dk.append(scale * (dz.transpose(-1, -2) @ q).sum(2, keepdim=True))
        dv.append((A.transpose(-1, -2) @ do).sum(2, keepdim=True))
        nearer = nearer + suffix[..., 0]
    return dq, torch.cat(dk[::-1], -2), torch.cat(dv[::-1], -2)


def _grouped(q, k, v, compute_dtype):
    """(B, Hq, T, D) queries -> (B, Hk, G, T, D); k, v -> (B, Hk, 1, T, *): GQA by broadcasting, no copies."""
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    return (q.to(compute_dtype).reshape(B, Hk, Hq // Hk, T, D),
            k.to(compute_dtype).unsqueeze(2), v.to(compute_dtype).unsqueeze(2))


def _segments(T, bounds):
    """(start, end) of each sequence: the whole length, or the packed sequences of cu_seqlens."""
    if bounds is None:
        return [(0, T)] if T > 0 else []
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


class StickBreakingFunction(torch.autograd.Function):
    """Differentiable tiled stick-breaking attention; ``apply(q, k, v, scale, attend_current, bounds, block)``.

    ``bounds`` is None or the list of packed sequence boundaries (cu_seqlens as Python ints). Returns
    ``(o, rem)``: o (B, Hq, T, Dv) in q's dtype, rem (B, Hq, T) in float32 (float64 for float64 inputs).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, attend_current, bounds, block):
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, Hq, T, _ = q.shape
        q5, k5, v5 = _grouped(q, k, v, compute_dtype)
        o = q5.new_zeros(*q5.shape[:-1], v.shape[-1])
        log_rem = q5.new_zeros(q5.shape[:-1])
        for s, e in _segments(T, bounds):
            o[..., s:e, :], log_rem[..., s:e] = _forward(
                q5[..., s:e, :], k5[..., s:e, :], v5[..., s:e, :], scale, attend_current, block)
        ctx.save_for_backward(q, k, v, log_rem)
        ctx.config = (scale, attend_current, bounds, block)
        return o.reshape(B, Hq, T, -1).to(q.dtype), log_rem.exp().reshape(B, Hq, T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, drem):
        q, k, v, log_rem = ctx.saved_tensors
        scale, attend_current, bounds, block = ctx.config
        q5, k5, v5 = _grouped(q, k, v, log_rem.dtype)
        o_shape = (*q5.shape[:-1], v.shape[-1])
        do = q5.new_zeros(o_shape) if do is None else do.to(q5.dtype).reshape(o_shape)
        drem = torch.zeros_like(log_rem) if drem is None else drem.to(q5.dtype).reshape(log_rem.shape)
        dq, dk, dv = torch.zeros_like(q5), torch.zeros_like(k5), torch.zeros_like(v5)
        for s, e in _segments(q.shape[2], bounds):
            part = slice(s, e)
            dq[..., part, :], dk[..., part, :], dv[..., part, :] = _backward(
                q5[..., part, :], k5[..., part, :], v5[..., part, :], log_rem[..., part],
                do[..., part, :], drem[..., part], scale, attend_current, block)
        return (dq.reshape(q.shape).to(q.dtype), dk.squeeze(2).to(k.dtype), dv.squeeze(2).to(v.dtype),
                None, None, None, None)
