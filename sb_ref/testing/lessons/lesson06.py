"""The checks of lesson 06 (Triton forward): the learner's Triton code, through its Python launchers.

- :func:`check_log_sigmoids_triton`: a ``@triton.jit`` helper ``log_sigmoids(z)`` -> ``(log beta, log(1 - beta))``,
  run by a small launcher kernel of the notebook (``log_sigmoids_of(z)``), accurate entry by entry in float32 for
  the logits of every regime (|z| up to ~50 in the saturated one, z near -8 in the long one);
- :func:`check_sb_forward`: the forward kernel and its launcher ``sb_forward(q, k, v, attend_current=False,
  block_m=16, block_n=16) -> (o, rem)`` against the float64 oracle, in float32 (and bfloat16 on a GPU, beside
  ``sb_ref``'s own kernel), for ragged lengths, T = 1, head dims that are not powers of two, Dv != D, mixed blocks;
- :func:`check_sb_forward_memory`: memory O(T), with an allocation probe of the launcher.

They follow :mod:`sb_ref.testing.lessons.harness`: one verdict line, quiet on stderr, ``AssertionError`` with the
case, the worst error and a hint, and "not attempted yet" for a stub, also one inside a ``@triton.jit`` function
(:func:`~sb_ref.testing.lessons.harness.find_stub`).
"""
import torch
import torch.nn.functional as F

from ...attention import stick_breaking_attention
from ..core import REGIMES, make_inputs, oracle_attention, rel_err
from .harness import (TOLERANCE, builds_on, call, compare, default_device, fmt_case, probe_memory, quietly,
                      regime_logits, unpack, verdict, worst_by_dtype)

__all__ = ["check_log_sigmoids_triton", "check_sb_forward", "check_sb_forward_memory"]


# --------------------------------------------------------------------------------------------------------------
# exercise 1: log(beta) and log(1 - beta) in a Triton helper

_LOG1P_HINT = ("with e = exp(-|z|) <= 1, log(beta) = min(z, 0) - log(1 + e) and log(1 - beta) = -max(z, 0) - "
               "log(1 + e). Never exp(z) or exp(-z) alone (they overflow), never log(sigmoid(z)) or "
               "log(1 - sigmoid(z)) (0 or 1 in float32 once |z| > 17). And log(1 + e) needs care: in float32 1 + e "
               "keeps only e's leading digits, so tl.log(1.0 + e) is off by up to 1e-7 / e relative; use "
               "log(u) * e / (u - 1) with u = 1 + e, and e itself where u == 1.")


@quietly
def check_log_sigmoids_triton(log_sigmoids_of, *, seed=0, T=24):
    """Lesson 06: ``log_sigmoids_of(z)`` runs the learner's ``@triton.jit log_sigmoids`` on a float32 tensor and
    returns ``(log(beta), log(1 - beta))``; each entry must be within 1e-5 of the exact value, relative.

    The logits are those of the regimes ``random``, ``long`` and ``saturated`` (T x T of them), plus edge values.
    """
    check = "check_log_sigmoids_triton"
    device = default_device()
    edges = torch.tensor([-50.0, -30.0, -17.0, -8.0, -1.0, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 1.0, 8.0, 17.0, 30.0, 50.0],
                         dtype=torch.float64)
    sets = [(regime, regime_logits(regime, T, seed + i)) for i, regime in enumerate(REGIMES)] + [("edge values", edges)]
    tol = TOLERANCE.output[torch.float32]
    for what, z64 in sets:
        z = z64.to(device=device, dtype=torch.float32)
        case = (fmt_case(regime=what) if what in REGIMES else what) + f", float32, shape {tuple(z.shape)}, " \
            f"z in [{float(z.min()):.3g}, {float(z.max()):.3g}]"
        result = call(check, log_sigmoids_of, (z.clone(),), {}, case)
        log_beta, log_keep = unpack(result, 2, check, log_sigmoids_of, case, ("log(beta)", "log(1 - beta)"))
        exact = z.double().cpu()
        compare(check, log_beta, F.logsigmoid(exact), tol, case, _LOG1P_HINT, what="log(beta)", elementwise=True)
        compare(check, log_keep, F.logsigmoid(-exact), tol, case, _LOG1P_HINT, what="log(1 - beta)",
                elementwise=True)
    verdict(check, len(sets), f"float32 on {device}; regimes {', '.join(REGIMES)} and edge values up to |z| = 50; "
            "each entry to 1e-5 relative")


