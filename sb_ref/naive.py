"""Stick-breaking attention by its definition: plain numpy loops, float64, no tricks.

Query ``i`` walks back through the keys before it, nearest first. Each key takes a share ``beta = sigmoid(z)``
of the stick that the nearer keys left; whatever is never taken is the remainder::

    A[i, j] = beta[i, j] * prod_{j < k < i} (1 - beta[i, k])        (k <= i with attend_current)
    o[i]    = sum_j A[i, j] v[j],      rem[i] = prod_j (1 - beta[i, j])

These loops are slow and, for long sequences, lose all precision (the product underflows): they are the
definition that every faster version is checked against on small inputs, not something to run at scale.
"""
import math

import numpy as np


def sigmoid(z):
    """The logistic function of one number, written so that ``exp`` never overflows."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _weights_2d(z, attend_current):
    T = z.shape[0]
    A = np.zeros((T, T))
    remainder = np.ones(T)
    for i in range(T):
        stick = 1.0
        nearest = i if attend_current else i - 1
        for j in range(nearest, -1, -1):  # walk back from the query
            beta = sigmoid(z[i, j])
            A[i, j] = stick * beta
            stick = stick * (1.0 - beta)
        remainder[i] = stick
    return A, remainder


def stick_breaking_weights(logits, attend_current=False):
    """The stick-breaking weight matrix of a matrix of logits.

    Args:
        logits: array of shape (..., T, T); ``logits[..., i, j]`` is query i's logit for key j.
        attend_current: if True, query i also sees key i (the diagonal).

    Returns:
        float64 array (..., T, T), lower triangular (strictly, unless ``attend_current``); each row sums to at most 1.

    Example:
        >>> import numpy as np
        >>> A = stick_breaking_weights(np.zeros((3, 3)))
        >>> A.round(3).tolist()
        [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.25, 0.5, 0.0]]
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim < 2 or z.shape[-1] != z.shape[-2]:
        raise ValueError(f"logits must have shape (..., T, T), got {z.shape}")
    A = np.zeros(z.shape)
    for index in np.ndindex(*z.shape[:-2]):
        A[index], _ = _weights_2d(z[index], attend_current)
    return A


def stick_breaking_attention(q, k, v, scale=None, attend_current=False):
    """Stick-breaking attention of one or more heads, by loops.

    Args:
        q: array (..., T, D) of queries; k: (..., T, D) keys; v: (..., T, Dv) values (same leading shape).
        scale: logit scale; default ``1 / sqrt(D)``.
        attend_current: if True, query i also sees key i.

    Returns:
        ``(o, rem)``: float64 arrays of shapes (..., T, Dv) and (..., T); ``rem[i]`` is the stick left unused.

    Example:
        >>> import numpy as np
        >>> q = k = np.zeros((2, 4)); v = np.array([[1.0], [2.0]])
        >>> o, rem = stick_breaking_attention(q, k, v)
        >>> o.tolist(), rem.tolist()
        ([[0.0], [0.5]], [1.0, 0.5])
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if q.ndim < 2 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"expected q, k of one shape (..., T, D) and v of shape (..., T, Dv); "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o = np.zeros(v.shape)
    rem = np.ones(q.shape[:-1])
    for index in np.ndindex(*q.shape[:-2]):
        z = scale * q[index] @ k[index].T
        A, rem[index] = _weights_2d(z, attend_current)
        o[index] = A @ v[index]
    return o, rem
