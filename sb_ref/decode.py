"""Decoding: ``stick_breaking_decode``, a few new queries against a key/value cache (generation), and its PyTorch
path (its inputs are checked in :mod:`sb_ref.validation`)."""
import torch
import torch.nn.functional as F

from .validation import choose_backend, triton_kernels, validate_decode
from .weights import reverse_exclusive_cumsum


def _decode_torch(q, k_cache, v_cache, cache_seqlens, scale, attend_current, max_len):
    """The exact log-space computation for the Tn query rows only: memory O(Tn * L) per head, float32 (float64
    for float64 inputs); the q-heads of a GQA group share their kv-head's keys through a reshape, no copies."""
    B, Hq, Tn, D = q.shape
    Hk, Dv = k_cache.shape[1], v_cache.shape[-1]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k_cache[:, :, :max_len].to(work)
    v = v_cache[:, :, :max_len].to(work)
    # rows (q-head of the group, token) per kv-head
    z = scale * (q.to(work).reshape(B, Hk, (Hq // Hk) * Tn, D) @ k.transpose(-1, -2))  # (B, Hk, G*Tn, L)
    lens = cache_seqlens.to(torch.int64)
    t = torch.arange(Tn, device=q.device).repeat(Hq // Hk)  # token of each row
    lim = (lens[:, None] - Tn + t[None, :] + int(attend_current))[:, None, :, None]  # (B, 1, G*Tn, 1)
    visible = torch.arange(max_len, device=q.device) < lim
    # the cache past a sequence's length may hold anything (NaN): neither its logits nor its values may reach o
    log_keep = F.logsigmoid(-z).masked_fill(~visible, 0.0)
    A = (F.logsigmoid(z) + reverse_exclusive_cumsum(log_keep)).exp().masked_fill(~visible, 0.0)
    valid = (torch.arange(max_len, device=q.device) < lens[:, None])[:, None, :, None]
    o = A @ v.masked_fill(~valid, 0.0)
    rem = log_keep.sum(-1).exp()
    return o.reshape(B, Hq, Tn, Dv).to(q.dtype), rem.reshape(B, Hq, Tn)


def stick_breaking_decode(q, k_cache, v_cache, cache_seqlens, *, scale=None, attend_current=True,
                          return_remainder=False, backend="auto"):
    """Stick-breaking attention of a few new tokens against a key/value cache (generation).

    Sequence b's cache holds ``cache_seqlens[b]`` valid positions, *including* the keys and values of the Tn new
    tokens (written by the caller), so new query t sits at position ``p = cache_seqlens[b] - Tn + t``. It sees the
    keys before p (and at p with ``attend_current``, the default here: a generated token's own key is in the
    cache), never a later one: the result is that of :func:`sb_ref.stick_breaking_attention` on the valid cache,
    last Tn rows. Cache positions from ``cache_seqlens[b]`` on are never used (they may hold anything, NaN too).

    Args:
        q: (B, Hq, Tn, D) queries of the new tokens, Tn >= 1 (1 token by token, a few for chunked or speculative
            steps). k_cache: (B, Hk, Tmax, D), v_cache: (B, Hk, Tmax, Dv); ``Hq % Hk == 0`` (grouped-query
            attention; the cache is never repeated per q-head). One dtype (float16, bfloat16, float32, float64)
            and one device for all three.
        cache_seqlens: (B,) int32/int64 tensor on q's device, ``Tn <= cache_seqlens[b] <= Tmax``.
        scale: logit scale, default ``1 / sqrt(D)``.
        attend_current: if True (default), a new token also sees its own key.
        return_remainder: also return ``rem`` (B, Hq, Tn), float32 (float64 for float64 inputs).
        backend: "auto" (Triton's split-K decode kernel on CUDA for 16/32-bit floats, PyTorch otherwise),
            "triton" (on CPU tensors only under ``TRITON_INTERPRET=1``) or "torch".

    Returns:
        ``o`` (B, Hq, Tn, Dv) in q's dtype, or ``(o, rem)``. Inference only: it runs under ``torch.no_grad()``
        and no gradient flows to q or the cache.

    Example:
        >>> import torch, sb_ref
        >>> k_cache, v_cache = torch.randn(2, 2, 2, 32, 16).unbind(0)   # B = 2, Hk = 2, Tmax = 32
        >>> q = torch.randn(2, 4, 1, 16)                                 # one new token, Hq = 4
        >>> o, rem = sb_ref.stick_breaking_decode(q, k_cache, v_cache, torch.tensor([7, 20]),
        ...                                       return_remainder=True)
        >>> o.shape, rem.shape
        (torch.Size([2, 4, 1, 16]), torch.Size([2, 4, 1]))
    """
    max_len = validate_decode(q, k_cache, v_cache, cache_seqlens, scale, attend_current, return_remainder, backend)
    B, Hq, Tn, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    rem_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        if Tn == 0 or B == 0:
            o = q.new_zeros(B, Hq, Tn, v_cache.shape[-1])
            rem = torch.ones(B, Hq, Tn, dtype=rem_dtype, device=q.device)
        elif choose_backend(backend, q) == "triton":
            _, decode_triton = triton_kernels()
            o, rem = decode_triton(q, k_cache, v_cache, cache_seqlens, scale, attend_current, max_seqlen=max_len)
        else:
            o, rem = _decode_torch(q, k_cache, v_cache, cache_seqlens, scale, attend_current, max_len)
    return (o, rem) if return_remainder else o
