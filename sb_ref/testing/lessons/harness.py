"""What every lesson's checks are made of: calling the learner's code, comparing, the verdict.

A check is called as ``check_<exercise>(learner_fn)``, so an nbgrader test cell is one line. A check

- runs the learner's function (:func:`call`) on the regimes and edge cases that fit the exercise and compares each
  result with a float64 reference (:func:`compare`, at the course's :data:`TOLERANCE` unless the exercise says
  otherwise);
- prints one short verdict line on success (:func:`verdict`) and returns None (all-or-nothing: nbgrader reads a
  numeric result of a test cell as partial credit, so only the speed checks return one);
- silences warnings and anything written to ``sys.stderr`` while it runs (:func:`quiet`, :func:`quietly`):
  nbgrader scores any stderr output of a test cell as a failure;
- raises ``AssertionError`` on failure, saying which case failed (:func:`fmt_case`), the worst error, where it
  occurred, and a hint; learner code that still raises the notebook's ``NotImplementedError`` stub, directly or
  from inside a Triton kernel, gets "not attempted yet" (:func:`find_stub`, :func:`not_attempted`).

The keyword arguments of the checks (``seed``, sizes, regimes) give the hidden variants used in the hidden-test
blocks. Pieces of a check that must run next to the learner's code go through
:func:`sb_ref.testing.remote.run_where_it_lives`.
"""
import contextlib
import functools
import io
import re
import warnings
from typing import NamedTuple

import numpy as np
import torch

from ..core import make_inputs, oracle_attention, rel_err
from ..speed import HELD_LIMIT, peak_memory, probed_call


class Tolerance(NamedTuple):
    """The course's accuracy contract (DESIGN.md, "Numerics"): the relative Frobenius error allowed against the
    float64 oracle, by the dtype of the inputs, for outputs and remainders (``output``) and for gradients
    (``gradient``). Exercises with a reason to differ (entry-by-entry errors, an input the learner did not compute)
    say so where they check."""

    output: dict
    gradient: dict


TOLERANCE = Tolerance(output={torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.5e-3, torch.float16: 2.5e-3},
                      gradient={torch.float64: 1e-10, torch.float32: 3e-5})


def default_device():
    """Where the checks run the learner's tensors: the GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------------------
# quiet

@contextlib.contextmanager
def quiet():
    """Silence warnings and Python-level writes to stderr (nbgrader scores any stderr output as a failure)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def quietly(check):
    """Runs a whole check under :func:`quiet`: its own computations must not write to stderr either."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        with quiet():
            return check(*args, **kwargs)
    return wrapper


def notebook_function(fn, name):
    """The learner's function `name` from the notebook that defined fn: through the grader's handle of a learner
    function (``notebook_function``), else from fn's globals; None where there is none."""
    sibling = getattr(type(fn), "notebook_function", None)
    if sibling is not None:
        return sibling(fn, name)
    found = getattr(fn, "__globals__", {}).get(name)
    return found if callable(found) else None


def builds_on(*earlier):
    """For a check whose exercise builds on earlier ones (``(name in the notebook, its check)`` pairs): when the
    check fails and an earlier exercise fails its own check, the message says to fix that one first, and gives
    its failure, since it is the likely cause. Stubs say "not attempted yet" as before."""
    def wrap(check):
        @functools.wraps(check)
        def checked(fn, *args, **kwargs):
            try:
                return check(fn, *args, **kwargs)
            except AssertionError as exc:
                if "not attempted yet" in str(exc):
                    raise
                for name, earlier_check in earlier:
                    before = notebook_function(fn, name)
                    if before is None:
                        continue
                    try:
                        with contextlib.redirect_stdout(io.StringIO()):
                            earlier_check(before)
                    except AssertionError as first:
                        raise AssertionError(
                            f"{check.__name__}: `{name}`, which `{name_of(fn)}` builds on, is wrong: fix "
                            f"{earlier_check.__name__} first, then run this check again. Its failure:\n{first}"
                        ) from None
                raise
        return checked
    return wrap


# --------------------------------------------------------------------------------------------------------------
# stubs: "not attempted yet"

NOT_ATTEMPTED = ("{check}: not attempted yet. {who} still raises NotImplementedError{detail}: replace the "
                 "`raise NotImplementedError(...)` line with your code, run that cell, then run this check again.")

