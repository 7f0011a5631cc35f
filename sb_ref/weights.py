"""The stick-breaking weight matrix in log space: stable for any logits, differentiable, for teaching and checks.

Products of many ``1 - beta`` underflow, and ``log(1 - sigmoid(z))`` computed naively is ``log(0)`` once
``sigmoid(z)`` rounds to 1. In log space both problems disappear::

    log beta       = logsigmoid(z)  = -softplus(-z)
    log (1 - beta) = logsigmoid(-z) = -softplus(z)
    log A[i, j]    = log beta[i, j] + sum_{j < k < i} log(1 - beta[i, k])

The sum is a reverse, exclusive cumulative sum along the keys.
"""
import torch
import torch.nn.functional as F


def visible_mask(n_queries, n_keys, attend_current, query_offset=0, key_offset=0, device=None):
    """Boolean (n_queries, n_keys): True where query ``query_offset + i`` sees key ``key_offset + j``."""
    i = torch.arange(n_queries, device=device)[:, None] + query_offset
    j = torch.arange(n_keys, device=device)[None, :] + key_offset
    return j <= i if attend_current else j < i


def reverse_exclusive_cumsum(x):
    """``out[..., j] = sum_{k > j} x[..., k]`` along the last dimension."""
    inclusive = x.flip(-1).cumsum(-1).flip(-1)
    return F.pad(inclusive[..., 1:], (0, 1))


def stick_breaking_weights(logits, *, attend_current=False):
    """Stick-breaking weights ``A`` of a matrix of logits, computed stably in log space.

    Args:
        logits: tensor (..., T, T); ``logits[..., i, j]`` is query i's logit for key j.
        attend_current: if True, query i also sees key i (the diagonal).

    Returns:
        Tensor (..., T, T) in the logits' dtype (computed in float32 for half-precision inputs). Rows sum to
        at most 1; entries above the diagonal (and on it, unless ``attend_current``) are 0. Differentiable.

    Example:
        >>> import torch, sb_ref
        >>> sb_ref.stick_breaking_weights(torch.zeros(3, 3))
        tensor([[0.0000, 0.0000, 0.0000],
                [0.5000, 0.0000, 0.0000],
                [0.2500, 0.5000, 0.0000]])
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"logits must have shape (..., T, T), got {tuple(logits.shape)}")
    if not isinstance(attend_current, bool):
        raise TypeError(f"attend_current must be a bool, got {type(attend_current).__name__}")
    z = logits if logits.dtype == torch.float64 else logits.float()
    T = z.shape[-1]
    visible = visible_mask(T, T, attend_current, device=z.device)
    log_keep = F.logsigmoid(-z).masked_fill(~visible, 0.0)  # log(1 - beta), 0 where not visible
    log_A = F.logsigmoid(z) + reverse_exclusive_cumsum(log_keep)
    return log_A.exp().masked_fill(~visible, 0.0).to(logits.dtype)
