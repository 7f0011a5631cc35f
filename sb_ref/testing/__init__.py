"""Tools for checking stick-breaking attention: the float64 oracle, the input regimes, the error measure and the
allocation probe (:mod:`sb_ref.testing.core`); the learners' exercise checks are built on them."""
from .core import REGIMES, LargestAllocation, make_inputs, oracle_attention, rel_err

__all__ = ["REGIMES", "LargestAllocation", "make_inputs", "oracle_attention", "rel_err"]
