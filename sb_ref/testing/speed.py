"""Speed checks. On a GPU: the learner's op and ``sb_ref``'s own, each timed over many calls on fresh inputs
(wall clock around the whole run, after warm-up), scored in tiers by the throughput ratio, and only after the
numerics pass. Without a GPU there is no wall-clock score at all; deterministic proxies stand in, and the verdict
says so:

- no tensor of ``T * T`` elements is allocated: under the course's grader, the op's peak memory read from outside
  its process (:func:`peak_memory`); elsewhere, the largest allocation (:func:`largest_allocation`, through
  :func:`probed_call`);
- the key tiles a causal kernel visits: a Triton kernel run through the interpreter is watched, and the key
  elements it loads are counted (:mod:`sb_ref.testing.loads`; under the course's grader in a replay of its launches
  where no learner code runs); a kernel that skips the tiles above the diagonal loads about half of a full sweep.

Under the course's grader, the learner's op is timed from outside: the grader's clock runs around a call into a
fresh sandboxed kernel that ran only the notebook's lesson and exercise cells (:func:`timed_calls` runs there), and
the outputs of every timed call come back as digests that the grader checks against sb_ref's on the same inputs,
so that no call can be skipped or answered from a cache. sb_ref's own kernel is then timed the same way in the
grader's process while no process of the learner runs (``fn.alone()``), so that nothing the learner left running
can slow the reference down.
"""
import secrets
import time
from contextlib import contextmanager, nullcontext
from dataclasses import astuple, dataclass

import torch

from .core import LargestAllocation, make_inputs, rel_err, shape_regime
from .loads import key_elements_loaded, watched_loads  # noqa: F401 (key_elements_loaded: the notebooks' import)
from .remote import run_where_it_lives

_synchronize = torch.cuda.synchronize

#: The length at which the grader measures a CPU op's peak memory from outside (a T*T float32 matrix: 2.25 MiB).
PROXY_T = 768

#: What the learner's exercise cells and earlier calls may leave held in the grader's measuring process.
HELD_LIMIT = 256 << 20

#: Seconds of work each timed run aims at: long enough that a call's round trip into the learner's kernel (a few
#: milliseconds) is a small part of it.
TIMED_SECONDS = 0.5

#: How far a timed call's digest may stray from sb_ref's, in units of the output's norm (a correct bfloat16 output
#: strays by about 1e-3; another input's output, or no output, by about 1).
DIGEST_TOL = 0.05

#: (smallest throughput ratio to sb_ref's kernel, share of the exercise's points), best first
SPEED_TIERS = ((0.9, 1.0), (0.6, 0.75), (0.3, 0.5), (0.0, 0.25))


#: While :func:`recorded_speeds` is open: the list that :func:`check_speed` adds what it measured to.
_RECORDS = None


@contextmanager
def recorded_speeds():
    """Collects what every :func:`check_speed` of this process measures while the context is open: a list of dicts
    ``{"check", "numerics", "error", "ms", "reference_ms", "ratio", "share", "device", "timing", "tiers"}``
    (``numerics``: whether the output matched sb_ref's; ``ms``, ``reference_ms``, ``ratio``, ``share``: None without
    a GPU or when the timing was refused, with ``error`` saying why; ``timing`` the :class:`TimingCase` timed on a
    GPU, ``tiers`` the speed tiers). The course's grader builds its leaderboard from it
    (``autograder/leaderboard.py``): the checks run in the grader's process, so these are its own measurements."""
    global _RECORDS
    outer, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        _RECORDS = outer


def _record(check, timing, tiers, numerics, error="", ms=None, reference_ms=None):
    if _RECORDS is None:
        return
    ratio = None if ms is None else reference_ms / ms
    _RECORDS.append({"check": check, "numerics": numerics, "error": error, "ms": ms, "reference_ms": reference_ms,
                     "ratio": ratio, "share": None if ratio is None else speed_share(ratio, tiers),
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "timing": timing, "tiers": tuple(tiers)})


class Score(float):
    """Points earned, with a note for the report. Prints as a plain number, which nbgrader takes as partial
    credit, as the course's grader does."""

    def __new__(cls, points, note=""):
        score = super().__new__(cls, points)
        score.note = note
        return score

    __repr__ = float.__repr__


