"""The public op: ``stick_breaking_attention`` (its inputs are checked in :mod:`sb_ref.validation`)."""
import torch

from .blocked import DEFAULT_BLOCK, StickBreakingFunction
from .validation import choose_backend, triton_kernels, validate_attention


def stick_breaking_attention(q, k, v, *, scale=None, attend_current=False, cu_seqlens=None,
                             return_remainder=False, backend="auto"):
    """Causal stick-breaking attention.

    Query i walks back through keys j < i (j <= i with ``attend_current``), nearest first; key j takes the share
    ``beta_ij = sigmoid(scale * q_i . k_j)`` of the stick that nearer keys left::

        A_ij = beta_ij * prod_{j < k < i} (1 - beta_ik),   o_i = sum_j A_ij v_j,   rem_i = prod_j (1 - beta_ij)

    Args:
        q: (B, Hq, T, D) queries. k: (B, Hk, T, D) keys. v: (B, Hk, T, Dv) values. ``Hq`` must be a multiple of
            ``Hk`` (grouped-query attention: query head h uses key/value head ``h // (Hq // Hk)``). One dtype
            (float16, bfloat16, float32 or float64) and one device for all three.
        scale: logit scale, default ``1 / sqrt(D)``.
        attend_current: if True, query i also sees key i.
        cu_seqlens: for a packed batch of variable-length sequences: B must be 1 and ``cu_seqlens`` an int32/int64
            tensor (N+1,) of boundaries ``0 = cu[0] <= ... <= cu[N] = T``; no attention crosses a boundary.
        return_remainder: also return ``rem`` (B, Hq, T), float32 (float64 for float64 inputs).
        backend: "auto" (Triton on CUDA for 16/32-bit floats, PyTorch otherwise), "triton" or "torch".

    Returns:
        ``o`` (B, Hq, T, Dv) in q's dtype, or ``(o, rem)``. Differentiable in q, k and v (also through rem).

    Example:
        >>> import torch, sb_ref
        >>> q, k, v = torch.randn(3, 2, 4, 8, 16).unbind(0)
        >>> o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True)
        >>> o.shape, rem.shape
        (torch.Size([2, 4, 8, 16]), torch.Size([2, 4, 8]))
    """
    bounds = validate_attention(q, k, v, scale, attend_current, cu_seqlens, return_remainder, backend)
    B, Hq, T, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    rem_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if T == 0:
        # empty, but still attached to the inputs so that backward() gives (empty) gradients
        o = q.new_zeros(B, Hq, 0, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
        rem = torch.zeros(B, Hq, 0, dtype=rem_dtype, device=q.device)
    elif choose_backend(backend, q) == "triton":
        max_seqlen = T if bounds is None else max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        attention_triton, _ = triton_kernels()
        o, rem = attention_triton(q, k, v, scale, attend_current, cu_seqlens, max_seqlen)
    else:
        o, rem = StickBreakingFunction.apply(q, k, v, scale, attend_current, bounds, DEFAULT_BLOCK)
    return (o, rem) if return_remainder else o
