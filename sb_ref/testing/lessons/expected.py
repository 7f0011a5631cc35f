"""What right looks like, for lessons 01 to 04: references drawn beside the learner's pictures, and lesson 02's
error table as recorded from a real run.

The release and the solutions carry no outputs, so a learner whose picture looks odd has nothing to hold it
against. Each picture of these lessons therefore draws the library's answer beside the learner's, labelled
"reference (sb_ref)" and "yours", computed live on the same inputs. Lesson 02's error table cannot be drawn that
way without the float64 oracle, which the grader's sandbox does not offer, and its numbers are worth seeing even
there: they are recorded once from a real run, into ``expected_recorded.py``, by::

    python -m sb_ref.testing.lessons.expected --record

``tests/test_expected_results.py`` runs the same table again and fails when a number has moved further than
:data:`FACTOR` from the record.

In the grader's sandbox the library's implementations are stubs that refuse to run (``autograder/rules.py``); the
helpers here then draw the learner's side alone and say why, so a notebook still runs top to bottom there. None of
them shows how an exercise is solved: they only call the library, and show what it computes.
"""
import argparse
import datetime
import platform
import pprint
import sys
from pathlib import Path

import numpy as np
import torch

RECORDED_FILE = Path(__file__).with_name("expected_recorded.py")
COMMAND = "python -m sb_ref.testing.lessons.expected --record"

#: How far a fresh run's error may be from the recorded one, as a factor either way. The inputs are seeded and the
#: code is the same, so on one machine the numbers repeat exactly; another CPU, thread count or BLAS sums in another
#: order, which moves an error at rounding level by some tens of percent. Tighter than the factor of 2 between the
#: stable and the linear product in bfloat16 (random: 1.65e-3 vs 3.06e-3), so swapping one for the other is caught.
FACTOR = 1.5
#: Errors below this are float64 rounding noise (a few ulps): any two of them count as equal.
NOISE_FLOOR = 1e-14


def _refused(exc):
    """Whether ``exc`` is the grader's sandbox refusing a library call (``autograder.rules.LibraryCallRefused``)."""
    return type(exc).__name__ == "LibraryCallRefused"


# ------------------------------------------------------------------------------------------- lesson 01: pictures


def reference_weights():
    """sb_ref's stick-breaking weights as a numpy function ``(z, attend_current=False) -> A``, or None where the
    library is not available (in the grader's sandbox)."""
    from ...weights import stick_breaking_weights

    def weights(z, attend_current=False):
        return stick_breaking_weights(torch.from_numpy(np.asarray(z, dtype=np.float64)),
                                      attend_current=attend_current).numpy()

    try:
        weights(np.zeros((2, 2)))
    except RuntimeError as exc:
        if _refused(exc):
            return None
        raise
    return weights


def weights_beside_reference(z, yours, *, attend_current=False, also=None, title=None):
    """Draws sb_ref's weight matrix of the logits ``z`` beside ``yours`` (and the matrices of ``also``, a dict
    {title: matrix}), on one colour scale, under ``title`` if given, and prints how far apart the two are."""
    import matplotlib.pyplot as plt

    weights = reference_weights()
    panels = {"reference (sb_ref)": None if weights is None else weights(z, attend_current), "yours": yours,
              **(also or {})}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1, 3.8))
    for ax, (name, A) in zip(axes, panels.items()):
        if A is None:
            ax.text(0.5, 0.5, "not shown while graded", ha="center", va="center", transform=ax.transAxes)
            ax.set(title=name, xticks=[], yticks=[])
            continue
        im = ax.imshow(np.asarray(A, dtype=np.float64), cmap="viridis", vmin=0, vmax=1)
        ax.set(title=name, xlabel="key j")
    axes[0].set(ylabel="query i")
    fig.colorbar(im, ax=axes, shrink=0.8)
    if title:
        fig.suptitle(title)
    plt.show()
    if panels["reference (sb_ref)"] is not None:
        gap = float(np.abs(np.asarray(yours, dtype=np.float64) - panels["reference (sb_ref)"]).max())
        print(f"largest |yours - reference| = {gap:.1e}: " + ("they match." if gap <= 1e-12 else
                                                             "they differ, see where the pictures do."))


