"""The checks of lesson 02 (numerics and log space): the log-sigmoids, the reverse exclusive cumsum, the stable
weights and attention in every regime and dtype, a gradcheck of the learner's own, and the gradients through o and
rem against the float64 oracle's.

They follow :mod:`sb_ref.testing.lessons.harness`: one verdict line, quiet on stderr, ``AssertionError`` naming the
case, the worst error, where it is, and a hint, and "not attempted yet" for a stub. The keyword arguments give the
hidden variants.
"""
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

from ... import weights
from ..core import REGIMES, make_inputs, oracle_attention
from . import references
from .harness import (TOLERANCE, as_float64, builds_on, call, compare, compare_remainder, fmt_case, name_of,
                      not_attempted, quiet, quietly, unpack, verdict, worst_by_dtype)
from .lesson01 import weights_hint

__all__ = ["check_log_sigmoids", "check_reverse_exclusive_cumsum", "check_stable_weights", "check_stable_attention",
           "check_gradcheck_attention", "check_attention_gradients"]


@quietly
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
        case = fmt_case(dtype=dtype, shape=tuple(z.shape), range=f"|z| <= {limit:g}")
        result = call(check, log_sigmoids, (z.clone(),), {}, case)
        log_beta, log_keep = unpack(result, 2, check, log_sigmoids, case, ("log(beta)", "log(1 - beta)"))
        zr = z.double()
        compare(check, log_beta, F.logsigmoid(zr), tol[dtype], case, elementwise=True, what="log(beta)",
                hint="log(sigmoid(z)) is log(0) = -inf once sigmoid(z) underflows (z very negative) and 0 once it "
                     "rounds to 1; use log(sigmoid(z)) = -softplus(-z) (torch.nn.functional.logsigmoid).")
        compare(check, log_keep, F.logsigmoid(-zr), tol[dtype], case, elementwise=True, what="log(1 - beta)",
                hint="1 - sigmoid(z) cancels: it is 0 once sigmoid(z) rounds to 1, and loses digits long before. "
                     "Use log(1 - sigmoid(z)) = log(sigmoid(-z)) = -softplus(z).")
        count += 1
    verdict(check, count, "float64 and float32, each entry to its own relative precision")


@quietly
def check_reverse_exclusive_cumsum(reverse_exclusive_cumsum, *, seed=0, shapes=((1,), (5,), (3, 8), (2, 3, 33))):
    """Lesson 02: ``reverse_exclusive_cumsum(x)``: ``out[..., j] = sum_{k > j} x[..., k]`` along the last dim."""
    check = "check_reverse_exclusive_cumsum"
    gen = torch.Generator().manual_seed(seed)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        case = fmt_case(shape=shape, dtype=torch.float64)
        got = call(check, reverse_exclusive_cumsum, (x.clone(),), {}, case)
        ref = weights.reverse_exclusive_cumsum(x)
        hint = "out[..., j] sums the entries strictly after j (the last entry gets 0), along the last dimension."
        g = as_float64(got, check, "the output", case)
        if g.shape == ref.shape and torch.allclose(g, ref + x):
            hint = "your sum includes x[..., j] itself: the exclusive sum starts at k = j + 1."
        elif g.shape == ref.shape and x.shape[-1] > 1 and torch.allclose(g, F.pad(x.cumsum(-1)[..., :-1], (1, 0))):
            hint = "you summed the entries before j; the reverse sum runs over the entries after j (flip, cumsum, flip)."
        compare(check, got, ref, 1e-12, case, hint)
    verdict(check, len(shapes), f"shapes {tuple(shapes)}")


@builds_on(("log_sigmoids", check_log_sigmoids), ("reverse_exclusive_cumsum", check_reverse_exclusive_cumsum))
@quietly
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
                    case = fmt_case(regime=regime, logits=tuple(z.shape), dtype=dtype, attend_current=attend_current)
                    got = call(check, stable_weights, (z.clone(),), {"attend_current": attend_current}, case)
                    ref = weights.stick_breaking_weights(z.double(), attend_current=attend_current)
                    hint = weights_hint(got, ref, attend_current)
                    if hint.startswith("walk back"):
                        hint = ("never form the product in linear space: log A = log beta + (reverse exclusive "
                                "cumsum of log(1 - beta)); for bfloat16/float16 logits compute in float32.")
                    err = compare(check, got, ref, TOLERANCE.output[dtype], case, hint, what="the weights")
                    worst[dtype] = max(worst.get(dtype, 0.0), err)
                    n += 1
    detail = worst_by_dtype(worst)
    verdict(check, n, f"regimes {', '.join(REGIMES)}; T in {tuple(sizes)}; attend_current both ways; {detail}")


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
                        case = fmt_case(regime=regime, dtype=dtype, q=(B, H, T, D), v=(B, H, T, Dv),
                                        attend_current=attend_current, **kwargs)
                        result = call(check, attention, (q.clone(), k.clone(), v.clone()),
                                      {"attend_current": attend_current, **kwargs}, case)
                        o, rem = unpack(result, 2, check, attention, case, ("o", "rem"))
                        o_ref, rem_ref = oracle_attention(q, k, v, attend_current=attend_current,
                                                          scale=kwargs.get("scale"))
                        hint = ("o = A @ v with A from your stable weights of the logits scale * q @ k^T "
                                "(scale = 1/sqrt(D) by default); for bfloat16/float16 inputs compute in float32.")
                        err = compare(check, o, o_ref, TOLERANCE.output[dtype], case, hint, what="o")
                        err = max(err, compare_remainder(
                            check, rem, rem_ref, TOLERANCE.output[dtype], case,
                            hint="rem = exp(sum of log(1 - beta) over the keys the query sees): 1 for a query that "
                                 "sees no key; compute it from the log-space sum, never as 1 - sum(A), which "
                                 "cancels to noise where the stick is nearly used up, and with the stable "
                                 "log(1 - beta) of Exercise 1 (check_log_sigmoids): a naive log(1 - sigmoid(z)) is "
                                 "-inf for large z, and the remainder 0."))
                        worst[dtype] = max(worst.get(dtype, 0.0), err)
                        n += 1
    return n, worst


