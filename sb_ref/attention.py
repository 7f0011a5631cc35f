"""The public op: ``stick_breaking_attention``, its input checks, and the choice of backend."""
import math
import numbers
import os

import torch

from .blocked import DEFAULT_BLOCK, StickBreakingFunction

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensor(name, x, shape_doc):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {shape_doc}, got shape {tuple(x.shape)}")


def _check_cu_seqlens(cu_seqlens, q):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32 or int64, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must hold int32 or int64 sequence boundaries, got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device ({q.device}), got {cu_seqlens.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor (N+1,) of boundaries 0 = cu[0] <= ... <= cu[N] = T "
                         f"with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences along T, so the batch size must be 1, got {q.shape[0]}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    T = q.shape[2]
    if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T} without decreasing, got {bounds}")
    return bounds


def _check_options(scale, attend_current, return_remainder, backend):
    """The keyword options shared by the op and decoding."""
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(attend_current, bool):
        raise TypeError(f"attend_current must be a bool, got {type(attend_current).__name__}")
    if not isinstance(return_remainder, bool):
        raise TypeError(f"return_remainder must be a bool, got {type(return_remainder).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_triton_inputs(q):
    """What backend='triton' needs of the inputs: a dtype the kernels take, and CUDA or Triton's interpreter."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                        "use backend='torch' (or 'auto') for float64")
    if q.device.type != "cuda" and not _triton_interpreter_on():
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {q.device}. To run the "
                         "kernels on the CPU through Triton's interpreter, set the environment variable "
                         "TRITON_INTERPRET=1 before importing sb_ref (e.g. `TRITON_INTERPRET=1 python ...`), "
                         "or use backend='torch'")


def _validate(q, k, v, scale, attend_current, cu_seqlens, return_remainder, backend):
    _check_tensor("q", q, "(B, Hq, T, D)")
    _check_tensor("k", k, "(B, Hk, T, D)")
    _check_tensor("v", v, "(B, Hk, T, Dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    (B, Hq, T, D), (Bk, Hk, Tk, Dk), (Bv, Hv, Tv, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"q, k and v must share the batch size B, got {B}, {Bk} and {Bv}")
    if not (T == Tk == Tv):
        raise ValueError(f"q, k and v must share the sequence length T, got {T}, {Tk} and {Tv}")
    if D != Dk:
        raise ValueError(f"q and k must share the head dim D, got {D} and {Dk}")
    if D == 0 or Dv == 0:
        raise ValueError(f"head dims must be positive, got D = {D} and Dv = {Dv}")
    if Hk != Hv:
        raise ValueError(f"k and v must have the same number of heads Hk, got {Hk} and {Hv}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"the query heads Hq must be a multiple of the key/value heads Hk (grouped-query "
                         f"attention), got Hq = {Hq} and Hk = {Hk}")
    _check_options(scale, attend_current, return_remainder, backend)
    bounds = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, q)
    if backend == "triton":
        _check_triton_inputs(q)
    return bounds


def _triton_op():
    try:
        from .kernels import stick_breaking_attention_triton
    except ImportError as exc:
        raise ImportError(f"the Triton backend needs the triton package, which could not be imported ({exc}). "
                          "Install it (pip install 'triton>=3.2', Linux) or use backend='torch'.") from exc
    return stick_breaking_attention_triton


def _choose_backend(backend, q):
    if backend != "auto":
        return backend
    return "triton" if q.device.type == "cuda" and q.dtype in TRITON_DTYPES else "torch"


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
    bounds = _validate(q, k, v, scale, attend_current, cu_seqlens, return_remainder, backend)
    B, Hq, T, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    rem_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if T == 0:
        # empty, but still attached to the inputs so that backward() gives (empty) gradients
        o = q.new_zeros(B, Hq, 0, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
        rem = torch.zeros(B, Hq, 0, dtype=rem_dtype, device=q.device)
    elif _choose_backend(backend, q) == "triton":
        max_seqlen = T if bounds is None else max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        o, rem = _triton_op()(q, k, v, scale, attend_current, cu_seqlens, max_seqlen)
    else:
        o, rem = StickBreakingFunction.apply(q, k, v, scale, attend_current, bounds, DEFAULT_BLOCK)
    return (o, rem) if return_remainder else o
