"""The checks of lesson 07 (Triton backward): one per graded exercise.

- :func:`check_dl_and_dz`: the gradient of one head's logits in PyTorch, ``dl_and_dz(z, v, dO, g)``, against
  autograd in float64;
- :func:`check_dq`: the query-major kernel's launcher ``sb_backward_dq(q, k, v, dO, g)`` -> ``(dq, delta)``;
- :func:`check_dkdv`: the key-major kernel's launcher ``sb_backward_dkdv(q, k, v, dO, g, delta)`` -> ``(dk, dv)``;
- :func:`check_sb_attention`: the autograd function ``sb_attention(q, k, v, attend_current)`` -> ``(o, rem)``:
  the outputs, every gradient (through o and through rem), and bit-identical gradients over two runs.

The reference gradients come from ``sb_ref.stick_breaking_attention(..., backend="torch")`` on float64 inputs
(exact), with the loss ``(o * dO).sum() + (rem * dRem).sum()`` for random dO and dRem; ``g = dRem * rem``. The
kernels run on the GPU when there is one and through Triton's interpreter otherwise, in float32, judged at the
course's gradient tolerance (3e-5, relative Frobenius) against float64. Like every check they print one verdict
line, return None, keep stderr quiet, and raise ``AssertionError`` naming the case, the worst error, where it is,
and a hint; a launcher that still raises ``NotImplementedError``, or whose kernel does, is "not attempted yet".
"""
import torch
import torch.nn.functional as F

from ..core import REGIMES, make_inputs, rel_err
from .references import attention_gradients, tile_gradients, visible
from .harness import (TOLERANCE, builds_on, call, compare, default_device, find_stub, fmt_case, not_attempted,
                      quiet, quietly, unpack, verdict)

__all__ = ["check_dl_and_dz", "check_dq", "check_dkdv", "check_sb_attention"]

GRAD_TOL = TOLERANCE.gradient[torch.float32]  # 3e-5: the course's float32 gradient contract
# dk from a delta that the kernel did not sum itself (the check hands it a float64 delta rounded to float32): where
# the stick is used up, C = delta - R - (tile sum) is a difference of nearly equal sums, and a delta off by one
# rounding moves dk by up to ~2e-5 in the saturated regime. Lesson 07 explains; check_sb_attention holds dk to 3e-5.
DK_TOL_GIVEN_DELTA = 1e-4

_KERNEL_CASES = ((1, 2, 29, 16, 24, 16, 16), (1, 2, 1, 16, 16, 16, 16))


# --------------------------------------------------------------------------------------------------------------
# inputs