def speed_share(ratio, tiers=SPEED_TIERS):
    """The share of the points that a throughput ratio (learner / reference) earns."""
    for least, share in tiers:
        if ratio >= least:
            return share
    return 0.0


@dataclass(frozen=True)
class TimingCase:
    """The inputs a speed check times: q, k, v of a regime (:func:`~sb_ref.testing.make_inputs`) of this shape."""

    B: int
    H: int
    T: int
    D: int
    dtype: str = "bfloat16"
    regime: str = "random"
    device: str = "cuda"  # where the inputs are drawn (the learner's and the reference's must be the same)


def timed_calls(fn, case, seed, reps):
    """Calls ``fn(q_i, k, v)`` for ``reps`` inputs drawn from ``seed``, one after the other, and waits for the GPU;
    returns ``(digests, norms)``, each (reps, B, H) float64: per call and head, the sum of the output times a random
    tensor (any other output gives another sum), and the output's norm (the digest's scale).

    Each call's q is the seed's q rolled along the sequence by its own offset, so every call has its own answer
    (none can be kept from an earlier call) at the cost of one copy of q. ``case`` is a :class:`TimingCase` or its
    fields as a tuple (as it travels to the learner's kernel)."""
    case = case if isinstance(case, TimingCase) else TimingCase(*case)
    if not 0 < reps <= case.T:
        raise ValueError(f"reps must be in [1, T = {case.T}], got {reps}")
    device = case.device
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this timing draws its inputs on the GPU, and this process sees none")
    shifts = torch.randperm(case.T, generator=torch.Generator().manual_seed(seed))[:reps].tolist()
    generator = torch.Generator(device).manual_seed(seed)  # on the device: quick beside the calls it feeds
    q, k, v, weights = (torch.randn(case.B, case.H, case.T, case.D, generator=generator, device=device)
                        for _ in range(4))
    q, k = shape_regime(case.regime, q, k)
    q, k, v = (x.to(getattr(torch, case.dtype)) for x in (q, k, v))
    digests = torch.empty(reps, case.B, case.H, dtype=torch.float64, device=device)
    norms = torch.empty_like(digests)
    for i, shift in enumerate(shifts):
        o = fn(q.roll(shift, dims=-2), k, v)
        o = (o[0] if isinstance(o, (tuple, list)) else o).float()
        digests[i] = (o * weights).sum((-1, -2))
        norms[i] = o.square().sum((-1, -2)).sqrt()
    if device == "cuda":
        _synchronize()
    return digests.cpu(), norms.cpu()


def _timed_here(fn, case, seeds, reps):
    """[(seconds, timed_calls' result)] for each seed, after one untimed warm-up run (compilation, autotuning)."""
    timed_calls(fn, case, seeds[0] ^ 1, min(reps, 2))
    runs = []
    for seed in seeds:
        start = time.perf_counter()
        result = timed_calls(fn, case, seed, reps)
        runs.append((time.perf_counter() - start, result))
    return runs


def time_pair(fn, reference, case, rounds=3):
    """(learner ms, reference ms) per call: the fastest of ``rounds`` timed runs of :func:`timed_calls` each, on
    the same fresh seeds. A learner's function living in a notebook kernel is timed by the grader from outside a
    fresh kernel of its own (``fn.time_calls``), and the reference here, while no process of the learner runs
    (``fn.alone()``); every timed call's output must match the reference's (:data:`DIGEST_TOL`).

    Raises AssertionError when a timed call's output does not match (a result kept between calls, a call
    skipped)."""
    case = case if isinstance(case, TimingCase) else TimingCase(*case)
    timed_calls(reference, case, 0, 2)  # compile, autotune
    start = time.perf_counter()
    timed_calls(reference, case, 1, 5)
    one = (time.perf_counter() - start) / 5
    reps = max(10, min(case.T, round(TIMED_SECONDS / max(one, 1e-6))))
    seeds = [secrets.randbits(31) for _ in range(rounds)]
    time_calls = getattr(fn, "time_calls", None)
    if time_calls is None:
        ours = _timed_here(fn, case, seeds, reps)
    else:
        ours = time_calls(f"{timed_calls.__module__}:{timed_calls.__qualname__}", astuple(case), seeds, reps)
    with (fn.alone() if hasattr(fn, "alone") else nullcontext()):
        theirs = _timed_here(reference, case, seeds, reps)
    for (_, got), (_, want) in zip(ours, theirs):
        _check_digests(got, want, reps)
    return (1e3 * min(t for t, _ in ours) / reps, 1e3 * min(t for t, _ in theirs) / reps)


