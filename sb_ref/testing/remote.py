"""The course grader's protocol, seen from the checks: where a piece of a check runs.

The grader (``python -m autograder``) runs every check in its own process and hands it, for each of the learner's
functions, a proxy into the learner's notebook kernel (:class:`autograder.remote.RemoteFunction`). A proxy is
called like the function; in addition it has ``run_in_kernel(helper, *args)``, which calls ``helper(fn, *args)``
inside the learner's kernel, with ``helper`` named ``"module:function"`` (a top-level function of an installed
module, looked up there by :mod:`autograder.serve`), and brings back what the helper returns (tensors, numbers,
strings and containers of them). That is the whole protocol; this module is the checks' only door to it.

A check uses it for the pieces that must run next to the learner's code: measurements (time, allocations, loads
of a Triton kernel) and calls that hand the learner objects that cannot travel between processes (a random
generator, a model with known answers). Without a grader (a notebook, a test) the helper simply runs here.
"""


def run_where_it_lives(fn, helper, *args):
    """``helper(fn, *args)`` where ``fn`` lives: in the learner's kernel when ``fn`` is the grader's proxy of a
    learner's function, else here. ``helper`` must be a top-level function of an installed module."""
    remote = getattr(fn, "run_in_kernel", None)
    if remote is not None:
        return remote(f"{helper.__module__}:{helper.__qualname__}", *args)
    return helper(fn, *args)
