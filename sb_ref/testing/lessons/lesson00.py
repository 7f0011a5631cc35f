"""The check of lesson 00 (setup and smoke test): :func:`check_sigmoid`, a numerically safe sigmoid.

They follow :mod:`sb_ref.testing.lessons.harness`: one verdict line, quiet on stderr, ``AssertionError`` naming the
case, the worst error, where it is, and a hint, and "not attempted yet" for a stub. The keyword arguments give the
hidden variants.
"""
import numpy as np
import torch

from .harness import call, compare, quietly, verdict

__all__ = ["check_sigmoid"]


@quietly
def check_sigmoid(sigmoid, *, seed=0, n=200):
    """Lesson 00: ``sigmoid(z)`` on a numpy array, exact for every z (no overflow, no NaN)."""
    check = "check_sigmoid"
    rng = np.random.default_rng(seed)
    cases = [("small values", rng.normal(size=n)),
             ("large values", rng.uniform(-60, 60, size=n)),
             ("extreme values", np.array([-1000.0, -745.0, -40.0, 0.0, 40.0, 745.0, 1000.0])),
             ("a 2-D array", rng.normal(scale=5, size=(3, 7)))]
    for what, z in cases:
        case = f"{what}, shape {z.shape}"
        got = call(check, sigmoid, (z.copy(),), {}, case)
        ref = torch.sigmoid(torch.as_tensor(z, dtype=torch.float64))
        compare(check, got, ref, 1e-12, case, elementwise=True,
                hint="1 / (1 + exp(-z)) overflows for very negative z; for z < 0 use exp(z) / (1 + exp(z)) "
                     "(np.where picks per entry; np.exp(-np.abs(z)) never overflows).")
    verdict(check, len(cases), "float64, |z| up to 1000")