def _check_digests(got, want, reps):
    """The learner's timed calls gave the reference's outputs, each call its own."""
    shape = want[0].shape
    if not (isinstance(got, (tuple, list)) and len(got) == 2 and all(
            isinstance(g, torch.Tensor) and g.shape == shape and g.dtype == torch.float64 for g in got)):
        raise AssertionError("the timed run did not bring back a digest for each call: the speed is not scored")
    stray = ((got[0] - want[0]).abs() / want[1].clamp_min(1e-30)).amax(dim=(1, 2))
    bad = (~(stray <= DIGEST_TOL)).nonzero().flatten().tolist()
    if bad:
        raise AssertionError(f"{len(bad)} of the {reps} timed calls gave an output that is not sb_ref's for its "
                             f"inputs (the first: call {bad[0]}, off by {stray[bad[0]]:.2g} of its norm): each call "
                             "must compute its own result (no result kept from an earlier call), so the speed is "
                             "not scored.")


def probed_call(fn, args):
    """``(fn(*args), probe)``: the result and a :class:`~sb_ref.testing.LargestAllocation` that watched the call
    (in the learner's kernel for a grader's proxy, where the allocations happen; the probe comes back as a record).

    Example:
        >>> import torch
        >>> result, probe = probed_call(torch.ones, (3, 4))
        >>> probe.numel, probe.shape
        (12, (3, 4))
    """
    result, (numel, shape, op) = run_where_it_lives(fn, _probed_record, args)
    probe = LargestAllocation()
    probe.numel, probe.shape, probe.op = numel, tuple(shape) if shape is not None else None, op
    return result, probe


def _probed_record(fn, args):
    with LargestAllocation() as probe:
        result = fn(*args)
    return result, (probe.numel, probe.shape, probe.op)


def peak_memory(fn, warmup_args, args):
    """``(fn(*warmup_args), peak, held)`` as the course's grader measures it from outside the learner's process:
    ``peak`` the bytes that ``fn(*args)`` took at its peak, ``held`` the bytes the notebook's exercise cells and the
    warm-up call left held before it (see :class:`autograder.grading.MeasuringKernel`). None when ``fn`` is not a
    grader's proxy, or the grader has no cgroup to measure with: then :func:`probed_call` is the probe."""
    measure = getattr(fn, "measure_memory", None)
    return None if measure is None else measure(warmup_args, args)


def largest_allocation(fn, args):
    """Elements of the largest tensor ``fn(*args)`` allocates (see :class:`~sb_ref.testing.LargestAllocation`)."""
    return probed_call(fn, args)[1].numel


