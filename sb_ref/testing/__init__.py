"""Tools for checking stick-breaking attention, and the course's checks built on them.

- here (from :mod:`sb_ref.testing.core`): the float64 oracle :func:`oracle_attention`, the input regimes
  :data:`REGIMES` and :func:`make_inputs`, the error measure :func:`rel_err`, and the allocation probe
  :class:`LargestAllocation`. Importing this package loads nothing else.
- :mod:`sb_ref.testing.speed`: measurements of an op (timing in pairs, the largest allocation, the key elements a
  Triton kernel loads under the interpreter) and the speed check built on them.
- :mod:`sb_ref.testing.traffic`: the picture of a learner's kernel's loads under the interpreter (which tiles it
  visited, masked lanes) beside the right pattern (lessons 05-08).
- :mod:`sb_ref.testing.remote`: the course grader's protocol as the checks see it (where a piece of a check runs).
- :mod:`sb_ref.testing.lessons`: the checks that the lesson notebooks call, one module per lesson
  (``sb_ref.testing.lessons.lesson01`` ...), their harness and their reference models.
"""
from .core import REGIMES, LargestAllocation, make_inputs, oracle_attention, rel_err

__all__ = ["REGIMES", "LargestAllocation", "make_inputs", "oracle_attention", "rel_err"]