# the notebooks' stubs say what is left to write: raise NotImplementedError("<task>: not written yet (...)")
_STUB_WORDS = re.compile(r"([\w.]+): not written yet")


class Stub(NamedTuple):
    """A stub found behind an exception: the task its words name (None without them), and whether it was raised
    inside something the learner's function ran (a Triton kernel, through the interpreter or the compiler)."""

    task: str
    nested: bool


def _chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def find_stub(exc):
    """The :class:`Stub` behind ``exc`` (what the learner's code raised), or None when it is a real error.

    A stub is a ``NotImplementedError`` raised by the learner's function itself; or, anywhere in the chain of
    causes, one that carries the stub's words; or an error that quotes one: Triton's interpreter wraps a kernel's
    exception in its own (with the stub's words in its message), Triton's compiler rejects the ``raise`` statement
    (a ``CompilationError`` naming ``Raise`` or quoting the line), and the grader rebuilds a kernel's error as its
    own, with the message. A wrapped ``NotImplementedError`` without the stub's words is a real error: Triton's
    own (for libdevice in the interpreter, say)."""
    for depth, link in enumerate(_chain(exc)):
        text = str(link)
        words = _STUB_WORDS.search(text)
        task = words.group(1) if words else None
        if isinstance(link, NotImplementedError):
            if depth == 0 or words:
                return Stub(task, depth > 0)
            continue
        if any(t.__name__ == "CompilationError" for t in type(link).__mro__) and (
                "NotImplementedError" in text or "Raise" in text):
            return Stub(task, True)
        if words and ("NotImplementedError" in text
                      or isinstance(link.__cause__ or link.__context__, NotImplementedError)):
            return Stub(task, True)
    return None


def not_attempted(check, who, detail=""):
    """The "not attempted yet" failure of ``check``; ``who`` is what still raises (e.g. "`fn`")."""
    return AssertionError(NOT_ATTEMPTED.format(check=check, who=who, detail=detail))


def _stub_failure(check, stub, label):
    if not stub.nested:
        return not_attempted(check, f"`{stub.task or label}`")
    return not_attempted(check, f"the kernel that `{label}` launches",
                         f" (`{stub.task}`: not written yet)" if stub.task else "")


# --------------------------------------------------------------------------------------------------------------
# calling the learner's code

def name_of(fn):
    """The name a message gives the learner's function (or class, or callable object)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def call(check, fn, args, kwargs, case, hint="", label=None):
    """Run the learner's function quietly; turn its exceptions into an AssertionError that names the case (or says
    "not attempted yet" for a stub, see :func:`find_stub`)."""
    label = label or name_of(fn)
    try:
        with quiet():
            return fn(*args, **kwargs)
    except Exception as exc:  # the learner's error, reported with the case that triggered it
        stub = find_stub(exc)
        if stub is not None:
            raise _stub_failure(check, stub, label) from None
        message = f"{check}: `{label}` raised {type(exc).__name__}: {exc}\n  case: {case}"
        if hint:
            message += f"\n  hint: {hint}"
        raise AssertionError(message) from exc


def unpack(result, n, check, fn, case, names):
    """``result`` if it is ``n`` values (a tuple or list), else a failure that says what came back."""
    if not isinstance(result, (tuple, list)) or len(result) != n:
        got = type(result).__name__ if not isinstance(result, (tuple, list)) else f"{len(result)} values"
        raise AssertionError(f"{check}: `{name_of(fn)}` should return {n} values ({', '.join(names)}), got {got}\n"
                             f"  case: {case}")
    return result


# --------------------------------------------------------------------------------------------------------------
# comparing

def as_float64(x, check, what, case):
    """The learner's result as a float64 CPU tensor (accepts torch tensors, numpy arrays, numbers)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError):
        raise AssertionError(f"{check}: {what} should be an array of numbers, got {type(x).__name__}\n"
                             f"  case: {case}") from None