def check_speed(fn, reference, make_args, *, points, timing=TimingCase(4, 12, 4096, 128), check="check_speed",
                tol=2.5e-3, tiers=SPEED_TIERS, full_sweep_loads=None):
    """Numerics first, then speed: on a GPU a tier of ``points``; without one, the proxies (reported as such).

    Args:
        fn: the learner's op; reference: sb_ref's own, same signature. ``make_args(device)`` builds the small
            inputs (numerics, proxies): q, k, v, each (B, H, T, D), then any further arguments.
        timing: the :class:`TimingCase` timed on a GPU (sized to fill it).
        full_sweep_loads: key elements a kernel that visits every key tile would load on the small inputs;
            with it, a kernel loading more than 3/4 of that is told to skip the tiles above the diagonal.

    Returns:
        a :class:`Score`: the points earned, with a note saying how they were earned.
    """
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    small = make_args(device)
    got, want = fn(*small), reference(*small)
    got, want = (got[0], want[0]) if isinstance(want, tuple) else (got, want)
    err = rel_err(got, want)
    if not err <= tol:
        _record(check, timing, tiers, False, f"differs from sb_ref's output by {err:.2e} (allowed {tol:.1e})")
        raise AssertionError(f"{check}: numerics first: your output differs from sb_ref's by {err:.2e} "
                             f"(relative Frobenius; allowed {tol:.1e}). Speed is scored once the numerics pass.")
    if on_gpu:
        try:
            t_fn, t_ref = time_pair(fn, reference, timing)
        except AssertionError as exc:
            _record(check, timing, tiers, True, str(exc))
            raise AssertionError(f"{check}: {exc}") from None
        except Exception as exc:  # the learner's kernel timed out or crashed while timed
            _record(check, timing, tiers, True, f"the timing stopped: {type(exc).__name__}: {exc}")
            raise
        _record(check, timing, tiers, True, ms=t_fn, reference_ms=t_ref)
        ratio = t_ref / t_fn
        share = speed_share(ratio, tiers)
        note = (f"speed on {torch.cuda.get_device_name()}: {t_fn:.3f} ms vs sb_ref's {t_ref:.3f} ms, "
                f"{ratio:.2f}x its throughput: {share:.0%} of the points")
        print(f"{check}: {note}")
        return Score(points * share, note)
    _record(check, timing, tiers, True, "no GPU: speed is measured on a GPU only")
    T = small[0].shape[-2]
    q = small[0]
    large = make_inputs("random", B=1, Hq=1, T=PROXY_T, D=q.shape[-1], dtype=q.dtype, seed=0) + tuple(small[3:])
    outside = peak_memory(fn, small, large)
    if outside is not None:  # the grader's measure, from outside the learner's process
        _, peak, held = outside
        matrix = PROXY_T * PROXY_T * q.element_size()
        if held > HELD_LIMIT:
            raise AssertionError(f"{check}: your notebook's exercise cells and calls left {held / 2**20:.0f} MiB held "
                                 f"before the memory was measured; at most {HELD_LIMIT >> 20} MiB may be: keep no "
                                 "large tensors at module level or between calls.")
        if peak > matrix / 2:
            raise AssertionError(f"{check}: your op took {peak / 2**20:.1f} MiB at its peak for T = {PROXY_T} "
                                 f"(measured from outside its process); one T*T matrix is {matrix / 2**20:.0f} MiB: "
                                 "keep memory O(T) (tiles, never the whole weight matrix).")
        note = (f"no GPU: speed replaced by proxies: peak memory {peak / 2**20:.1f} MiB for T = {PROXY_T} "
                f"(< half of one T*T matrix, measured from outside)")
    else:
        allocated = largest_allocation(fn, small)
        if allocated >= T * T:
            raise AssertionError(f"{check}: your op allocates a tensor of {allocated} elements, at least T*T = "
                                 f"{T * T} for T = {T}: keep memory O(T) (tiles, never the whole weight matrix).")
        note = f"no GPU: speed replaced by proxies: largest allocation {allocated} elements (< T*T = {T * T})"
    if full_sweep_loads:
        counted, count = watched_loads(fn, small, watched=1)
        counted = counted[0] if isinstance(counted, tuple) else counted
        if count is None:
            raise AssertionError(f"{check}: the key tiles your kernel visits are counted by Triton's interpreter, "
                                 "which is off: set TRITON_INTERPRET=1 before triton is imported.")
        err = rel_err(counted, want)
        if not err <= tol:
            raise AssertionError(f"{check}: while its loads were counted, your op's output differed from sb_ref's "
                                 f"by {err:.2e} (allowed {tol:.1e}): the output must not depend on being watched.")
        loads = count.elements
        if loads > 0.75 * full_sweep_loads:
            raise AssertionError(f"{check}: your kernel loads {loads} key elements, {loads / full_sweep_loads:.0%}"
                                 " of a sweep over every key tile: a causal kernel needs only the tiles at or "
                                 "below the diagonal. Start the key loop at the diagonal block and stop at 0.")
        note += f"; key elements loaded {loads / full_sweep_loads:.0%} of a full sweep"
    print(f"{check}: {note}")
    return Score(points, note)


def reference_attention(q, k, v):
    """sb_ref's own op, as speed checks time it: Triton on CUDA (the interpreter on a CPU when it is on)."""
    import os

    from ..attention import stick_breaking_attention

    use_triton = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return stick_breaking_attention(q, k, v, backend="triton" if use_triton else "torch")