def _kernel_inputs(regime, B, H, T, D, Dv, seed):
    """float32 q, k, v, dO, dRem on the device, and their float64 reference values."""
    q, k, v = make_inputs(regime, B=B, Hq=H, T=T, D=D, Dv=Dv, dtype=torch.float32, device=default_device(), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dO = torch.randn(B, H, T, Dv, generator=gen).to(default_device())
    dRem = torch.randn(B, H, T, generator=gen).to(default_device())
    return q, k, v, dO, dRem


def _cases(cases):
    if torch.cuda.is_available():  # the compiled kernels are fast: add a longer sequence
        cases = tuple(cases) + ((1, 2, 300, 64, 48, 32, 32),)
    return cases


# --------------------------------------------------------------------------------------------------------------
# exercise 1: the formulas, in PyTorch

@quietly
def check_dl_and_dz(dl_and_dz, *, seed=0, sizes=(9, 1, 24), regimes=REGIMES):
    """``dl_and_dz(z, v, dO, g, attend_current=False)`` -> ``(dl, dz)``, both (..., T, T), for logits z (..., T, T),
    v and dO (..., T, Dv), g (..., T); compared with the float64 formulas, which equal autograd's dz."""
    check = "check_dl_and_dz"
    n = 0
    for regime in regimes:
        for T in sizes:
            q, k, v = make_inputs(regime, B=1, Hq=2, T=T, D=16, Dv=5, dtype=torch.float64, seed=seed + T)
            z = (q @ k.transpose(-1, -2))[0] * 16 ** -0.5
            v = v[0]
            gen = torch.Generator().manual_seed(seed + 2 * T + 1)
            dO = torch.randn(2, T, 5, generator=gen, dtype=torch.float64)
            dRem = torch.randn(2, T, generator=gen, dtype=torch.float64)
            for attend_current in (False, True):
                seen = visible(T, attend_current)
                rem = F.logsigmoid(-z).masked_fill(~seen, 0.0).sum(-1).exp()
                g = dRem * rem
                case = fmt_case(regime=regime, z=tuple(z.shape), v=tuple(v.shape), attend_current=attend_current)
                result = call(check, dl_and_dz, (z.clone(), v.clone(), dO.clone(), g.clone()),
                              {"attend_current": attend_current}, case)
                dl, dz = unpack(result, 2, check, dl_and_dz, case, ("dl", "dz"))
                dl_ref, dz_ref = tile_gradients(z, v, dO, g, attend_current)
                dl_hint = "dl[i, j] = A[i, j] * (dO_i . v_j): the weight times what the value is worth to the loss."
                if _close(dl, tile_gradients(z, v, dO, g, attend_current, "no_A")[0]):
                    dl_hint = ("you left out A: dl is the derivative with respect to log A, so "
                               "dl = A * (dO @ v^T), with A = sb_ref.stick_breaking_weights(z).")
                compare(check, dl, dl_ref, 1e-10, case, dl_hint, what="dl")
                hint = ("dz = dl * (1 - beta) - beta * (C + g[:, None]), C[i, j] = sum of dl[i, j'] over the keys "
                        "FARTHER than j (j' < j): an exclusive cumsum from the left, dl.cumsum(-1) - dl; 0 where "
                        "query i cannot see key j.")
                for variant, text in (
                        ("nearer", "C runs over the keys FARTHER than j (j' < j, to its left): their weights hold the "
                                   "factor (1 - beta_ij); you summed the nearer keys (j' > j)."),
                        ("inclusive", "C leaves dl[i, j] itself out (exclusive): the key's own weight holds beta_ij, "
                                      "not (1 - beta_ij); use dl.cumsum(-1) - dl."),
                        ("no_g", "the remainder's gradient is missing: log rem_i holds every log(1 - beta_ij), so dz "
                                 "gets - beta * g[:, None] too (g = dRem * rem is given).")):
                    if _close(dz, tile_gradients(z, v, dO, g, attend_current, variant)[1]):
                        hint = text
                        break
                compare(check, dz, dz_ref, 1e-10, case, hint, what="dz")
                n += 1
    verdict(check, n, f"float64; regimes {', '.join(regimes)}; T in {tuple(sizes)}; attend_current both ways")


def _close(got, ref, tol=1e-8):
    """Whether ``got`` matches ``ref`` (a typical mistake's answer, to name it in the hint)."""
    try:
        got = got.detach().to("cpu", torch.float64)
        return got.shape == ref.shape and rel_err(got, ref) < tol and ref.numel() > 0 and bool(ref.abs().max() > 0)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------------------
# exercise 2: the query-major kernel (dq and delta)

@builds_on(("dl_and_dz", check_dl_and_dz))
@quietly
def check_dq(sb_backward_dq, *, seed=0, cases=_KERNEL_CASES, regimes=REGIMES):
    """``sb_backward_dq(q, k, v, dO, g, attend_current=False, BLOCK_M=16, BLOCK_N=16)`` -> ``(dq, delta)`` in float32:
    dq (B, H, T, D) and delta (B, H, T), delta_i = sum_j dl_ij. ``cases`` lists (B, H, T, D, Dv, BLOCK_M, BLOCK_N)."""
    check = "check_dq"
    n, worst = 0, 0.0
    for regime in regimes:
        for B, H, T, D, Dv, block_m, block_n in _cases(cases):
            q, k, v, dO, dRem = _kernel_inputs(regime, B, H, T, D, Dv, seed + T)
            for attend_current in (False, True):
                o, rem, dq_ref, _, _, delta_ref, g = attention_gradients(q, k, v, dO, dRem, attend_current)
                case = fmt_case(regime=regime, dtype=torch.float32, q=(B, H, T, D), v=(B, H, T, Dv), BLOCK_M=block_m,
                                BLOCK_N=block_n, attend_current=attend_current)
                result = call(check, sb_backward_dq, (q, k, v, dO, g.to(q.device, torch.float32)),
                              {"attend_current": attend_current, "BLOCK_M": block_m, "BLOCK_N": block_n}, case)
                dq, delta = unpack(result, 2, check, sb_backward_dq, case, ("dq", "delta"))
                tail = f" Here T = {T} is not a multiple of BLOCK_N = {block_n}: mask the short key block." \
                    if T % block_n else ""
                compare(check, delta, delta_ref, GRAD_TOL, case, what="delta",
                        hint="walk 1 sums dl = A * (dO @ v^T) over every key a query sees: delta_i = dO_i . o_i. "
                             "Walk the key blocks from the diagonal back to 0 with the carry W of log(1 - beta), "
                             "as in the forward." + tail)
                hint = ("walk 2 again from the diagonal back: C = (delta - R - tile_sum)[:, None] + (tl.cumsum(dl, "
                        "1) - dl), dz = dl * (1 - beta) - beta * (C + g[:, None]), dq += dz @ k, R += tile_sum; "
                        "store scale * dq." + tail)
                if _close(dq, attention_gradients(q, k, v, dO, torch.zeros_like(dRem), attend_current)[2], 1e-4):
                    hint = ("your dq is right without the remainder's gradient: dz needs - beta * g[:, None] "
                            "(g = dRem * rem is an argument).")
                worst = max(worst, compare(check, dq, dq_ref, GRAD_TOL, case, hint, what="dq"))
                n += 1
    verdict(check, n, f"float32; regimes {', '.join(regimes)}; (B, H, T, D, Dv, BLOCK_M, BLOCK_N) in "
            f"{tuple(_cases(cases))}; attend_current both ways", worst)


# --------------------------------------------------------------------------------------------------------------
# exercise 3: the key-major kernel (dk and dv)

@builds_on(("dl_and_dz", check_dl_and_dz))
@quietly
def check_dkdv(sb_backward_dkdv, *, seed=0, cases=_KERNEL_CASES, regimes=REGIMES):
    """``sb_backward_dkdv(q, k, v, dO, g, delta, attend_current=False, BLOCK_M=16, BLOCK_N=16)`` -> ``(dk, dv)`` in
    float32. ``delta`` is the float64 one rounded to float32, so dk is judged at ``DK_TOL_GIVEN_DELTA`` (1e-4)
    here; :func:`check_sb_attention` judges it at 3e-5, with the delta of the learner's own dq pass."""
    check = "check_dkdv"
    n, worst = 0, 0.0
    for regime in regimes:
        for B, H, T, D, Dv, block_m, block_n in _cases(cases):
            q, k, v, dO, dRem = _kernel_inputs(regime, B, H, T, D, Dv, seed + T)
            for attend_current in (False, True):
                o, rem, _, dk_ref, dv_ref, delta, g = attention_gradients(q, k, v, dO, dRem, attend_current)
                case = fmt_case(regime=regime, dtype=torch.float32, q=(B, H, T, D), v=(B, H, T, Dv), BLOCK_M=block_m,
                                BLOCK_N=block_n, attend_current=attend_current)
                args = (q, k, v, dO, g.to(q.device, torch.float32), delta.to(q.device, torch.float32))
                result = call(check, sb_backward_dkdv, args,
                              {"attend_current": attend_current, "BLOCK_M": block_m, "BLOCK_N": block_n}, case)
                dk, dv = unpack(result, 2, check, sb_backward_dkdv, case, ("dk", "dv"))
                tail = f" Here T = {T} is not a multiple of the blocks: mask rows and keys past T." \
                    if T % block_m or T % block_n else ""
                walk = ("one program per (batch, head) walks the key blocks from the last to the first; for each, "
                        "every query block at or after it, loading the rows' carries W and R from their buffers, "
                        "and storing them back updated (W += sum of log(1 - beta), R += sum of dl).")
                err = compare(check, dv, dv_ref, GRAD_TOL, case, what="dv",
                              hint="dv_j = sum_i A_ij dO_i: dv += tl.dot(tl.trans(A), dO) over the query blocks; "
                                   "A needs the carry W of the keys between the key block and the query. "
                              + walk + tail)
                hint = ("dz as in the dq kernel, C = (delta - R - tile_sum)[:, None] + (tl.cumsum(dl, 1) - dl); "
                        "dk += tl.dot(tl.trans(dz), q); store scale * dk. " + walk + tail)
                if _close(dk, attention_gradients(q, k, v, dO, torch.zeros_like(dRem), attend_current)[3], 1e-4):
                    hint = ("your dk is right without the remainder's gradient: dz needs - beta * g[:, None] "
                            "(g = dRem * rem is an argument).")
                err = max(err, compare(check, dk, dk_ref, DK_TOL_GIVEN_DELTA, case, hint, what="dk"))
                worst = max(worst, err)
                n += 1
    verdict(check, n, f"float32; regimes {', '.join(regimes)}; (B, H, T, D, Dv, BLOCK_M, BLOCK_N) in "
            f"{tuple(_cases(cases))}; attend_current both ways", worst)


# --------------------------------------------------------------------------------------------------------------
# exercise 4: the autograd function

_ATTENTION_CASES = ((1, 2, 29, 16, 24), (1, 1, 1, 16, 16))


@builds_on(("sb_backward_dq", check_dq), ("sb_backward_dkdv", check_dkdv))
@quietly
def check_sb_attention(sb_attention, *, seed=0, cases=_ATTENTION_CASES, regimes=REGIMES):
    """``sb_attention(q, k, v, attend_current=False)`` -> ``(o, rem)``, differentiable through both: o and rem
    against the float64 oracle (1e-5), dq, dk, dv at 3e-5 (float32), the gradient of rem alone, and gradients
    bit-identical over two runs. ``cases`` lists (B, H, T, D, Dv)."""
    check = "check_sb_attention"
    n, worst = 0, 0.0
    hint_backward = ("backward(ctx, dO, dRem) gets one gradient per output: g = dRem * rem (rem saved in forward), "
                     "dq, delta = sb_backward_dq(...), dk, dv = sb_backward_dkdv(..., delta, ...); return dq, dk, dv "
                     "in the inputs' dtypes, and None for attend_current.")
    for regime in regimes:
        for B, H, T, D, Dv, *_ in _cases(tuple((*c, 16, 16) for c in cases)):
            q0, k0, v0, dO, dRem = _kernel_inputs(regime, B, H, T, D, Dv, seed + T)
            for attend_current in (False, True):
                o_ref, rem_ref, dq_ref, dk_ref, dv_ref, _, _ = attention_gradients(q0, k0, v0, dO, dRem, attend_current)
                case = fmt_case(regime=regime, dtype=torch.float32, q=(B, H, T, D), v=(B, H, T, Dv),
                                attend_current=attend_current)
                grads = []
                for run in range(2 if n == 0 else 1):
                    inputs = [x.clone().requires_grad_() for x in (q0, k0, v0)]
                    result = call(check, sb_attention, tuple(inputs), {"attend_current": attend_current}, case)
                    o, rem = unpack(result, 2, check, sb_attention, case, ("o", "rem"))
                    if run == 0:
                        compare(check, o, o_ref, TOLERANCE.output[torch.float32], case, what="o",
                                hint="keep the forward you were given: o, rem = sb_forward(q, k, v, attend_current), "
                                     "lesson 06's forward (or sb_ref's in its place) as the cell before the exercise "
                                     "takes it.")
                        compare(check, rem, rem_ref, TOLERANCE.output[torch.float32], case, what="rem",
                                hint="forward returns (o, rem), rem from return_remainder=True.")
                    grads.append(_grads(check, o, rem, dO, dRem, inputs, case, hint_backward))
                for name, got, ref in zip(("dq", "dk", "dv"), grads[0], (dq_ref, dk_ref, dv_ref)):
                    worst = max(worst, compare(check, got, ref, GRAD_TOL, case, hint_backward, what=name))
                if len(grads) == 2:
                    for name, first, second in zip(("dq", "dk", "dv"), *grads):
                        if not torch.equal(first, second):
                            diff = (first.double() - second.double()).abs()
                            raise AssertionError(
                                f"{check}: {name} differs between two identical backward passes for {case} (by up "
                                f"to {float(diff.max()):.2e}).\n  hint: no atomics: every entry of dq, dk, dv and of "
                                "the carry buffers is written by exactly one program, in a fixed order.")
                n += 1
    # rem alone: the gradient flows through the remainder
    q0, k0, v0, dO, dRem = _kernel_inputs("random", 1, 2, 20, 16, 16, seed + 5)
    _, _, dq_ref, dk_ref, dv_ref, _, _ = attention_gradients(q0, k0, v0, torch.zeros_like(dO), dRem, False)
    case = fmt_case(regime="random", dtype=torch.float32, q=(1, 2, 20, 16), loss="(rem * dRem).sum() only")
    inputs = [x.clone().requires_grad_() for x in (q0, k0, v0)]
    o, rem = unpack(call(check, sb_attention, tuple(inputs), {}, case), 2, check, sb_attention, case,
                    ("o", "rem"))
    grads = _grads(check, None, rem, None, dRem, inputs, case, hint_backward)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, (dq_ref, dk_ref, dv_ref)):
        worst = max(worst, compare(check, got, ref, GRAD_TOL, case, what=name,
                                   hint="when the loss uses rem only, backward gets dO = 0 and dRem: the whole "
                                        "gradient comes from g = dRem * rem."))
    verdict(check, n + 1, f"float32; regimes {', '.join(regimes)}; gradients through o and rem; rem alone; "
            "deterministic", worst)