def fmt_index(index):
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def compare(check, got, ref, tol, case, hint, what="the output", *, elementwise=False):
    """Fail unless ``got`` matches ``ref`` (float64) within ``tol``; the message names the worst entry. Returns the
    error.

    A result returned in bfloat16 or float16 cannot beat the rounding of the exact answer to that dtype: where that
    rounding alone exceeds the tolerance (a handful of entries, e.g. T = 1), the tolerance is 1.5 times it.
    """
    if isinstance(got, torch.Tensor) and got.dtype in (torch.bfloat16, torch.float16) and ref.numel():
        tol = max(tol, 1.5 * rel_err(ref.to(got.dtype), ref))
    got = as_float64(got, check, what, case)
    if tuple(got.shape) != tuple(ref.shape):
        raise AssertionError(f"{check}: {what} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}\n"
                             f"  case: {case}")
    if ref.numel() == 0:
        return 0.0
    bad = ~torch.isfinite(got) & torch.isfinite(ref)
    if bool(bad.any()):
        index = np.unravel_index(int(bad.flatten().nonzero()[0]), tuple(ref.shape))
        raise AssertionError(f"{check}: {what} holds {float(got[index])} (not finite) at index {fmt_index(index)}, "
                             f"where the answer is {float(ref[index]):.6g}\n  case: {case}\n  hint: {hint}")
    diff = (got - ref).abs()
    if elementwise:  # relative error of each entry (for quantities whose small values matter)
        scaled = diff / ref.abs().clamp_min(1e-300)
        scaled = torch.where(diff == 0, torch.zeros_like(scaled), scaled)
        err, worst = float(scaled.max()), int(scaled.flatten().argmax())
        measure = "largest relative error of one entry"
    else:
        err, worst = rel_err(got, ref), int(diff.flatten().argmax())
        measure = "relative error (Frobenius)"
    _fail_unless(err <= tol, check, what, case, f"{measure} {err:.2e} > tolerance {tol:.1e}; worst entry", worst, got,
                 ref, hint)
    return err


def _fail_unless(ok, check, what, case, measured, worst, got, ref, hint):
    """The failure message every comparison gives: what was measured, the worst entry, the hint."""
    if not ok:
        index = np.unravel_index(worst, tuple(ref.shape))
        raise AssertionError(f"{check}: {what} is wrong for {case}\n  {measured} at index {fmt_index(index)}: "
                             f"got {float(got[index]):.10g}, expected {float(ref[index]):.10g}\n  hint: {hint}")


def compare_remainder(check, got, ref, tol, case, hint, what="rem"):
    """Fail unless each remainder matches the float64 oracle's entry by entry, in log space: ``|log got - log ref|
    <= tol * max(1, |log ref|)`` wherever ``ref`` is a normal number of got's dtype, and got just as small where it
    is not. A Frobenius norm would let the tiny remainders of used-up sticks be anything (``1 - sum(A)`` is
    cancellation noise there), and those are the ones the log-space computation exists for. Returns the error."""
    dtype = got.dtype if isinstance(got, torch.Tensor) else torch.float64
    compare(check, got, ref, float("inf"), case, hint, what=what)  # shape and finiteness
    got = as_float64(got, check, what, case)
    if ref.numel() == 0:
        return 0.0
    floor = torch.finfo(dtype if dtype.is_floating_point else torch.float64).tiny
    normal = ref >= floor
    log_ref = ref.clamp_min(floor).log()
    err_log = (got.clamp_min(0).log() - log_ref).abs() / log_ref.abs().clamp_min(1.0)
    err = torch.where(normal, err_log, torch.where(got.abs() <= 1024 * floor, 0.0, float("inf")))
    err = torch.nan_to_num(err, nan=float("inf"))
    worst = int(err.flatten().argmax())
    value = float(err.flatten()[worst])
    _fail_unless(value <= tol, check, what, case, f"entry by entry, in log space: error {value:.2e} > tolerance "
                 f"{tol:.1e}", worst, got, ref, hint)
    return value


