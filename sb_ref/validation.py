"""Input checks shared by the op and decoding: tensors, shapes and grouped-query heads, options, the choice of
backend, and loading the Triton kernels. Every check raises a TypeError or ValueError that names the argument and
what was expected, before any kernel launch."""
import math
import numbers
import os

import torch

BACKENDS = ("auto", "triton", "torch")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name, x, shape_doc):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions {shape_doc}, got shape {tuple(x.shape)}")


def check_qkv(q, k, v, names, lengths_match):
    """q (B, Hq, T, D), k (B, Hk, Tk, D), v (B, Hk, Tk, Dv) with Hq % Hk == 0, one dtype and one device; names are
    the arguments' names (the op's q, k, v or decoding's q, k_cache, v_cache); lengths_match: whether q's length
    must equal k's (the op) or only k's and v's (a cache)."""
    nq, nk, nv = names
    t = "T" if lengths_match else "Tmax"
    check_tensor(nq, q, "(B, Hq, T, D)" if lengths_match else "(B, Hq, Tn, D)")
    check_tensor(nk, k, f"(B, Hk, {t}, D)")
    check_tensor(nv, v, f"(B, Hk, {t}, Dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk} and {nv} must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk} and {nv} must be on one device, got {q.device}, {k.device} and {v.device}")
    (B, Hq, T, D), (Bk, Hk, Tk, Dk), (Bv, Hv, Tv, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"{nq}, {nk} and {nv} must share the batch size B, got {B}, {Bk} and {Bv}")
    if lengths_match and not (T == Tk == Tv):
        raise ValueError(f"{nq}, {nk} and {nv} must share the sequence length T, got {T}, {Tk} and {Tv}")
    if not lengths_match and Tk != Tv:
        raise ValueError(f"{nk} and {nv} must share the cache length Tmax, got {Tk} and {Tv}")
    if D != Dk:
        raise ValueError(f"{nq} and {nk} must share the head dim D, got {D} and {Dk}")
    if D == 0 or Dv == 0:
        raise ValueError(f"head dims must be positive, got D = {D} and Dv = {Dv}")
    if Hk != Hv:
        raise ValueError(f"{nk} and {nv} must have the same number of heads Hk, got {Hk} and {Hv}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"the query heads Hq must be a multiple of the key/value heads Hk (grouped-query "
                         f"attention), got Hq = {Hq} and Hk = {Hk}")


def check_cu_seqlens(cu_seqlens, q):
    """The boundaries of a packed batch, as a list of ints (one read from the device)."""
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


def check_cache_seqlens(cache_seqlens, q, T_max):
    """The valid lengths of a cache; returns the largest (one read from the device)."""
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError("cache_seqlens must be a torch.Tensor of int32 or int64 (B,), got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must hold int32 or int64 lengths, got {cache_seqlens.dtype}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on q's device ({q.device}), got {cache_seqlens.device}")
    B, Tn = q.shape[0], q.shape[2]
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")
    if B == 0:
        return 0
    lo, hi = (int(x) for x in torch.stack([cache_seqlens.min(), cache_seqlens.max()]).tolist())  # one sync
    if lo < Tn or hi > T_max:
        raise ValueError(f"cache_seqlens must lie in [Tn, Tmax] = [{Tn}, {T_max}] (each length counts the Tn new "
                         f"tokens, already in the cache), got values from {lo} to {hi}")
    return hi


def check_options(scale, attend_current, return_remainder, backend):
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
    check_backend(backend)


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_triton_inputs(q):
    """What backend='triton' needs of the inputs: a dtype the kernels take, and CUDA or Triton's interpreter."""
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                        "use backend='torch' (or 'auto') for float64")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {q.device}. To run the "
                         "kernels on the CPU through Triton's interpreter, set the environment variable "
                         "TRITON_INTERPRET=1 before importing sb_ref (e.g. `TRITON_INTERPRET=1 python ...`), "
                         "or use backend='torch'")


def validate_attention(q, k, v, scale, attend_current, cu_seqlens, return_remainder, backend):
    """The op's inputs; returns cu_seqlens' boundaries as a list (None without)."""
    check_qkv(q, k, v, ("q", "k", "v"), lengths_match=True)
    check_options(scale, attend_current, return_remainder, backend)
    bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q)
    if backend == "triton":
        check_triton_inputs(q)
    return bounds


def validate_decode(q, k_cache, v_cache, cache_seqlens, scale, attend_current, return_remainder, backend):
    """Decoding's inputs; returns the longest valid cache."""
    check_qkv(q, k_cache, v_cache, ("q", "k_cache", "v_cache"), lengths_match=False)
    if q.shape[2] > k_cache.shape[2]:
        raise ValueError(f"q holds more new tokens than the cache has room for: Tn = {q.shape[2]} > "
                         f"Tmax = {k_cache.shape[2]}")
    check_options(scale, attend_current, return_remainder, backend)
    max_len = check_cache_seqlens(cache_seqlens, q, k_cache.shape[2])
    if backend == "triton":
        check_triton_inputs(q)
    return max_len


def choose_backend(backend, q):
    """"auto" is Triton for 16/32-bit floats on CUDA and PyTorch otherwise."""
    if backend != "auto":
        return backend
    return "triton" if q.device.type == "cuda" and q.dtype in TRITON_DTYPES else "torch"


def triton_kernels():
    """(stick_breaking_attention_triton, stick_breaking_decode_triton) from sb_ref.kernels, or an ImportError that
    says how to do without."""
    try:
        from .kernels import stick_breaking_attention_triton, stick_breaking_decode_triton
    except ImportError as exc:
        raise ImportError(f"the Triton backend needs the triton package, which could not be imported ({exc}). "
                          "Install it (pip install 'triton>=3.2', Linux) or use backend='torch'.") from exc
    return stick_breaking_attention_triton, stick_breaking_decode_triton
