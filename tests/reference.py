"""An independent float64 definition of stick-breaking attention, written for the tests only.

It shares no code with ``sb_ref``: brute-force loops for small problems, and the vectorised log-space form
(one T x T matrix per head) for larger ones. Every accuracy test compares against one of these.
"""
import math

import torch


def weights_loops(logits, attend_current=False):
    """A[i, j] = beta_ij * prod_{j<k<i} (1 - beta_ik), by walking back from each query; float64, (T, T)."""
    z = logits.double()
    T = z.shape[-1]
    A = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        stick = 1.0
        last = i if attend_current else i - 1
        for j in range(last, -1, -1):
            beta = 1.0 / (1.0 + math.exp(-float(z[i, j])))
            A[i, j] = stick * beta
            stick *= 1.0 - beta
    return A


def weights_logspace(logits, attend_current=False):
    """The same weights for any leading batch shape, in log space: log A = log beta + reverse exclusive cumsum."""
    z = logits.double()
    T = z.shape[-1]
    offset = 0 if attend_current else -1
    visible = torch.ones(T, T, dtype=torch.bool).tril(offset)
    log_beta = torch.nn.functional.logsigmoid(z)
    log_one_minus = torch.nn.functional.logsigmoid(-z).masked_fill(~visible, 0.0)
    # sum over k > j of log(1 - beta_ik): the stick the nearer keys leave for key j
    after = log_one_minus.flip(-1).cumsum(-1).flip(-1) - log_one_minus
    return torch.exp(log_beta + after).masked_fill(~visible, 0.0)


def attention(q, k, v, scale=None, attend_current=False, cu_seqlens=None):
    """Returns (o, rem) in float64. q (B, Hq, T, D), k (B, Hk, T, D), v (B, Hk, T, Dv); GQA and varlen supported."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    k = k.repeat_interleave(Hq // Hk, dim=1)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    o = torch.zeros(B, Hq, T, v.shape[-1], dtype=torch.float64)
    rem = torch.ones(B, Hq, T, dtype=torch.float64)
    bounds = [0, T] if cu_seqlens is None else [int(x) for x in cu_seqlens]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        logits = scale * q[:, :, s:e] @ k[:, :, s:e].transpose(-1, -2)
        A = weights_logspace(logits, attend_current)
        o[:, :, s:e] = A @ v[:, :, s:e]
        rem[:, :, s:e] = 1.0 - A.sum(-1)
        # 1 - sum A loses digits when the stick is almost used up: the product form is exact
        offset = 0 if attend_current else -1
        visible = torch.ones(e - s, e - s, dtype=torch.bool).tril(offset)
        log_rem = torch.nn.functional.logsigmoid(-logits).masked_fill(~visible, 0.0).sum(-1)
        rem[:, :, s:e] = log_rem.exp()
    return o, rem


def rel_err(x, ref):
    """Relative Frobenius error of x against the float64 reference."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))
