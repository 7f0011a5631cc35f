"""The learners' checks: one function per graded exercise of lessons 00-04.

Every check is called as ``check_<exercise>(learner_fn)``, so an nbgrader test cell is one line. A check

- runs the learner's function on the regimes and edge cases that fit the exercise (T = 1, lengths that are not
  block multiples, head dims that are not powers of two, ``attend_current`` both ways, GQA where it applies) and
  compares each result with a float64 oracle (:func:`sb_ref.testing.oracle_attention` or the log-space weights);
- prints one short verdict line on success and returns None (all-or-nothing: nbgrader reads a numeric result of
  a test cell as partial credit, so the checks never return one; exercises with separate concerns have separate
  test cells instead);
- silences warnings and anything the learner's code writes to ``sys.stderr`` while it runs (nbgrader scores any
  stderr output of a test cell as a failure);
- raises ``AssertionError`` on failure, saying which case failed (regime, dtype, shape, options), the worst
  error, where it occurred, and a hint; a function that still raises ``NotImplementedError`` gets
  "not attempted yet".

The keyword arguments (``seed``, sizes, regimes) give the hidden variants used in the hidden-test blocks.
"""
import contextlib
import functools
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

from ..layer import StickBreakingSelfAttention
from ..weights import reverse_exclusive_cumsum as _ref_reverse_exclusive_cumsum
from ..weights import stick_breaking_weights as _ref_weights
from .core import REGIMES, make_inputs, oracle_attention, probed_call, rel_err

__all__ = [
    "check_sigmoid",
    "check_weights_for_query", "check_weight_matrix", "check_attention_numpy",
    "check_log_sigmoids", "check_reverse_exclusive_cumsum", "check_stable_weights", "check_stable_attention",
    "check_gradcheck_attention", "check_attention_gradients",
    "check_repeat_kv", "check_apply_remainder", "check_layer_forward",
    "check_combine", "check_blocked_attention", "check_blocked_memory",
]

# Relative Frobenius error allowed against the float64 oracle (the course's accuracy contract).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.5e-3, torch.float16: 2.5e-3}
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5}

_NOT_ATTEMPTED = ("{check}: not attempted yet. `{fn}` still raises NotImplementedError: replace the "
                  "`raise NotImplementedError(...)` line with your code, run that cell, then run this check again.")


# --------------------------------------------------------------------------------------------------------------
# machinery shared by the checks

@contextlib.contextmanager
def _quiet():
    """Silence warnings and Python-level writes to stderr (nbgrader scores any stderr output as a failure)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _quietly(check):
    """Runs a whole check under :func:`_quiet`: its own computations must not write to stderr either."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        with _quiet():
            return check(*args, **kwargs)
    return wrapper


def _name(fn):
    return getattr(fn, "__name__", None) or type(fn).__name__


def _call(check, fn, args, kwargs, case, hint="", label=None):
    """Run the learner's function quietly; turn its exceptions into an AssertionError that names the case."""
    label = label or _name(fn)
    try:
        with _quiet():
            return fn(*args, **kwargs)
    except NotImplementedError:
        raise AssertionError(_NOT_ATTEMPTED.format(check=check, fn=label)) from None
    except Exception as exc:  # the learner's error, reported with the case that triggered it
        message = f"{check}: `{label}` raised {type(exc).__name__}: {exc}\n  case: {case}"
        if hint:
            message += f"\n  hint: {hint}"
        raise AssertionError(message) from exc


