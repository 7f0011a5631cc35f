"""The checks of lesson 04 (tiles in PyTorch): combining two key segments, the blocked right-to-left attention for
every block size, and its memory (no allocation near T * T, probed).

They follow :mod:`sb_ref.testing.lessons.harness`: one verdict line, quiet on stderr, ``AssertionError`` naming the
case, the worst error, where it is, and a hint, and "not attempted yet" for a stub. The keyword arguments give the
hidden variants.
"""
import torch

from ..core import REGIMES, make_inputs, oracle_attention, rel_err
from . import references
from .harness import TOLERANCE, call, compare, fmt_case, probe_memory, quietly, unpack, verdict, worst_by_dtype

__all__ = ["check_combine", "check_blocked_attention", "check_blocked_memory"]


@quietly
def check_combine(combine, *, seed=0):
    """Lesson 04: ``combine(near, far)`` with ``near = (o_near, S_near)``, ``far = (o_far, S_far)`` -> ``(o, S)``."""
    check = "check_combine"
    n = 0
    for regime in REGIMES:
        for T, split in ((12, 5), (1, 0), (30, 29), (30, 0)):
            q, k, v = make_inputs(regime, B=1, Hq=2, T=T, D=8, Dv=3, dtype=torch.float64, seed=seed + T + split)
            far = references.segment_attention(q, k, v, 0, split)
            near = references.segment_attention(q, k, v, split, T)
            case = fmt_case(regime=regime, T=T, far_keys=f"[0, {split})", near_keys=f"[{split}, {T})")
            result = call(check, combine, (tuple(x.clone() for x in near), tuple(x.clone() for x in far)), {}, case)
            o, S = unpack(result, 2, check, combine, case, ("o", "log_rem"))
            o_ref, rem_ref = oracle_attention(q, k, v)
            compare(check, o, o_ref, 1e-12, case, what="o",
                    hint="the far segment only gets the stick the near segment left: o = o_near + exp(S_near) * o_far "
                         "(S is per query, so broadcast it over the value dim).")
            compare(check, S, rem_ref.log(), 1e-12, case, what="log_rem",
                    hint="log-remainders of consecutive segments add: S = S_near + S_far.")
            n += 1
    verdict(check, n, "regimes random, long, saturated; splits at 0, in the middle and next to the end")


_BLOCK_CASES = ((37, (5, 16, 64)), (1, (1, 16)), (7, (1, 3, 7)), (64, (8, 64)))


@quietly
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
                        case = fmt_case(regime=regime, dtype=dtype, q=tuple(q.shape), v=tuple(v.shape), block=block,
                                        attend_current=attend_current)
                        result = call(check, blocked_attention, (q.clone(), k.clone(), v.clone(), block),
                                      {"attend_current": attend_current}, case)
                        o, rem = unpack(result, 2, check, blocked_attention, case, ("o", "rem"))
                        hint = ("walk the key blocks from the diagonal block back to block 0, adding the carry "
                                "(sum of log(1 - beta) of the keys already visited) to log A inside each tile; mask "
                                "the diagonal tile, and the padding when T is not a multiple of the block.")
                        tol = TOLERANCE.output[dtype]
                        try:
                            err = compare(check, o, o_ref, tol, case, hint, what="o")
                            err = max(err, compare(check, rem, rem_ref, tol, case, hint, what="rem"))
                        except AssertionError as exc:
                            if _only_the_short_block_is_wrong(o, rem, o_ref, rem_ref, T, block, tol):
                                raise AssertionError(f"{exc} Here T = {T} is not a multiple of block = {block}, and "
                                                     "every row before the last block is right: the last block is "
                                                     "short.") from None
                            raise
                        worst[dtype] = max(worst.get(dtype, 0.0), err)
                        n += 1
    detail = worst_by_dtype(worst)
    verdict(check, n, f"regimes {', '.join(regimes)}; T and blocks {tuple(cases)}; {detail}")



def _only_the_short_block_is_wrong(o, rem, o_ref, rem_ref, T, block, tol):
    """Whether T leaves a short last block and the rows before it match the oracle (the error is in that block)."""
    full = T - T % block
    if T % block == 0 or full == 0:
        return False
    try:
        head = [(o.double()[..., :full, :], o_ref[..., :full, :]), (rem.double()[..., :full], rem_ref[..., :full])]
        return all(got.shape == ref.shape and rel_err(got, ref) <= tol for got, ref in head)
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return False


def check_blocked_memory(blocked_attention, *, T=384, block=32, D=16, seed=0, T_large=2048):
    """Lesson 04: ``blocked_attention`` never allocates anything near T * T: probed with :class:`LargestAllocation`
    in a notebook; under the course's grader, its peak memory at ``T_large`` read from outside its process."""
    check = "check_blocked_memory"
    q, k, v = make_inputs("random", B=1, Hq=1, T=T, D=D, dtype=torch.float32, seed=seed)
    large = make_inputs("random", B=1, Hq=1, T=T_large, D=D, dtype=torch.float32, seed=seed) + (block,)
    case = fmt_case(q=tuple(q.shape), block=block, dtype=torch.float32)
    measured = probe_memory(check, blocked_attention, (q, k, v, block), case, "check_blocked_attention",
                            "function", "work one tile (block x block scores) at a time; keep per query row only the "
                            "output, the carry and nothing of length T per query.", large_args=large)
    print(f"{check}: passed; {measured} (block = {block}).")