# --------------------------------------------------------------------------------------------------------------
# exercise 2: the forward kernel and its launcher

# (B, H, T, D, Dv, block_m, block_n): ragged lengths, T = 1, head dims that are not powers of two, Dv != D,
# blocks of 16 and 32 mixed
_FORWARD_CASES = ((1, 2, 37, 16, 16, 16, 16), (1, 1, 1, 24, 24, 16, 16), (2, 1, 50, 48, 20, 32, 16),
                  (1, 2, 40, 16, 8, 16, 32))
# larger ones, run on a GPU only, in float32 and bfloat16
_GPU_CASES = ((2, 2, 1000, 64, 64, 64, 64), (1, 3, 333, 80, 48, 32, 64), (1, 2, 129, 128, 128, 64, 32))


def _forward_hint(B, H, T, D, Dv, block_m, block_n, attend_current, dtype, device, o, q, k, v):
    notes = []
    o_other, _ = oracle_attention(q, k, v, attend_current=not attend_current)
    o = o.detach().to("cpu", torch.float64) if isinstance(o, torch.Tensor) else None
    if o is not None and o.shape == o_other.shape and rel_err(o, o_other) <= TOLERANCE.output[dtype]:
        return (f"your o is the one for attend_current={not attend_current}: query i sees keys j < i, and key i too "
                "only when attend_current=True (the ATTEND_CURRENT constexpr of the kernel).")
    if T % block_m or T % block_n:
        notes.append(f"T = {T} is not a multiple of the blocks: mask the loads of rows and keys >= T (other=0.0) and "
                     "the stores; keys >= T lie right of every query, so the causal mask must remove them from "
                     "log(1 - beta).")
    pad = max(16, 1 << (max(D, Dv) - 1).bit_length())
    if D & (D - 1) or Dv & (Dv - 1) or D < 16 or Dv < 16 or D != Dv:
        notes.append(f"D = {D} and Dv = {Dv}: pad each to a power of two >= 16 (BLOCK_D, BLOCK_DV; here up to {pad}) "
                     "and mask the columns >= D in the loads of q and k, >= Dv in the load of v and the store of o.")
    if block_m != block_n:
        notes.append(f"block_m = {block_m}, block_n = {block_n}: the key blocks that cross the diagonal are all those "
                     "whose last key is at or after the first query of the block, not only the one with the same "
                     "index; start the walk at the key block holding the block's last query.")
    if device == "cuda" and dtype == torch.float32:
        notes.append("on a GPU tl.dot rounds float32 inputs to TF32 unless you pass input_precision=\"ieee\".")
    if dtype != torch.float32:
        notes.append("upcast every tile to float32 right after its load and compute in float32; cast o at the store.")
    base = ("walk the key blocks from the diagonal back to block 0, carrying per row S = sum of log(1 - beta) of the "
            "keys already visited; in a tile log A = log beta + S + (reverse exclusive cumsum of log(1 - beta)); "
            "o += A @ v; rem = exp(S).")
    return " ".join([base] + notes)


def _forward_case(check, sb_forward, regime, shape, dtype, attend_current, seed, device):
    B, H, T, D, Dv, block_m, block_n = shape
    q, k, v = make_inputs(regime, B=B, Hq=H, T=T, D=D, Dv=Dv, dtype=dtype, device=device, seed=seed + T + D)
    case = fmt_case(regime=regime, dtype=dtype, q=(B, H, T, D), v=(B, H, T, Dv), attend_current=attend_current,
                    block_m=block_m, block_n=block_n)
    result = call(check, sb_forward, (q.clone(), k.clone(), v.clone()),
                  {"attend_current": attend_current, "block_m": block_m, "block_n": block_n}, case)
    o, rem = unpack(result, 2, check, sb_forward, case, ("o", "rem"))
    for what, x, want in (("o", o, dtype), ("rem", rem, torch.float32)):
        if isinstance(x, torch.Tensor) and x.dtype != want:
            raise AssertionError(f"{check}: {what} is {str(x.dtype).replace('torch.', '')}, expected "
                                 f"{str(want).replace('torch.', '')}\n  case: {case}\n  hint: o comes back in q's "
                                 "dtype (accumulated in float32, cast at the store), rem in float32.")
    o_ref, rem_ref = oracle_attention(q, k, v, attend_current=attend_current)
    tol = TOLERANCE.output[dtype]
    rem_hint = ("rem = exp(S) with S the carry after the last key block (1 for a query that sees no key): store it "
                "for the rows < T, in float32. ")
    try:
        err = max(compare(check, o, o_ref, tol, case, "", what="o"),
                  compare(check, rem, rem_ref, tol, case, rem_hint, what="rem"))
    except AssertionError:  # the same comparisons again, now with a hint that looks at what went wrong
        hint = _forward_hint(B, H, T, D, Dv, block_m, block_n, attend_current, dtype, device, o, q, k, v)
        compare(check, o, o_ref, tol, case, hint, what="o")
        compare(check, rem, rem_ref, tol, case, rem_hint + hint, what="rem")
        raise
    return err, (q, k, v, o_ref)