def _grads(check, o, rem, dO, dRem, inputs, case, hint):
    """Gradients of (o * dO).sum() + (rem * dRem).sum() (o left out when None), as float64 CPU tensors."""
    if not (isinstance(rem, torch.Tensor) and rem.requires_grad and (o is None or o.requires_grad)):
        raise AssertionError(f"{check}: o and rem must be differentiable in q, k, v\n  case: {case}\n"
                             "  hint: return SBAttention.apply(q, k, v, attend_current): the outputs of an "
                             "autograd.Function's apply carry its backward.")
    try:
        with quiet():
            loss = (rem.float() * dRem).sum()
            if o is not None:
                loss = loss + (o.float() * dO).sum()
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    except Exception as exc:
        if find_stub(exc) is not None:
            raise not_attempted(check, "`backward` (or a launcher or kernel it calls)") from None
        raise AssertionError(f"{check}: the backward pass failed with {type(exc).__name__}: {exc}\n  case: {case}\n"
                             f"  hint: {hint}") from exc
    missing = [name for name, g in zip(("dq", "dk", "dv"), grads) if g is None]
    if missing:
        raise AssertionError(f"{check}: no gradient reached {', '.join(missing)}\n  case: {case}\n  hint: {hint}")
    return [g.detach().to("cpu", torch.float64) for g in grads]