def _as_float64(x, check, what, case):
    """The learner's result as a float64 CPU tensor (accepts torch tensors, numpy arrays, numbers)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError):
        raise AssertionError(f"{check}: {what} should be an array of numbers, got {type(x).__name__}\n"
                             f"  case: {case}") from None


def _unpack(result, n, check, fn, case, names):
    if not isinstance(result, (tuple, list)) or len(result) != n:
        got = type(result).__name__ if not isinstance(result, (tuple, list)) else f"{len(result)} values"
        raise AssertionError(f"{check}: `{_name(fn)}` should return {n} values ({', '.join(names)}), got {got}\n"
                             f"  case: {case}")
    return result


def _fmt_index(index):
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def _compare(check, got, ref, tol, case, hint, what="the output", *, elementwise=False):
    """Fail unless ``got`` matches ``ref`` (float64) within ``tol``; the message names the worst entry.

    A result returned in bfloat16 or float16 cannot beat the rounding of the exact answer to that dtype: where that
    rounding alone exceeds the tolerance (a handful of entries, e.g. T = 1), the tolerance is 1.5 times it.
    """
    if isinstance(got, torch.Tensor) and got.dtype in (torch.bfloat16, torch.float16) and ref.numel():
        tol = max(tol, 1.5 * rel_err(ref.to(got.dtype), ref))
    got = _as_float64(got, check, what, case)
    if tuple(got.shape) != tuple(ref.shape):
        raise AssertionError(f"{check}: {what} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}\n"
                             f"  case: {case}")
    if ref.numel() == 0:
        return 0.0
    bad = ~torch.isfinite(got) & torch.isfinite(ref)
    if bool(bad.any()):
        index = np.unravel_index(int(bad.flatten().nonzero()[0]), tuple(ref.shape))
        raise AssertionError(f"{check}: {what} holds {float(got[index])} (not finite) at index {_fmt_index(index)}, "
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
    if not err <= tol:
        index = np.unravel_index(worst, tuple(ref.shape))
        raise AssertionError(
            f"{check}: {what} is wrong for {case}\n"
            f"  {measure} {err:.2e} > tolerance {tol:.1e}; worst entry at index {_fmt_index(index)}: "
            f"got {float(got[index]):.10g}, expected {float(ref[index]):.10g}\n"
            f"  hint: {hint}")
    return err


def _verdict(check, n_cases, detail, worst=None):
    extra = "" if worst is None else f"; worst relative error {worst:.1e}"
    print(f"{check}: passed, {n_cases} cases ({detail}{extra}).")


def _case(**fields):
    parts = []
    for key, value in fields.items():
        if isinstance(value, torch.dtype):
            value = str(value).replace("torch.", "")
        elif isinstance(value, str) and key == "regime":
            value = repr(value)
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _logits(regime, T, seed, D=16, dtype=torch.float64):
    """A (T, T) logits matrix of one regime: the scaled q.k of one head of :func:`make_inputs`."""
    q, k, _ = make_inputs(regime, B=1, Hq=1, T=T, D=D, dtype=torch.float64, seed=seed)
    return ((q[0, 0] @ k[0, 0].T) * D ** -0.5).to(dtype)


def _weights_hint(got, ref, attend_current):
    """A hint that names the most likely mistake in a weight matrix."""
    got = _as_float64(got, "", "", "")
    if got.shape != ref.shape or got.shape[-1] == 0:
        return "return one weight per (query, key) pair: shape (..., T, T)."
    T = got.shape[-1]
    above = torch.ones(T, T, dtype=torch.bool).triu(0 if not attend_current else 1)
    if bool((got.masked_fill(~above, 0) != 0).any()):
        if not attend_current and bool((got.diagonal(dim1=-2, dim2=-1) != 0).any()):
            return ("the diagonal must be 0 when attend_current=False: query i sees keys j < i only "
                    "(j <= i with attend_current=True).")
        return "query i must never see a key j > i (its own key only with attend_current=True): the matrix is causal."
    if attend_current and T > 1 and bool((got.diagonal(dim1=-2, dim2=-1) == 0).all()):
        return "with attend_current=True query i also sees key i: the diagonal holds beta_ii, the nearest key's share."
    first = 0 if attend_current else 1  # the rows that see at least one key
    sums, ref_sums = got.sum(-1)[..., first:], ref.sum(-1)[..., first:]
    if sums.numel() and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-6)) \
            and not bool(torch.allclose(ref_sums, torch.ones_like(ref_sums), atol=1e-6)):
        return ("your rows sum to 1, like softmax; stick-breaking rows sum to 1 - remainder <= 1. "
                "Each key takes beta of what nearer keys left: nothing is normalised.")
    return ("walk back from the query, nearest key first: A[i, j] = beta[i, j] * prod_{j<k<i} (1 - beta[i, k]). "
            "Check the order of the walk and which keys the product runs over.")


def _row_hint(got, ref_row, i, attend_current):
    """A hint for the weights of one query."""
    got = _as_float64(got, "", "", "")
    if got.shape != ref_row.shape:
        return "return one weight per key: an array of the same length T as z_row."
    nearest = i if attend_current else i - 1
    if bool((got[nearest + 1:] != 0).any()):
        if not attend_current and got[i] != 0:
            return "query i sees keys j < i only: weight i must be 0 unless attend_current=True."
        return "query i never sees a key j > i: those weights must be 0."
    if attend_current and got[i] == 0 and ref_row[i] != 0:
        return "with attend_current=True query i also sees key i: it is the nearest key and takes the first share."
    if nearest >= 1 and abs(float(got.sum()) - 1) < 1e-9 and abs(float(ref_row.sum()) - 1) > 1e-6:
        return ("your weights sum to 1, like softmax; stick-breaking weights sum to 1 - remainder <= 1: each key "
                "takes beta of what nearer keys left, and nothing is normalised.")
    return ("start with a stick of length 1 at the nearest key and walk back to key 0: each key takes beta = "
            "sigmoid(z) of what is left, and the stick shrinks by (1 - beta).")


# --------------------------------------------------------------------------------------------------------------
# lesson 00: setup

@_quietly
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
        got = _call(check, sigmoid, (z.copy(),), {}, case)
        ref = torch.sigmoid(torch.as_tensor(z, dtype=torch.float64))
        _compare(check, got, ref, 1e-12, case, elementwise=True,
                 hint="1 / (1 + exp(-z)) overflows for very negative z; for z < 0 use exp(z) / (1 + exp(z)) "
                      "(np.where picks per entry; np.exp(-np.abs(z)) never overflows).")
    _verdict(check, len(cases), "float64, |z| up to 1000")


# --------------------------------------------------------------------------------------------------------------
# lesson 01: stick-breaking in numpy

@_quietly
def check_weights_for_query(weights_for_query, *, seed=0, sizes=(9, 1, 2, 33)):
    """Lesson 01: ``weights_for_query(z_row, i, attend_current=False)`` -> the (T,) weights of query i."""
    check = "check_weights_for_query"
    n = 0
    for regime in REGIMES:
        for T in sizes:
            z = _logits(regime, T, seed + T)
            for attend_current in (False, True):
                ref = _ref_weights(z, attend_current=attend_current)
                for i in sorted({0, 1 % T, T // 2, T - 1}):
                    case = _case(regime=regime, T=T, i=i, attend_current=attend_current)
                    got = _call(check, weights_for_query, (z[i].numpy().copy(), i),
                                {"attend_current": attend_current}, case)
                    hint = _row_hint(got, ref[i], i, attend_current)
                    _compare(check, got, ref[i], 1e-12, case, hint, what=f"the weights of query {i}")
                    n += 1
    _verdict(check, n, f"regimes {', '.join(REGIMES)}; T in {tuple(sizes)}; attend_current both ways")


@_quietly
def check_weight_matrix(weight_matrix, *, seed=0, sizes=(17, 1, 2, 48)):
    """Lesson 01: ``weight_matrix(z, attend_current=False)`` -> the (T, T) stick-breaking weights."""
    check = "check_weight_matrix"
    n, worst = 0, 0.0
    for regime in REGIMES:
        for T in sizes:
            z = _logits(regime, T, seed + 3 * T)
            for attend_current in (False, True):
                case = _case(regime=regime, T=T, attend_current=attend_current)
                got = _call(check, weight_matrix, (z.numpy().copy(),), {"attend_current": attend_current}, case)
                ref = _ref_weights(z, attend_current=attend_current)
                hint = _weights_hint(got, ref, attend_current)
                worst = max(worst, _compare(check, got, ref, 1e-12, case, hint, what="the weight matrix"))
                n += 1
    _verdict(check, n, f"regimes {', '.join(REGIMES)}; T in {tuple(sizes)}; attend_current both ways", worst)


@_quietly
def check_attention_numpy(attention_numpy, *, seed=0, shapes=((7, 12, 5), (1, 16, 16), (40, 24, 24))):
    """Lesson 01: ``attention_numpy(q, k, v, attend_current=False)`` on one head -> ``(o, rem)``.

    ``shapes`` lists (T, D, Dv); q, k are (T, D), v is (T, Dv), the scale is 1/sqrt(D).
    """
    check = "check_attention_numpy"
    n, worst = 0, 0.0
    for regime in REGIMES:
        for T, D, Dv in shapes:
            q, k, v = make_inputs(regime, B=1, Hq=1, T=T, D=D, Dv=Dv, dtype=torch.float64, seed=seed + T)
            for attend_current in (False, True):
                case = _case(regime=regime, q=(T, D), v=(T, Dv), attend_current=attend_current)
                args = tuple(x[0, 0].numpy().copy() for x in (q, k, v))
                result = _call(check, attention_numpy, args, {"attend_current": attend_current}, case)
                o, rem = _unpack(result, 2, check, attention_numpy, case, ("o", "rem"))
                o_ref, rem_ref = oracle_attention(q, k, v, attend_current=attend_current)
                worst = max(worst, _compare(
                    check, o, o_ref[0, 0], 1e-10, case, what="o",
                    hint="o[i] = sum_j A[i, j] v[j] with the logits z = q @ k.T / sqrt(D) (D is q's last dim)."))
                worst = max(worst, _compare(
                    check, rem, rem_ref[0, 0], 1e-10, case, what="rem",
                    hint="rem[i] = prod_j (1 - beta[i, j]) over the keys query i sees: 1 when it sees none."))
                n += 1
    _verdict(check, n, f"regimes {', '.join(REGIMES)}; (T, D, Dv) in {tuple(shapes)}; attend_current both ways",
             worst)


# --------------------------------------------------------------------------------------------------------------
# lesson 02: numerics and log space

@_quietly
def check_log_sigmoids(log_sigmoids, *, seed=0, n=400):
    """Lesson 02: ``log_sigmoids(z)`` -> ``(log(beta), log(1 - beta))``, accurate entry by entry."""
    check = "check_log_sigmoids"
    gen = torch.Generator().manual_seed(seed)
    limits = {torch.float64: 700.0, torch.float32: 80.0}
    tol = {torch.float64: 1e-9, torch.float32: 1e-5}
    count = 0
    for dtype, limit in limits.items():
        z64 = torch.cat([torch.randn(n, generator=gen, dtype=torch.float64) * 4,
                         (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * limit,
                         torch.tensor([-limit, -30.0, -8.0, -1e-8, 0.0, 1e-8, 8.0, 30.0, limit], dtype=torch.float64)])
        z = z64.to(dtype)
        case = _case(dtype=dtype, shape=tuple(z.shape), range=f"|z| <= {limit:g}")
        result = _call(check, log_sigmoids, (z.clone(),), {}, case)
        log_beta, log_keep = _unpack(result, 2, check, log_sigmoids, case, ("log(beta)", "log(1 - beta)"))
        zr = z.double()
        _compare(check, log_beta, F.logsigmoid(zr), tol[dtype], case, elementwise=True, what="log(beta)",
                 hint="log(sigmoid(z)) is log(0) = -inf once sigmoid(z) underflows (z very negative) and 0 once it "
                      "rounds to 1; use log(sigmoid(z)) = -softplus(-z) (torch.nn.functional.logsigmoid).")
        _compare(check, log_keep, F.logsigmoid(-zr), tol[dtype], case, elementwise=True, what="log(1 - beta)",
                 hint="1 - sigmoid(z) cancels: it is 0 once sigmoid(z) rounds to 1, and loses digits long before. "
                      "Use log(1 - sigmoid(z)) = log(sigmoid(-z)) = -softplus(z).")
        count += 1
    _verdict(check, count, "float64 and float32, each entry to its own relative precision")


@_quietly
def check_reverse_exclusive_cumsum(reverse_exclusive_cumsum, *, seed=0, shapes=((1,), (5,), (3, 8), (2, 3, 33))):
    """Lesson 02: ``reverse_exclusive_cumsum(x)``: ``out[..., j] = sum_{k > j} x[..., k]`` along the last dim."""
    check = "check_reverse_exclusive_cumsum"
    gen = torch.Generator().manual_seed(seed)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        case = _case(shape=shape, dtype=torch.float64)
        got = _call(check, reverse_exclusive_cumsum, (x.clone(),), {}, case)
        ref = _ref_reverse_exclusive_cumsum(x)
        hint = "out[..., j] sums the entries strictly after j (the last entry gets 0), along the last dimension."
        g = _as_float64(got, check, "the output", case)
        if g.shape == ref.shape and torch.allclose(g, ref + x):
            hint = "your sum includes x[..., j] itself: the exclusive sum starts at k = j + 1."
        elif g.shape == ref.shape and x.shape[-1] > 1 and torch.allclose(g, F.pad(x.cumsum(-1)[..., :-1], (1, 0))):
            hint = "you summed the entries before j; the reverse sum runs over the entries after j (flip, cumsum, flip)."
        _compare(check, got, ref, 1e-12, case, hint)
    _verdict(check, len(shapes), f"shapes {tuple(shapes)}")


@_quietly
def check_stable_weights(stable_weights, *, seed=0, sizes=(7, 1, 64, 300), dtypes=(torch.float64, torch.float32,
                                                                                  torch.bfloat16)):
    """Lesson 02: ``stable_weights(logits, attend_current=False)`` on (..., T, T) tensors, in every regime and dtype."""
    check = "check_stable_weights"
    n, worst = 0, {}
    for regime in REGIMES:
        for T in sizes:
            for dtype in dtypes:
                for attend_current in (False, True):
                    q, k, _ = make_inputs(regime, B=1, Hq=2, T=T, D=16, dtype=torch.float64, seed=seed + T)
                    z = ((q @ k.transpose(-1, -2)) * 0.25).to(dtype)
                    case = _case(regime=regime, logits=tuple(z.shape), dtype=dtype, attend_current=attend_current)
                    got = _call(check, stable_weights, (z.clone(),), {"attend_current": attend_current}, case)
                    ref = _ref_weights(z.double(), attend_current=attend_current)
                    hint = _weights_hint(got, ref, attend_current)
                    if hint.startswith("walk back"):
                        hint = ("never form the product in linear space: log A = log beta + (reverse exclusive "
                                "cumsum of log(1 - beta)); for bfloat16/float16 logits compute in float32.")
                    err = _compare(check, got, ref, TOLERANCE[dtype], case, hint, what="the weights")
                    worst[dtype] = max(worst.get(dtype, 0.0), err)
                    n += 1
    detail = "; ".join(f"{str(d).replace('torch.', '')} worst {e:.1e}" for d, e in worst.items())
    _verdict(check, n, f"regimes {', '.join(REGIMES)}; T in {tuple(sizes)}; attend_current both ways; {detail}")


_ATTENTION_SHAPES = ((2, 2, 37, 48, 48), (1, 2, 1, 16, 16), (1, 3, 64, 24, 40))


def _attention_cases(check, attention, seed, shapes, dtypes, regimes, extra_kwargs=None):
    """Run an ``attention(q, k, v, ..., attend_current) -> (o, rem)`` over regimes, shapes, dtypes; return worst errors."""
    worst, n = {}, 0
    for regime in regimes:
        for B, H, T, D, Dv in shapes:
            for dtype in dtypes:
                for attend_current in (False, True):
                    q, k, v = make_inputs(regime, B=B, Hq=H, T=T, D=D, Dv=Dv, dtype=dtype, seed=seed + T + D)
                    for kwargs in (extra_kwargs or [{}]):
                        case = _case(regime=regime, dtype=dtype, q=(B, H, T, D), v=(B, H, T, Dv),
                                     attend_current=attend_current, **kwargs)
                        result = _call(check, attention, (q.clone(), k.clone(), v.clone()),
                                       {"attend_current": attend_current, **kwargs}, case)
                        o, rem = _unpack(result, 2, check, attention, case, ("o", "rem"))
                        o_ref, rem_ref = oracle_attention(q, k, v, attend_current=attend_current,
                                                          scale=kwargs.get("scale"))
                        hint = ("o = A @ v with A from your stable weights of the logits scale * q @ k^T "
                                "(scale = 1/sqrt(D) by default); for bfloat16/float16 inputs compute in float32.")
                        err = _compare(check, o, o_ref, TOLERANCE[dtype], case, hint, what="o")
                        err = max(err, _compare(
                            check, rem, rem_ref, TOLERANCE[dtype], case, what="rem",
                            hint="rem = exp(sum of log(1 - beta) over the keys the query sees): 1 for a query that "
                                 "sees no key; compute it from the log-space sum, never as 1 - sum(A)."))
                        worst[dtype] = max(worst.get(dtype, 0.0), err)
                        n += 1
    return n, worst


@_quietly
def check_stable_attention(stable_attention, *, seed=0, shapes=_ATTENTION_SHAPES,
                           dtypes=(torch.float64, torch.float32, torch.bfloat16), regimes=REGIMES):
    """Lesson 02: ``stable_attention(q, k, v, scale=None, attend_current=False)`` -> ``(o, rem)``.

    ``shapes`` lists (B, H, T, D, Dv). Tolerances: float64 1e-12, float32 1e-5, bfloat16 2.5e-3.
    """
    check = "check_stable_attention"
    n, worst = _attention_cases(check, stable_attention, seed, shapes, dtypes, regimes,
                                extra_kwargs=[{}, {"scale": 0.3}])
    detail = "; ".join(f"{str(d).replace('torch.', '')} worst {e:.1e}" for d, e in worst.items())
    _verdict(check, n, f"regimes {', '.join(regimes)}; (B, H, T, D, Dv) in {tuple(shapes)}; {detail}")


class _BrokenBackward(torch.autograd.Function):
    """Stick-breaking attention whose backward is wrong on purpose (drops the gradient through the stick)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        o, rem = oracle_attention(q, k, v)
        return o.to(q.dtype), rem.to(q.dtype)

    @staticmethod
    def backward(ctx, do, drem):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            z = (qq @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
            A = torch.sigmoid(z).tril(-1)  # forgets the (1 - beta) factors
            o = A @ vv
            return torch.autograd.grad(o, (qq, kk, vv), do)


def _broken_attention(q, k, v, scale=None, attend_current=False):
    return _BrokenBackward.apply(q, k, v)


def _good_attention(q, k, v, scale=None, attend_current=False):
    """A correct, differentiable stick-breaking attention (plain autograd through the log-space weights)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z = scale * q @ k.transpose(-1, -2)
    T = z.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool, device=z.device).tril(0 if attend_current else -1)
    rem = F.logsigmoid(-z).masked_fill(~seen, 0.0).sum(-1).exp()
    return _ref_weights(z, attend_current=attend_current) @ v, rem


@_quietly
def check_gradcheck_attention(gradcheck_attention):
    """Lesson 02: ``gradcheck_attention(attention) -> bool`` runs ``torch.autograd.gradcheck`` on ``attention``.

    It must accept a correct attention and reject one whose backward is wrong (returning False or raising
    gradcheck's error both count as rejecting).
    """
    check = "check_gradcheck_attention"

    def verdict(attention, case):
        try:
            with _quiet():
                return bool(gradcheck_attention(attention))
        except NotImplementedError:
            raise AssertionError(_NOT_ATTEMPTED.format(check=check, fn=_name(gradcheck_attention))) from None
        except GradcheckError:
            return False
        except Exception as exc:
            raise AssertionError(f"{check}: `{_name(gradcheck_attention)}` raised {type(exc).__name__}: {exc}\n"
                                 f"  case: {case}\n  hint: build small float64 q, k, v with requires_grad=True and "
                                 "call torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v), (q, k, v)).") from exc

    if not verdict(_good_attention, "a correct stick-breaking attention"):
        raise AssertionError(f"{check}: your gradcheck rejected a correct attention.\n"
                             "  hint: gradcheck compares against finite differences, which need float64 inputs "
                             "(torch.float64) to be accurate; keep the inputs small (T <= 8) and pass them with "
                             "requires_grad=True.")
    if verdict(_broken_attention, "an attention with a wrong backward"):
        raise AssertionError(f"{check}: your gradcheck accepted an attention whose backward is wrong.\n"
                             "  hint: call torch.autograd.gradcheck on the attention you are given (both of its "
                             "outputs, o and rem, count) and return what it says.")
    _verdict(check, 2, "accepts a correct backward, rejects a wrong one")


@_quietly
def check_attention_gradients(stable_attention, *, seed=0, shapes=((1, 2, 13, 12, 5), (1, 2, 1, 8, 8)),
                              regimes=REGIMES):
    """Lesson 02: the gradients of ``stable_attention`` (through o and rem) against the float64 oracle's."""
    check = "check_attention_gradients"
    n, worst = 0, 0.0
    for regime in regimes:
        for B, H, T, D, Dv in shapes:
            for attend_current in (False, True):
                q, k, v = make_inputs(regime, B=B, Hq=H, T=T, D=D, Dv=Dv, dtype=torch.float64, seed=seed + T)
                gen = torch.Generator().manual_seed(seed + 1)
                do = torch.randn(B, H, T, Dv, generator=gen, dtype=torch.float64)
                drem = torch.randn(B, H, T, generator=gen, dtype=torch.float64)
                case = _case(regime=regime, dtype=torch.float64, q=(B, H, T, D), v=(B, H, T, Dv),
                             attend_current=attend_current)
                inputs = [x.clone().requires_grad_() for x in (q, k, v)]
                result = _call(check, stable_attention, tuple(inputs), {"attend_current": attend_current}, case)
                o, rem = _unpack(result, 2, check, stable_attention, case, ("o", "rem"))
                if not (isinstance(o, torch.Tensor) and o.requires_grad):
                    raise AssertionError(f"{check}: o does not depend on q, k, v through autograd\n  case: {case}\n"
                                         "  hint: stay in PyTorch (no numpy, no .detach(), no .item()) so that "
                                         "autograd can follow the computation.")
                try:
                    with _quiet():
                        loss = (o.double() * do).sum() + (rem.double() * drem).sum()
                        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                except Exception as exc:
                    raise AssertionError(f"{check}: backward through your attention failed with "
                                         f"{type(exc).__name__}: {exc}\n  case: {case}") from exc
                refs = [x.clone().requires_grad_() for x in (q, k, v)]
                o_ref, rem_ref = _good_attention(*refs, attend_current=attend_current)
                ref_grads = torch.autograd.grad((o_ref * do).sum() + (rem_ref * drem).sum(), refs)
                for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
                    g = torch.zeros_like(r) if g is None else g
                    worst = max(worst, _compare(
                        check, g, r, GRAD_TOLERANCE[torch.float64], case, what=name,
                        hint="NaN or inf gradients come from log(1 - sigmoid(z)) or log(sigmoid(z)) taken naively "
                             "(their derivatives divide by 1 - beta or beta, which round to 0); use logsigmoid, and "
                             "mask with masked_fill/where (not multiplication by a mask, since inf * 0 = NaN)."))
                n += 1
    _verdict(check, n, f"float64; regimes {', '.join(regimes)}; gradients of o and rem", worst)


# --------------------------------------------------------------------------------------------------------------
# lesson 03: the attention layer

@_quietly
def check_repeat_kv(repeat_kv, *, seed=0):
    """Lesson 03: ``repeat_kv(x, n_rep)``: (B, Hk, T, D) -> (B, Hk * n_rep, T, D); query head h uses kv head h // n_rep."""
    check = "check_repeat_kv"
    gen = torch.Generator().manual_seed(seed)
    cases = [((2, 1, 5, 3), 4), ((1, 3, 7, 6), 2), ((1, 2, 1, 5), 1), ((2, 4, 3, 2), 3)]
    for shape, n_rep in cases:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        case = _case(x=shape, n_rep=n_rep)
        got = _call(check, repeat_kv, (x.clone(), n_rep), {}, case)
        ref = x.repeat_interleave(n_rep, dim=1)
        hint = "query head h reads kv head h // n_rep: heads are repeated in place (0, 0, 1, 1), not tiled (0, 1, 0, 1)."
        _compare(check, got, ref, 0.0, case, hint)
    _verdict(check, len(cases), "Hk in 1..4, n_rep in 1..4")


def _ref_apply_remainder(o, rem, v, mode, bias):
    B, Hq, T, Dv = o.shape
    Hk = v.shape[1]
    r = rem.unsqueeze(-1)
    if mode == "self":
        return o + r * v.repeat_interleave(Hq // Hk, dim=1)
    if mode == "bias":
        return o + r * bias[None, :, None, :]
    return o


@_quietly
def check_apply_remainder(apply_remainder, *, seed=0):
    """Lesson 03: ``apply_remainder(o, rem, v, mode, bias=None)`` for mode "self", "bias" and "none", with GQA."""
    check = "check_apply_remainder"
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for B, Hq, Hk, T, Dv in ((1, 2, 2, 1, 4), (2, 4, 2, 9, 6), (1, 6, 2, 5, 3), (1, 3, 1, 4, 5)):
        for mode in ("self", "bias", "none"):
            o = torch.randn(B, Hq, T, Dv, generator=gen, dtype=torch.float64)
            rem = torch.rand(B, Hq, T, generator=gen, dtype=torch.float64)
            v = torch.randn(B, Hk, T, Dv, generator=gen, dtype=torch.float64)
            bias = torch.randn(Hq, Dv, generator=gen, dtype=torch.float64) if mode == "bias" else None
            case = _case(mode=mode, o=(B, Hq, T, Dv), v=(B, Hk, T, Dv))
            got = _call(check, apply_remainder, (o.clone(), rem.clone(), v.clone(), mode),
                        {"bias": None if bias is None else bias.clone()}, case)
            hints = {"self": "add rem[..., None] * v of the query's own position, taken from the query head's "
                             "kv head (h // (Hq // Hk)).",
                     "bias": "add rem[..., None] * bias[h], the learned vector of query head h.",
                     "none": "mode 'none' drops the remainder: return o unchanged."}
            _compare(check, got, _ref_apply_remainder(o, rem, v, mode, bias), 1e-14, case, hints[mode])
            n += 1
    _verdict(check, n, "modes self, bias, none; with and without GQA")


@_quietly
def check_layer_forward(layer_class, *, seed=0, configs=None):
    """Lesson 03: a layer class with ``StickBreakingSelfAttention``'s constructor and parameters, whose forward the
    learner wrote; its output must match ``sb_ref.StickBreakingSelfAttention`` with the same weights (float64)."""
    check = "check_layer_forward"
    if configs is None:
        configs = [dict(embed_dim=32, num_heads=4, T=9, B=2),
                   dict(embed_dim=24, num_heads=2, T=1, B=1),
                   dict(embed_dim=48, num_heads=4, num_kv_heads=2, T=11, B=1),
                   dict(embed_dim=30, num_heads=6, num_kv_heads=2, T=7, B=2)]
    n = 0
    for config in configs:
        config = dict(config)
        T, B = config.pop("T"), config.pop("B")
        for remainder in ("self", "bias", "none"):
            for attend_current in (False, True):
                kwargs = dict(config, remainder=remainder, attend_current=attend_current)
                case = _case(**kwargs, x=(B, T, config["embed_dim"]))
                torch.manual_seed(seed + n)
                ref = StickBreakingSelfAttention(**kwargs, backend="torch").double()
                if ref.remainder_bias is not None:
                    with torch.no_grad():
                        ref.remainder_bias.normal_()
                layer = _call(check, layer_class, (), kwargs, case,
                              hint="keep the constructor you were given; write forward only.")
                try:
                    layer = layer.double()
                    layer.load_state_dict(ref.state_dict())
                except Exception as exc:
                    raise AssertionError(f"{check}: could not give your layer the reference weights: {exc}\n"
                                         f"  case: {case}\n  hint: keep the parameter names of the constructor "
                                         "you were given (q_proj, k_proj, v_proj, out_proj, remainder_bias).") from exc
                x = torch.randn(B, T, config["embed_dim"], dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed + n))
                got = _call(check, layer, (x.clone(),), {}, case, label=f"{_name(layer_class)}.forward")
                with torch.no_grad(), _quiet():
                    want = ref(x)
                hint = ("project x to q (Hq heads), k and v (Hk heads) of head_dim each, shape (B, H, T, head_dim); "
                        "run stick-breaking attention with the remainder; add the remainder as the mode says; "
                        "merge the heads back to (B, T, E) and apply out_proj.")
                _compare(check, got, want, 1e-12, case, hint, what="the layer's output")
                n += 1
    _verdict(check, n, "remainder self/bias/none; attend_current both ways; with and without GQA; T = 1")


# --------------------------------------------------------------------------------------------------------------
# lesson 04: tiles

def _segment_attention(q, k, v, start, end, *, scale=None, attend_current=False):
    """Stick-breaking attention of every query over the keys in ``[start, end)`` only (float64).

    Returns ``(o, log_rem)``: the segment's output and the sum of ``log(1 - beta)`` over the segment's visible keys.
    Two segments (``near`` closer to the query than ``far``) combine as ``o = o_near + exp(S_near) * o_far``.
    """
    q, k, v = (x.detach().double() for x in (q, k, v))
    T = q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z = scale * q @ k.transpose(-1, -2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = ((j <= i) if attend_current else (j < i)) & (j >= start) & (j < end)
    log_keep = F.logsigmoid(-z).masked_fill(~seen, 0.0)
    log_A = F.logsigmoid(z) + _ref_reverse_exclusive_cumsum(log_keep)
    return log_A.exp().masked_fill(~seen, 0.0) @ v, log_keep.sum(-1)


@_quietly
def check_combine(combine, *, seed=0):
    """Lesson 04: ``combine(near, far)`` with ``near = (o_near, S_near)``, ``far = (o_far, S_far)`` -> ``(o, S)``."""
    check = "check_combine"
    n = 0
    for regime in REGIMES:
        for T, split in ((12, 5), (1, 0), (30, 29), (30, 0)):
            q, k, v = make_inputs(regime, B=1, Hq=2, T=T, D=8, Dv=3, dtype=torch.float64, seed=seed + T + split)
            far = _segment_attention(q, k, v, 0, split)
            near = _segment_attention(q, k, v, split, T)
            case = _case(regime=regime, T=T, far_keys=f"[0, {split})", near_keys=f"[{split}, {T})")
            result = _call(check, combine, (tuple(x.clone() for x in near), tuple(x.clone() for x in far)), {}, case)
            o, S = _unpack(result, 2, check, combine, case, ("o", "log_rem"))
            o_ref, rem_ref = oracle_attention(q, k, v)
            _compare(check, o, o_ref, 1e-12, case, what="o",
                     hint="the far segment only gets the stick the near segment left: o = o_near + exp(S_near) * o_far "
                          "(S is per query, so broadcast it over the value dim).")
            _compare(check, S, rem_ref.log(), 1e-12, case, what="log_rem",
                     hint="log-remainders of consecutive segments add: S = S_near + S_far.")
            n += 1
    _verdict(check, n, "regimes random, long, saturated; splits at 0, in the middle and next to the end")


_BLOCK_CASES = ((37, (5, 16, 64)), (1, (1, 16)), (7, (1, 3, 7)), (64, (8, 64)))


@_quietly
def check_blocked_attention(blocked_attention, *, seed=0, cases=_BLOCK_CASES, dtypes=(torch.float64, torch.float32),
                            regimes=REGIMES, D=12, Dv=20):
    """Lesson 04: ``blocked_attention(q, k, v, block, attend_current=False)`` -> ``(o, rem)`` for every block size.

    ``cases`` lists (T, block sizes); the head dims D and Dv need not be powers of two.
    """
    check = "check_blocked_attention"
    n, worst = 0, {}
    for regime in regimes:
        for T, blocks in cases:
            for dtype in dtypes:
                q, k, v = make_inputs(regime, B=1, Hq=2, T=T, D=D, Dv=Dv, dtype=dtype, seed=seed + T)
                for attend_current in (False, True):
                    o_ref, rem_ref = oracle_attention(q, k, v, attend_current=attend_current)
                    for block in blocks:
                        case = _case(regime=regime, dtype=dtype, q=tuple(q.shape), v=tuple(v.shape), block=block,
                                     attend_current=attend_current)
                        result = _call(check, blocked_attention, (q.clone(), k.clone(), v.clone(), block),
                                       {"attend_current": attend_current}, case)
                        o, rem = _unpack(result, 2, check, blocked_attention, case, ("o", "rem"))
                        hint = ("walk the key blocks from the diagonal block back to block 0, adding the carry "
                                "(sum of log(1 - beta) of the keys already visited) to log A inside each tile; mask "
                                "the diagonal tile, and the padding when T is not a multiple of the block.")
                        if T % block:
                            hint += f" Here T = {T} is not a multiple of block = {block}: the last block is short."
                        err = _compare(check, o, o_ref, TOLERANCE[dtype], case, hint, what="o")
                        err = max(err, _compare(check, rem, rem_ref, TOLERANCE[dtype], case, hint, what="rem"))
                        worst[dtype] = max(worst.get(dtype, 0.0), err)
                        n += 1
    detail = "; ".join(f"{str(d).replace('torch.', '')} worst {e:.1e}" for d, e in worst.items())
    _verdict(check, n, f"regimes {', '.join(regimes)}; T and blocks {tuple(cases)}; {detail}")


@_quietly
def _probe_memory(check, call, fn, args, case, prerequisite, who, hint):
    """Runs ``fn(*args)`` (args = q, k, v, ...: float32, one head) under the allocation probe, through ``call`` (a
    check's way of calling learner code): its o must match the oracle (``prerequisite`` is the check that tests
    it) and no single allocation may reach T * T / 8 elements. Returns the probe."""
    q, k, v = args[:3]
    T = q.shape[-2]
    result, probe = call(check, probed_call, (fn, args), {}, case, label=_name(fn))
    o, rem = _unpack(result, 2, check, fn, case, ("o", "rem"))
    o_ref, _ = oracle_attention(q, k, v)
    _compare(check, o, o_ref, TOLERANCE[torch.float32], case, what="o",
             hint=f"the memory check needs a correct result first: pass {prerequisite}.")
    limit = T * T // 8
    if probe.numel > limit:
        raise AssertionError(
            f"{check}: your {who} allocated a tensor of {probe.numel} elements (shape {probe.shape}, made by "
            f"{probe.op}) for {case}; T * T = {T * T}, and the limit is T * T / 8 = {limit}.\n  hint: {hint}")
    return probe


def check_blocked_memory(blocked_attention, *, T=384, block=32, D=16, seed=0):
    """Lesson 04: ``blocked_attention`` never allocates anything near T * T (probed with :class:`LargestAllocation`)."""
    check = "check_blocked_memory"
    q, k, v = make_inputs("random", B=1, Hq=1, T=T, D=D, dtype=torch.float32, seed=seed)
    case = _case(q=tuple(q.shape), block=block, dtype=torch.float32)
    probe = _probe_memory(check, _call, blocked_attention, (q, k, v, block), case, "check_blocked_attention",
                          "function", "work one tile (block x block scores) at a time; keep per query row only the "
                          "output, the carry and nothing of length T per query.")
    print(f"{check}: passed; largest allocation {probe.numel} elements (shape {probe.shape}) for T = {T}, "
          f"block = {block}: {probe.numel / (T * T):.1%} of T * T.")