# ---------------------------------------------------------------------------------------- lesson 03: pictures


def weights_from_attention(attention, q, k, *, attend_current=False):
    """The weight matrix that ``attention`` (called as lesson 02's ``stable_attention(q, k, v, ...) -> (o, rem)``)
    applies to one head's ``q`` and ``k`` of shape (T, d), as a float64 numpy array: with v the identity,
    o = A v = A. The identity goes in d columns at a time, so the function is only ever given values as wide as its
    keys."""
    if q.ndim != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must be one head's (T, d) matrices of one shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    T, d = q.shape
    q4, k4 = (x.detach().to(torch.float64)[None, None] for x in (q, k))
    options = {"attend_current": True} if attend_current else {}
    columns = []
    for start in range(0, T, d):
        width = min(d, T - start)
        v = torch.zeros(T, d, dtype=torch.float64)
        v[start:start + width, :width] = torch.eye(width, dtype=torch.float64)
        o, _ = attention(q4, k4, v[None, None], **options)
        columns.append(o[0, 0, :, :width].detach())
    return torch.cat(columns, dim=1).numpy()


# ---------------------------------------------------------------------------------------- lesson 04: pictures


def reference_blocked():
    """sb_ref's tiled forward (the ``torch`` backend, whose block size can be chosen) as a function
    ``(q, k, v, block, attend_current=False) -> (o, rem)``, or None where the library is not available."""
    from ...blocked import StickBreakingFunction

    def blocked(q, k, v, block, attend_current=False):
        with torch.no_grad():
            return StickBreakingFunction.apply(q, k, v, q.shape[-1] ** -0.5, attend_current, None, block)

    try:
        blocked(*torch.zeros(3, 1, 1, 2, 2), 1)
    except RuntimeError as exc:
        if _refused(exc):
            return None
        raise
    return blocked


# ---------------------------------------------------------------------------------- lesson 02: the error table

#: The inputs of lesson 02's table: every regime and dtype, at this shape and the default seed.
ERROR_TABLE = {"regimes": ("random", "long", "saturated"), "dtypes": ("float64", "float32", "bfloat16"),
               "B": 1, "Hq": 2, "T": 512, "D": 32}


def linear_space_attention(q, k, v):
    "The product as written, in the input dtype: what not to do."
    z = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    T = z.shape[-1]
    visible = torch.ones(T, T, dtype=torch.bool).tril(-1)
    keep = torch.where(visible, 1 - torch.sigmoid(z), torch.ones_like(z))
    after = torch.cat([keep.flip(-1).cumprod(-1).flip(-1)[..., 1:], torch.ones_like(keep[..., :1])], -1)
    A = torch.where(visible, torch.sigmoid(z) * after, torch.zeros_like(z))
    return A @ v


def library_stable_attention(q, k, v):
    """sb_ref's full-matrix log-space attention, as lesson 02 builds it: :func:`sb_ref.stick_breaking_weights` of
    the logits, computed in float32 for half-precision inputs (float64 for float64), times v; returns ``(o, rem)``."""
    from ...weights import stick_breaking_weights

    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_, k_, v_ = (x.to(compute) for x in (q, k, v))
    z = q.shape[-1] ** -0.5 * q_ @ k_.transpose(-1, -2)
    A = stick_breaking_weights(z)
    T = z.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool).tril(-1)
    rem = torch.nn.functional.logsigmoid(-z).masked_fill(~seen, 0.0).sum(-1).exp()
    return (A @ v_).to(q.dtype), rem


def error_table(stable, linear=linear_space_attention):
    """{(regime, dtype name): (error of ``stable``'s o, error of ``linear``'s o)} on lesson 02's inputs, each the
    relative Frobenius error against the float64 oracle given the same rounded inputs. ``stable`` returns
    ``(o, rem)``, ``linear`` returns o."""
    from ..core import make_inputs, oracle_attention, rel_err

    table = {}
    for regime in ERROR_TABLE["regimes"]:
        for name in ERROR_TABLE["dtypes"]:
            q, k, v = make_inputs(regime, B=ERROR_TABLE["B"], Hq=ERROR_TABLE["Hq"], T=ERROR_TABLE["T"],
                                  D=ERROR_TABLE["D"], dtype=getattr(torch, name))
            o_ref, _ = oracle_attention(q, k, v)
            table[regime, name] = (rel_err(stable(q, k, v)[0], o_ref), rel_err(linear(q, k, v), o_ref))
    return table