@builds_on(("stable_weights", check_stable_weights))
@quietly
def check_stable_attention(stable_attention, *, seed=0, shapes=_ATTENTION_SHAPES,
                           dtypes=(torch.float64, torch.float32, torch.bfloat16), regimes=REGIMES):
    """Lesson 02: ``stable_attention(q, k, v, scale=None, attend_current=False)`` -> ``(o, rem)``.

    ``shapes`` lists (B, H, T, D, Dv). Tolerances: float64 1e-12, float32 1e-5, bfloat16 2.5e-3.
    """
    check = "check_stable_attention"
    n, worst = _attention_cases(check, stable_attention, seed, shapes, dtypes, regimes,
                                extra_kwargs=[{}, {"scale": 0.3}])
    detail = worst_by_dtype(worst)
    verdict(check, n, f"regimes {', '.join(regimes)}; (B, H, T, D, Dv) in {tuple(shapes)}; {detail}")


@quietly
def check_gradcheck_attention(gradcheck_attention):
    """Lesson 02: ``gradcheck_attention(attention) -> bool`` runs ``torch.autograd.gradcheck`` on ``attention``.

    It must accept a correct attention and reject one whose backward is wrong (returning False or raising
    gradcheck's error both count as rejecting).
    """
    check = "check_gradcheck_attention"

    def accepts(attention, case):
        try:
            with quiet():
                return bool(gradcheck_attention(attention))
        except NotImplementedError:
            raise not_attempted(check, f"`{name_of(gradcheck_attention)}`") from None
        except GradcheckError:
            return False
        except Exception as exc:
            raise AssertionError(f"{check}: `{name_of(gradcheck_attention)}` raised {type(exc).__name__}: {exc}\n"
                                 f"  case: {case}\n  hint: build small float64 q, k, v with requires_grad=True and "
                                 "call torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v), (q, k, v)).") from exc

    if not accepts(references.softmax_attention, "a correct attention (causal softmax)"):
        raise AssertionError(f"{check}: your gradcheck rejected a correct attention.\n"
                             "  hint: gradcheck compares against finite differences, which need float64 inputs "
                             "(torch.float64) to be accurate; keep the inputs small (T <= 8) and pass them with "
                             "requires_grad=True.")
    if accepts(references.broken_attention, "an attention whose backward is wrong"):
        raise AssertionError(f"{check}: your gradcheck accepted an attention whose backward is wrong.\n"
                             "  hint: call torch.autograd.gradcheck on the attention you are given (both of its "
                             "outputs, o and rem, count) and return what it says.")
    verdict(check, 2, "accepts a correct backward, rejects a wrong one")


@quietly
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
                case = fmt_case(regime=regime, dtype=torch.float64, q=(B, H, T, D), v=(B, H, T, Dv),
                                attend_current=attend_current)
                inputs = [x.clone().requires_grad_() for x in (q, k, v)]
                result = call(check, stable_attention, tuple(inputs), {"attend_current": attend_current}, case)
                o, rem = unpack(result, 2, check, stable_attention, case, ("o", "rem"))
                if not (isinstance(o, torch.Tensor) and o.requires_grad):
                    raise AssertionError(f"{check}: o does not depend on q, k, v through autograd\n  case: {case}\n"
                                         "  hint: stay in PyTorch (no numpy, no .detach(), no .item()) so that "
                                         "autograd can follow the computation.")
                try:
                    with quiet():
                        loss = (o.double() * do).sum() + (rem.double() * drem).sum()
                        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                except Exception as exc:
                    raise AssertionError(f"{check}: backward through your attention failed with "
                                         f"{type(exc).__name__}: {exc}\n  case: {case}") from exc
                refs = [x.clone().requires_grad_() for x in (q, k, v)]
                o_ref, rem_ref = references.good_attention(*refs, attend_current=attend_current)
                ref_grads = torch.autograd.grad((o_ref * do).sum() + (rem_ref * drem).sum(), refs)
                for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
                    g = torch.zeros_like(r) if g is None else g
                    worst = max(worst, compare(
                        check, g, r, TOLERANCE.gradient[torch.float64], case, what=name,
                        hint="NaN or inf gradients come from log(1 - sigmoid(z)) or log(sigmoid(z)) taken naively "
                             "(their derivatives divide by 1 - beta or beta, which round to 0); use logsigmoid, and "
                             "mask with masked_fill/where (not multiplication by a mask, since inf * 0 = NaN)."))
                n += 1
    verdict(check, n, f"float64; regimes {', '.join(regimes)}; gradients of o and rem", worst)

