"""The checks of lesson 01 (stick-breaking in numpy): the weights of one query, the weight matrix, and attention
on one head, each against the float64 log-space weights or oracle, in every regime, with ``attend_current`` both
ways and T = 1.

They follow :mod:`sb_ref.testing.lessons.harness`: one verdict line, quiet on stderr, ``AssertionError`` naming the
case, the worst error, where it is, and a hint, and "not attempted yet" for a stub. The keyword arguments give the
hidden variants.
"""
import torch

from ...weights import stick_breaking_weights
from ..core import REGIMES, make_inputs, oracle_attention
from .harness import as_float64, builds_on, call, compare, fmt_case, quietly, regime_logits, unpack, verdict

__all__ = ["check_weights_for_query", "check_weight_matrix", "check_attention_numpy"]


def weights_hint(got, ref, attend_current):
    """A hint that names the most likely mistake in a weight matrix (lesson 02's stable weights use it too)."""
    got = as_float64(got, "", "", "")
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
    got = as_float64(got, "", "", "")
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


@quietly
def check_weights_for_query(weights_for_query, *, seed=0, sizes=(9, 1, 2, 33)):
    """Lesson 01: ``weights_for_query(z_row, i, attend_current=False)`` -> the (T,) weights of query i."""
    check = "check_weights_for_query"
    n = 0
    for regime in REGIMES:
        for T in sizes:
            z = regime_logits(regime, T, seed + T)
            for attend_current in (False, True):
                ref = stick_breaking_weights(z, attend_current=attend_current)
                for i in sorted({0, 1 % T, T // 2, T - 1}):
                    case = fmt_case(regime=regime, T=T, i=i, attend_current=attend_current)
                    got = call(check, weights_for_query, (z[i].numpy().copy(), i),
                               {"attend_current": attend_current}, case)
                    hint = _row_hint(got, ref[i], i, attend_current)
                    compare(check, got, ref[i], 1e-12, case, hint, what=f"the weights of query {i}")
                    n += 1
    verdict(check, n, f"regimes {', '.join(REGIMES)}; T in {tuple(sizes)}; attend_current both ways")


@builds_on(("weights_for_query", check_weights_for_query))
@quietly
def check_weight_matrix(weight_matrix, *, seed=0, sizes=(17, 1, 2, 48)):
    """Lesson 01: ``weight_matrix(z, attend_current=False)`` -> the (T, T) stick-breaking weights."""
    check = "check_weight_matrix"
    n, worst = 0, 0.0
    for regime in REGIMES:
        for T in sizes:
            z = regime_logits(regime, T, seed + 3 * T)
            for attend_current in (False, True):
                case = fmt_case(regime=regime, T=T, attend_current=attend_current)
                got = call(check, weight_matrix, (z.numpy().copy(),), {"attend_current": attend_current}, case)
                ref = stick_breaking_weights(z, attend_current=attend_current)
                hint = weights_hint(got, ref, attend_current)
                worst = max(worst, compare(check, got, ref, 1e-12, case, hint, what="the weight matrix"))
                n += 1
    verdict(check, n, f"regimes {', '.join(REGIMES)}; T in {tuple(sizes)}; attend_current both ways", worst)


@builds_on(("weight_matrix", check_weight_matrix))
@quietly
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
                case = fmt_case(regime=regime, q=(T, D), v=(T, Dv), attend_current=attend_current)
                args = tuple(x[0, 0].numpy().copy() for x in (q, k, v))
                result = call(check, attention_numpy, args, {"attend_current": attend_current}, case)
                o, rem = unpack(result, 2, check, attention_numpy, case, ("o", "rem"))
                o_ref, rem_ref = oracle_attention(q, k, v, attend_current=attend_current)
                worst = max(worst, compare(
                    check, o, o_ref[0, 0], 1e-10, case, what="o",
                    hint="o[i] = sum_j A[i, j] v[j] with the logits z = q @ k.T / sqrt(D) (D is q's last dim)."))
                worst = max(worst, compare(
                    check, rem, rem_ref[0, 0], 1e-10, case, what="rem",
                    hint="rem[i] = prod_j (1 - beta[i, j]) over the keys query i sees: 1 when it sees none."))
                n += 1
    verdict(check, n, f"regimes {', '.join(REGIMES)}; (T, D, Dv) in {tuple(shapes)}; attend_current both ways",
            worst)