def expected_error_table():
    """The recorded table, as :func:`error_table` gives it, and what recorded it (a dict)."""
    from .expected_recorded import RECORDED

    rows = RECORDED["lesson02_error_table"]
    return {(r["regime"], r["dtype"]): (r["stable"], r["linear"]) for r in rows}, RECORDED["recorded"]


def show_error_table(stable_attention, linear=linear_space_attention):
    """Prints lesson 02's error table of the learner's ``stable_attention`` beside the recorded one of sb_ref."""
    expected, recorded = expected_error_table()
    yours, missing = None, None
    try:
        yours = error_table(stable_attention, linear)
    except NotImplementedError:
        missing = "not attempted yet"
    except RuntimeError as exc:
        if not _refused(exc):
            raise
        missing = "n/a while graded"  # the float64 oracle is a stub in the grader's sandbox
    print(f"{'':20} {'yours':^19}   {'reference (sb_ref)':^19}")
    print(f"{'regime':10} {'dtype':9} {'stable':>9} {'linear':>9}   {'stable':>9} {'linear':>9}")
    for (regime, dtype), (ref_stable, ref_linear) in expected.items():
        mine = missing.center(19) if yours is None else "{:9.1e} {:9.1e}".format(*yours[regime, dtype])
        print(f"{regime:10} {dtype:9} {mine}   {ref_stable:9.1e} {ref_linear:9.1e}")
    print("How close yours should be: in float32 and bfloat16 within a factor of about 2 of the reference's stable "
          "column (rounding\ndiffers with the order of the sums); in float64 at most about 1e-15 (0 means your sums "
          "run in the oracle's order).\nThe linear columns should agree: they are the same code on the same inputs.\n"
          f"(reference recorded by `{recorded['command']}` on {recorded['when']}, torch {recorded['torch']})")


def differences(fresh, recorded):
    """[(regime, dtype, column, fresh, recorded)] for every error further than :data:`FACTOR` from the record
    (errors both under :data:`NOISE_FLOOR` count as equal)."""
    if set(fresh) != set(recorded):
        raise ValueError(f"the tables hold different cases: {sorted(fresh)} vs {sorted(recorded)}")
    moved = []
    for case in recorded:
        for column, got, want in zip(("stable", "linear"), fresh[case], recorded[case]):
            if max(got, want) <= NOISE_FLOOR:
                continue
            if not (want / FACTOR <= got <= want * FACTOR):
                moved.append((*case, column, got, want))
    return moved


def record(path=RECORDED_FILE):
    """Runs lesson 02's table with sb_ref's stable path and writes it, with what recorded it, into ``path``."""
    table = error_table(library_stable_attention)
    recorded = {"command": COMMAND, "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "threads": torch.get_num_threads()}
    rows = [{"regime": regime, "dtype": dtype, "stable": float(f"{stable:.3g}"), "linear": float(f"{linear:.3g}")}
            for (regime, dtype), (stable, linear) in table.items()]  # 3 digits: the rest is rounding noise
    entry = {"recorded": recorded, "inputs": ERROR_TABLE, "lesson02_error_table": rows}
    path.write_text('"""Lesson 02\'s expected error table, from a real run of sb_ref: written by\n'
                    f'`{COMMAND}` (see sb_ref/testing/lessons/expected.py), not by hand."""\n\n'
                    "RECORDED = " + pprint.pformat(entry, width=116, sort_dicts=False) + "\n")
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sb_ref.testing.lessons.expected",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help=f"run the table again and write {RECORDED_FILE.name}")
    args = parser.parse_args(argv)
    if args.record:
        record()
        print(f"recorded into {RECORDED_FILE}")
    expected, recorded = expected_error_table()
    print(f"{'regime':10} {'dtype':9} {'stable':>9} {'linear':>9}   ({recorded['command']}, {recorded['when']})")
    for (regime, dtype), (stable, linear) in expected.items():
        print(f"{regime:10} {dtype:9} {stable:9.1e} {linear:9.1e}")


if __name__ == "__main__":
    sys.exit(main())