def probe_memory(check, fn, args, case, prerequisite, who, hint, large_args=None):
    """Runs ``fn(*args)`` (args = q, k, v, ...: float32, one head): its o must match the oracle (``prerequisite`` is
    the check that tests it), then its memory must stay O(T). Returns one line saying what was measured.

    Under the course's grader, with ``large_args`` (CPU tensors): measured from outside the learner's process
    (:func:`~sb_ref.testing.speed.peak_memory`; on a GPU grader in a process without the GPU, Triton interpreted):
    ``fn(*large_args)`` may take at most half of one T * T float32 matrix at its peak, and the notebook may hold at
    most :data:`HELD_LIMIT` before it. Elsewhere (a notebook, a grader without cgroups): no single allocation of
    ``fn(*args)`` may reach T * T / 8 elements (the dispatch-mode probe)."""
    with quiet():
        q, k, v = args[:3]
        T = q.shape[-2]
        outside = getattr(fn, "measure_memory", None) is not None and large_args is not None
        if outside:  # numerics first, where the function lives; the measure only for a correct result
            result = call(check, fn, args, {}, case)
        else:
            result, probe = call(check, probed_call, (fn, args), {}, case, label=name_of(fn))
        o, rem = unpack(result, 2, check, fn, case, ("o", "rem"))
        o_ref, _ = oracle_attention(q, k, v)
        compare(check, o, o_ref, TOLERANCE.output[torch.float32], case, what="o",
                hint=f"the memory check needs a correct result first: pass {prerequisite}.")
        warmup = large_args if q.is_cuda else args  # the grader measures on the CPU: large_args are CPU tensors
        measured = call(check, peak_memory, (fn, warmup, large_args), {}, case, label=name_of(fn)) if outside else None
        if measured is None:
            if outside:  # the grader has no cgroup to measure with: the probe in the function's process
                result, probe = call(check, probed_call, (fn, args), {}, case, label=name_of(fn))
            limit = T * T // 8
            if probe.numel > limit:
                raise AssertionError(
                    f"{check}: your {who} allocated a tensor of {probe.numel} elements (shape {probe.shape}, made by "
                    f"{probe.op}) for {case}; T * T = {T * T}, and the limit is T * T / 8 = {limit}.\n  hint: {hint}")
            return (f"largest allocation {probe.numel} elements (shape {probe.shape}) for T = {T}: "
                    f"{probe.numel / (T * T):.1%} of T * T")
        _, peak, held = measured
        T_large = large_args[0].shape[-2]
        matrix = T_large * T_large * 4
        if held > HELD_LIMIT:
            raise AssertionError(
                f"{check}: your notebook's exercise cells and a first call of your {who} left {held / 2**20:.0f} MiB "
                f"held before the memory was measured; at most {HELD_LIMIT >> 20} MiB may be (measured from outside "
                "the notebook's process, which runs only the lesson's cells and your exercise cells).\n"
                "  hint: keep no large tensors at module level or between calls.")
        if peak > matrix / 2:
            raise AssertionError(
                f"{check}: your {who} took {peak / 2**20:.1f} MiB at its peak for T = {T_large} (measured from outside "
                f"its process); one T * T float32 matrix is {matrix / 2**20:.0f} MiB and the limit is half of it.\n"
                f"  hint: {hint}")
        return (f"peak memory {peak / 2**20:.1f} MiB for T = {T_large}, measured from outside the notebook's process: "
                f"{peak / matrix:.1%} of one T * T float32 matrix")


# --------------------------------------------------------------------------------------------------------------
# the verdict and the case

def verdict(check, n_cases, detail, worst=None):
    """The one line a passing check prints."""
    extra = "" if worst is None else f"; worst relative error {worst:.1e}"
    print(f"{check}: passed, {n_cases} cases ({detail}{extra}).")


def worst_by_dtype(worst):
    """"float64 worst 1e-16; float32 worst ..." for a verdict, from {dtype: worst error}."""
    return "; ".join(f"{str(d).replace('torch.', '')} worst {e:.1e}" for d, e in worst.items())


def fmt_case(**fields):
    """A case as a message names it: ``regime='long', dtype=float32, T=37``."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        elif isinstance(value, str) and key == "regime":
            value = repr(value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def regime_logits(regime, T, seed, D=16, dtype=torch.float64):
    """A (T, T) logits matrix of one regime: the scaled q.k of one head of :func:`~sb_ref.testing.make_inputs`."""
    q, k, _ = make_inputs(regime, B=1, Hq=1, T=T, D=D, dtype=torch.float64, seed=seed)
    return ((q[0, 0] @ k[0, 0].T) * D ** -0.5).to(dtype)
