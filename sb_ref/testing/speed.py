"""Speed checks. On a GPU: the learner's op and ``sb_ref``'s own, timed in the same process (medians after
warm-up), scored in tiers by the throughput ratio, and only after the numerics pass. Without a GPU there is no
wall-clock score at all; deterministic proxies stand in, and the verdict says so:

- no tensor of ``T * T`` elements is allocated: under the course's grader, the op's peak memory read from outside
  its process (:func:`peak_memory`); elsewhere, the largest allocation (:func:`largest_allocation`, through
  :func:`probed_call`);
- the key tiles a causal kernel visits: a Triton kernel run through the interpreter is watched, and the key
  elements it loads are counted (:func:`key_elements_loaded`); a kernel that skips the tiles above the diagonal loads
  about half of what a full sweep does.

When the grader calls a learner's function in the learner's own kernel, the memory proxies are read by the grader
from outside that kernel (:func:`peak_memory`); the timing and the load counts run there, next to the function
(:func:`sb_ref.testing.remote.run_where_it_lives`), with the timing primitives captured when this module was first
imported, and sb_ref's own kernel is timed in the grader's process.
"""
import statistics
from contextlib import contextmanager

import torch

from .core import LargestAllocation, make_inputs, rel_err
from .remote import run_where_it_lives

_Event, _record, _elapsed, _synchronize = (torch.cuda.Event, torch.cuda.Event.record,
                                           torch.cuda.Event.elapsed_time, torch.cuda.synchronize)

#: The length at which the grader measures a CPU op's peak memory from outside (a T*T float32 matrix: 2.25 MiB).
PROXY_T = 768

#: What the learner's exercise cells and earlier calls may leave held in the grader's measuring process.
HELD_LIMIT = 256 << 20

#: (smallest throughput ratio to sb_ref's kernel, share of the exercise's points), best first
SPEED_TIERS = ((0.9, 1.0), (0.6, 0.75), (0.3, 0.5), (0.0, 0.25))


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


def median_ms(fn, args, warmup=5, reps=20):
    """Median milliseconds of ``fn(*args)`` on the GPU, each repetition timed with its own CUDA events."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(reps):
        start, end = _Event(enable_timing=True), _Event(enable_timing=True)
        _record(start)
        fn(*args)
        _record(end)
        _synchronize()
        times.append(_elapsed(start, end))
    return statistics.median(times)


def time_pair(fn, reference, args, rounds=3):
    """(learner ms, reference ms): medians, measured in alternating rounds so that both see the same clocks and
    caches. A learner's function living in a notebook kernel is timed there, and the reference here, in the
    grader's process: where the learner's code runs, the library's kernels are hidden and could be slowed."""
    if getattr(fn, "run_in_kernel", None) is None:
        return _time_pair_here(fn, reference, args, rounds)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(run_where_it_lives(fn, median_ms, args))
        theirs.append(median_ms(reference, args))
    return min(ours), min(theirs)


def _time_pair_here(fn, reference, args, rounds):
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(median_ms(fn, args))
        theirs.append(median_ms(reference, args))
    return min(ours), min(theirs)


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
    warm-up call left held before it (see :func:`autograder.grading`'s memory probe). None when ``fn`` is not a
    grader's proxy, or the grader has no cgroup to measure with: then :func:`probed_call` is the probe."""
    measure = getattr(fn, "measure_memory", None)
    return None if measure is None else measure(warmup_args, args)


def largest_allocation(fn, args):
    """Elements of the largest tensor ``fn(*args)`` allocates (see :class:`~sb_ref.testing.LargestAllocation`)."""
    return probed_call(fn, args)[1].numel


@contextmanager
def _watch_loads(tensor, rows):
    """Counts, per row of ``tensor`` (its dimension -2), the elements the Triton interpreter loads from it."""
    from triton.runtime import interpreter

    base = tensor.data_ptr()
    size = tensor.untyped_storage().nbytes()
    row_bytes = tensor.stride(-2) * tensor.element_size()
    T = tensor.shape[-2]
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, *rest, **kwargs):
        addresses = ptrs.data.reshape(-1).astype("int64")
        keep = mask.data.reshape(-1).astype(bool) if mask is not None else None
        if keep is not None:
            addresses = addresses[keep]
        inside = addresses[(addresses >= base) & (addresses < base + size)]
        for row in ((inside - base) // row_bytes % T).tolist():
            rows[row] = rows.get(row, 0) + 1
        return original(self, ptrs, mask, *rest, **kwargs)

    interpreter.InterpreterBuilder.create_masked_load = counting_load
    try:
        yield rows
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original


def key_elements_loaded(fn, args, key_index=1):
    """Total number of key elements a Triton kernel loads while ``fn(*args)`` runs under the interpreter, summed
    over key rows (``args[key_index]`` is k). Divide by a full sweep's count to see how much a causal kernel
    skips. Needs TRITON_INTERPRET=1."""
    return run_where_it_lives(fn, _key_elements_loaded_here, args, key_index)


def _key_elements_loaded_here(fn, args, key_index):
    rows = {}
    with _watch_loads(args[key_index], rows):
        fn(*args)
    return sum(rows.values())


def check_speed(fn, reference, make_args, *, points, check="check_speed", tol=2.5e-3, tiers=SPEED_TIERS,
                full_sweep_loads=None):
    """Numerics first, then speed: on a GPU a tier of ``points``; without one, the proxies (reported as such).

    Args:
        fn: the learner's op; reference: sb_ref's own, same signature. ``make_args(device, size)`` builds the
            inputs, with ``size`` "small" (numerics, proxies) or "large" (timing; sized to fill the GPU).
            The first tensor argument is q, the second k, each (B, H, T, D).
        full_sweep_loads: key elements a kernel that visits every key tile would load on the small inputs;
            with it, a kernel loading more than 3/4 of that is told to skip the tiles above the diagonal.

    Returns:
        a :class:`Score`: the points earned, with a note saying how they were earned.
    """
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    small = make_args(device, "small")
    got, want = fn(*small), reference(*small)
    got, want = (got[0], want[0]) if isinstance(want, tuple) else (got, want)
    err = rel_err(got, want)
    if not err <= tol:
        raise AssertionError(f"{check}: numerics first: your output differs from sb_ref's by {err:.2e} "
                             f"(relative Frobenius; allowed {tol:.1e}). Speed is scored once the numerics pass.")
    if on_gpu:
        t_fn, t_ref = time_pair(fn, reference, make_args(device, "large"))
        ratio = t_ref / t_fn
        share = speed_share(ratio, tiers)
        note = (f"speed on {torch.cuda.get_device_name()}: {t_fn:.3f} ms vs sb_ref's {t_ref:.3f} ms, "
                f"{ratio:.2f}x its throughput: {share:.0%} of the points")
        print(f"{check}: {note}")
        return Score(points * share, note)
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
        loads = key_elements_loaded(fn, small)
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
