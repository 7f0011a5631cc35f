"""The building blocks of every check: the float64 oracle, the input regimes, the error measure and a
probe of the largest allocation. The course's checks (:mod:`sb_ref.testing.lessons`) are built on these.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..weights import stick_breaking_weights

REGIMES = ("random", "long", "saturated")


def oracle_attention(q, k, v, *, scale=None, attend_current=False, cu_seqlens=None):
    """Stick-breaking attention in float64 from the full (T, T) weight matrix of each sequence.

    Exact to float64 rounding for every regime; memory O(T^2), so for checking, not for use. Takes the same
    arguments as :func:`sb_ref.stick_breaking_attention` and returns ``(o, rem)`` in float64 on the CPU.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
        >>> o, rem = oracle_attention(q, k, v)
        >>> o.dtype, tuple(o.shape), tuple(rem.shape)
        (torch.float64, (1, 2, 5, 8), (1, 2, 5))
    """
    q, k, v = (x.detach().to("cpu", torch.float64) for x in (q, k, v))
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = D ** -0.5 if scale is None else float(scale)
    bounds = [0, T] if cu_seqlens is None else [int(b) for b in cu_seqlens]
    o = torch.zeros(B, Hq, T, v.shape[-1], dtype=torch.float64)
    rem = torch.ones(B, Hq, T, dtype=torch.float64)
    for s, e in zip(bounds[:-1], bounds[1:]):
        z = scale * q[:, :, s:e] @ k[:, :, s:e].transpose(-1, -2)
        A = stick_breaking_weights(z, attend_current=attend_current)
        o[:, :, s:e] = A @ v[:, :, s:e]
        seen = torch.ones(e - s, e - s, dtype=torch.bool).tril(0 if attend_current else -1)
        rem[:, :, s:e] = torch.nn.functional.logsigmoid(-z).masked_fill(~seen, 0.0).sum(-1).exp()
    return o, rem


def make_inputs(regime, *, B=1, Hq=2, Hk=None, T=64, D=32, Dv=None, dtype=torch.float32, device="cpu",
                seed=0, requires_grad=False):
    """Inputs ``(q, k, v)`` of one of the test regimes (for the default scale ``1/sqrt(D)``).

    - ``"random"``: q, k, v ~ N(0, 1); logits have unit spread, sticks run out within tens of keys.
    - ``"long"``: logits near -8 (beta ~ 3e-4), so a query's stick lasts for thousands of keys.
    - ``"saturated"``: logits of magnitude up to ~50, where sigmoid rounds to 0 or 1.

    Shapes: q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv); Hk defaults to Hq and Dv to D.

    Example:
        >>> q, k, v = make_inputs("long", T=16, D=16)
        >>> z = (q @ k.transpose(-1, -2)) / 4
        >>> bool(-9 < z.mean() < -7)
        True
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    Hk = Hq if Hk is None else Hk
    Dv = D if Dv is None else Dv
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hk, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hk, T, Dv, generator=gen, dtype=torch.float64)
    q, k = shape_regime(regime, q, k)
    return tuple(x.to(device=device, dtype=dtype).requires_grad_(requires_grad) for x in (q, k, v))


def shape_regime(regime, q, k):
    """``(q, k)`` of the regime, from N(0, 1) ones (see :func:`make_inputs`)."""
    if regime == "long":  # q.k = -c^2 + small: logit = scale * q.k ~ -8
        c = (8.0 * q.shape[-1] ** 0.5) ** 0.5
        q, k = 0.3 * q, 0.3 * k
        q[..., 0] += c
        k[..., 0] -= c
    elif regime == "saturated":
        q = 12.0 * q
    return q, k


def rel_err(x, reference):
    """Relative Frobenius error ``|x - ref| / |ref|``, computed in float64 (0 when both are empty or zero)."""
    x, reference = x.detach().to("cpu", torch.float64), reference.detach().to("cpu", torch.float64)
    denom = reference.norm()
    diff = (x - reference).norm()
    if denom == 0:
        return float(diff)
    return float(diff / denom)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor storage (in elements) that any PyTorch op allocates while active.

    Views share their base's storage and are not counted again. Used to show that nothing of size T*T
    is ever allocated.

    Example:
        >>> import torch
        >>> with LargestAllocation() as probe:
        ...     _ = torch.ones(8, 8) @ torch.ones(8, 2)
        >>> probe.numel, probe.shape
        (64, (8, 8))
    """

    def __init__(self):
        super().__init__()
        self.numel, self.shape, self.op = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
                if n > self.numel:
                    self.numel, self.shape, self.op = n, tuple(t.shape), str(func)
        return out
