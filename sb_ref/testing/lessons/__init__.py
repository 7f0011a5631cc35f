"""The course's checks: one module per lesson, imported by that lesson's notebook.

Each lesson notebook has one import cell, e.g. ``from sb_ref.testing.lessons.lesson01 import check_weight_matrix``,
and one-line test cells such as ``check_weight_matrix(weight_matrix)``.

- ``lesson00`` ... ``lesson09``: the checks of each lesson's graded exercises (each module's ``__all__``);
- :mod:`~sb_ref.testing.lessons.harness`: what every check is made of (calling the learner's code, the tolerance
  table, comparing, "not attempted yet" for stubs, the verdict, quiet stderr, the device);
- :mod:`~sb_ref.testing.lessons.references`: the reference answers and models the checks compare against.

The course's grader (``python -m autograder``) runs the test cells in its own process with every lesson's checks
(:func:`checks`) and the learner's functions as proxies into the learner's kernel; the pieces of a check that must
run next to the learner's code go through :mod:`sb_ref.testing.remote`.
"""
import importlib

LESSONS = tuple(f"lesson{n:02d}" for n in range(10))


def checks():
    """Every lesson's checks by name: ``{"check_sigmoid": <function>, ...}``."""
    found = {}
    for lesson in LESSONS:
        module = importlib.import_module(f"{__name__}.{lesson}")
        found.update({name: getattr(module, name) for name in module.__all__ if name.startswith("check_")})
    return found