@builds_on(("log_sigmoids_of", check_log_sigmoids_triton))
@quietly
def check_sb_forward(sb_forward, *, seed=0, cases=_FORWARD_CASES, regimes=REGIMES, gpu_cases=_GPU_CASES):
    """Lesson 06: ``sb_forward(q, k, v, attend_current=False, block_m=16, block_n=16)`` -> ``(o, rem)``.

    ``cases`` lists (B, H, T, D, Dv, block_m, block_n), run in float32 (tolerance 1e-5 against the float64 oracle)
    in every regime with ``attend_current`` both ways. On a GPU, ``gpu_cases`` run too, in float32 and bfloat16
    (tolerance 2.5e-3), and the verdict gives ``sb_ref``'s own error on the same bfloat16 inputs.
    """
    check = "check_sb_forward"
    device = default_device()
    runs = [(shape, torch.float32) for shape in cases]
    if device == "cuda":
        runs += [(shape, dtype) for shape in gpu_cases for dtype in (torch.float32, torch.bfloat16)]
    n, worst, sb_ref_worst = 0, {}, 0.0
    for regime in regimes:
        for shape, dtype in runs:
            for attend_current in (False, True):
                err, (q, k, v, o_ref) = _forward_case(check, sb_forward, regime, shape, dtype, attend_current, seed,
                                                      device)
                worst[dtype] = max(worst.get(dtype, 0.0), err)
                n += 1
                if dtype == torch.bfloat16:
                    theirs = stick_breaking_attention(q, k, v, attend_current=attend_current, backend="triton")
                    sb_ref_worst = max(sb_ref_worst, rel_err(theirs, o_ref))
    detail = worst_by_dtype(worst)
    if device == "cuda":
        detail += f"; sb_ref's kernel on the same bfloat16 inputs {sb_ref_worst:.1e}"
    shapes = tuple(cases) + (tuple(gpu_cases) if device == "cuda" else ())
    verdict(check, n, f"on {device}; regimes {', '.join(regimes)}; (B, H, T, D, Dv, block_m, block_n) in {shapes}; "
            f"attend_current both ways; {detail}")


# --------------------------------------------------------------------------------------------------------------
# exercise 3: memory O(T)

@quietly
def check_sb_forward_memory(sb_forward, *, T=None, D=16, block=64, seed=0, T_large=1024):
    """Lesson 06: ``sb_forward`` allocates nothing near T * T: probed with :class:`~sb_ref.testing.LargestAllocation`
    (at most T * T / 8 elements in one tensor; T defaults to 256 on the CPU and 2048 on a GPU); under the course's
    grader on a CPU, its peak memory at ``T_large`` read from outside its process."""
    check = "check_sb_forward_memory"
    device = default_device()
    T = T or (2048 if device == "cuda" else 256)
    q, k, v = make_inputs("random", B=1, Hq=1, T=T, D=D, dtype=torch.float32, device=device, seed=seed)
    large = make_inputs("random", B=1, Hq=1, T=T_large, D=D, dtype=torch.float32, seed=seed) + (False, block, block)
    case = fmt_case(q=tuple(q.shape), dtype=torch.float32, block_m=block, block_n=block)
    measured = probe_memory(check, sb_forward, (q, k, v, False, block, block), case, "check_sb_forward",
                            "launcher", "the launcher allocates o and rem only; the logits, the weights and the carry "
                            "live in the kernel's tiles, one [block_m, block_n] tile at a time, never in a PyTorch "
                            "tensor.", large_args=large)
    print(f"{check}: passed on {device}; {measured}.")