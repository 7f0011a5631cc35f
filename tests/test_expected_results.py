"""What right looks like (sb_ref/testing/lessons/expected.py): lesson 02's recorded error table against a fresh run,
and the references that lessons 01, 03 and 04 draw beside the learner's pictures.

The recorded table (``expected_recorded.py``) is what lesson 02 prints beside the learner's own; it was written by
``python -m sb_ref.testing.lessons.expected --record``. Run again here on the CPU, every error must come out within
``expected.FACTOR`` of the record (errors under ``expected.NOISE_FLOOR`` are float64 rounding and count as equal),
and the record must still say what the lesson's prose says about it.
"""
import ast
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import sb_ref
from sb_ref.testing.lessons import expected
from sb_ref.testing.lessons.expected_recorded import RECORDED

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_02 = ROOT / "solutions" / "02_log_space" / "02_log_space.ipynb"
CONTRACT = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 2.5e-3}  # DESIGN.md's output tolerances


def test_a_fresh_run_gives_the_recorded_table():
    recorded, _ = expected.expected_error_table()
    fresh = expected.error_table(expected.library_stable_attention)
    assert expected.differences(fresh, recorded) == [], "the table moved: look why, then record it again"


def test_a_linear_product_posing_as_the_stable_path_would_be_caught():
    """The recorded linear column is that product's error on the same inputs: as a stable column, it must move."""
    recorded, _ = expected.expected_error_table()
    posing = {case: (linear, linear) for case, (_stable, linear) in recorded.items()}
    moved = {(regime, dtype) for regime, dtype, column, *_ in expected.differences(posing, recorded)}
    assert moved == {(regime, "bfloat16") for regime in expected.ERROR_TABLE["regimes"]}


def test_the_record_says_what_wrote_it_and_on_which_inputs():
    meta = RECORDED["recorded"]
    assert meta["command"] == expected.COMMAND
    assert meta["when"] and meta["torch"] and meta["threads"] >= 1
    assert RECORDED["inputs"] == expected.ERROR_TABLE, "the table's inputs changed: record it again"


def test_the_record_shows_what_lesson_02_says():
    """Lesson 02: the stable version meets the contract everywhere; the linear one is off by about 10% in bfloat16
    in the long regime."""
    table, _ = expected.expected_error_table()
    for (regime, dtype), (stable, _linear) in table.items():
        assert stable <= CONTRACT[dtype], (regime, dtype, stable)
    assert 0.05 <= table["long", "bfloat16"][1] <= 0.2


def test_differences_name_every_number_that_moved():
    recorded = {("long", "bfloat16"): (1.6e-3, 0.11), ("random", "float64"): (0.0, 2e-16)}
    assert expected.differences(dict(recorded), recorded) == []
    fresh = {("long", "bfloat16"): (1.6e-3 * expected.FACTOR * 1.1, 0.11), ("random", "float64"): (3e-15, 2e-16)}
    assert expected.differences(fresh, recorded) == [("long", "bfloat16", "stable", fresh["long", "bfloat16"][0],
                                                      1.6e-3)]
    fresh["random", "float64"] = (1e-13, 2e-16)  # above the noise floor: no longer rounding
    assert len(expected.differences(fresh, recorded)) == 2
    with pytest.raises(ValueError, match="different cases"):
        expected.differences({("long", "bfloat16"): (0, 0)}, recorded)


def test_the_notebooks_linear_space_attention_is_the_recorded_one():
    """Lesson 02 shows the linear-space product's code; the record must come from the same code."""
    cells = ["".join(c["source"]) for c in json.loads(NOTEBOOK_02.read_text())["cells"] if c["cell_type"] == "code"]
    source = next(s for s in cells if "def linear_space_attention" in s)
    shown = next(node for node in ast.parse(source).body
                 if isinstance(node, ast.FunctionDef) and node.name == "linear_space_attention")
    import inspect

    ours = ast.parse(textwrap.dedent(inspect.getsource(expected.linear_space_attention))).body[0]
    assert ast.dump(shown) == ast.dump(ours)


def test_the_error_table_is_printed_beside_the_learners(capsys):
    def wrong(q, k, v):  # the linear product posing as the stable one
        return expected.linear_space_attention(q, k, v), None

    expected.show_error_table(wrong)
    out = capsys.readouterr().out
    assert "reference (sb_ref)" in out and "yours" in out and expected.COMMAND in out
    long_bf16 = next(line for line in out.splitlines() if line.startswith("long") and "bfloat16" in line)
    assert long_bf16.split()[2] == "1.1e-01" and long_bf16.split()[4] == "1.6e-03", long_bf16


class LibraryCallRefused(RuntimeError):
    """What the grader's sandbox raises for a stubbed library function (autograder.rules), by name."""


def refuse(*args, **kwargs):
    raise LibraryCallRefused("a stub")


def test_in_the_sandbox_the_table_shows_the_record_alone(monkeypatch, capsys):
    monkeypatch.setattr("sb_ref.testing.core.oracle_attention", refuse)
    expected.show_error_table(expected.library_stable_attention)
    out = capsys.readouterr().out
    assert out.count("n/a while graded") == len(RECORDED["lesson02_error_table"])


def test_before_the_exercise_is_done_the_table_shows_the_record(capsys):
    def stub(q, k, v):
        raise NotImplementedError

    expected.show_error_table(stub)
    assert capsys.readouterr().out.count("not attempted yet") == len(RECORDED["lesson02_error_table"])


@pytest.fixture
def agg(monkeypatch, tmp_path):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda: plt.close("all"))


def test_weights_beside_reference_say_whether_they_match(agg, capsys):
    z = np.random.default_rng(0).normal(size=(9, 9)) * 2
    right = expected.reference_weights()(z)
    expected.weights_beside_reference(z, right, also={"other": np.eye(9)})
    assert "they match" in capsys.readouterr().out
    expected.weights_beside_reference(z, np.tril(np.ones((9, 9)), -1) / 9)
    assert "they differ" in capsys.readouterr().out


def test_the_picture_is_titled_and_its_panels_labelled(monkeypatch, tmp_path):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}

    def keep():
        fig = plt.gcf()
        drawn["title"] = fig._suptitle.get_text() if fig._suptitle else None
        drawn["panels"] = [ax.get_title() for ax in fig.axes if ax.get_title()]
        plt.close("all")

    monkeypatch.setattr(plt, "show", keep)
    expected.weights_beside_reference(np.zeros((4, 4)), np.zeros((4, 4)), also={"softmax": np.eye(4)},
                                      title="random tokens")
    assert drawn == {"title": "random tokens", "panels": ["reference (sb_ref)", "yours", "softmax"]}


def library_attention(q, k, v, attend_current=False):
    """The library's attention, called as lesson 02's stable_attention."""
    return sb_ref.stick_breaking_attention(q, k, v, attend_current=attend_current, return_remainder=True)


@pytest.mark.parametrize("T, d", [(13, 4), (8, 8), (5, 16)])
@pytest.mark.parametrize("attend_current", [False, True])
def test_weights_from_attention_reads_the_library_weights(T, d, attend_current):
    """Lesson 03 reads the weights its attention applies by giving it the identity as values, d columns at a time:
    for the library's attention they are the library's weights, however T and d divide."""
    q, k = torch.randn(2, T, d, dtype=torch.float64) * 2
    yours = expected.weights_from_attention(library_attention, q.float(), k.float(), attend_current=attend_current)
    z = (q.float().double() @ k.float().double().T / d ** 0.5).numpy()
    right = expected.reference_weights()(z, attend_current)
    assert yours.dtype == np.float64 and yours.shape == (T, T)
    assert np.abs(yours - right).max() <= 1e-12


def test_weights_from_attention_shows_a_wrong_attention_as_it_is():
    """An attention that spreads each row uniformly over earlier keys is read back as exactly that."""
    def uniform(q, k, v):
        T = q.shape[-2]
        A = torch.ones(T, T, dtype=q.dtype).tril(-1)
        A = A / A.sum(-1, keepdim=True).clamp(min=1)
        return A @ v, 1 - A.sum(-1)

    q, k = torch.randn(2, 7, 3)
    read = expected.weights_from_attention(uniform, q, k)
    assert np.abs(read - np.tril(np.ones((7, 7)), -1) / np.maximum(np.arange(7), 1)[:, None]).max() < 1e-15


def test_weights_from_attention_refuses_more_than_one_head():
    with pytest.raises(ValueError, match="one head's"):
        expected.weights_from_attention(library_attention, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))


def test_the_references_step_aside_in_the_sandbox(agg, monkeypatch, capsys):
    monkeypatch.setattr("sb_ref.weights.stick_breaking_weights", refuse)
    monkeypatch.setattr("sb_ref.blocked.StickBreakingFunction.forward", staticmethod(refuse))  # as the stub does
    assert expected.reference_weights() is None and expected.reference_blocked() is None
    expected.weights_beside_reference(np.zeros((4, 4)), np.zeros((4, 4)))
    assert capsys.readouterr().out == ""


def test_reference_blocked_is_the_library_for_every_block_size():
    from sb_ref.testing import make_inputs, oracle_attention, rel_err

    q, k, v = make_inputs("random", B=1, Hq=2, T=21, D=12, dtype=torch.float64)
    o_ref, rem_ref = oracle_attention(q, k, v, attend_current=True)
    blocked = expected.reference_blocked()
    for block in (1, 5, 32):
        o, rem = blocked(q, k, v, block, attend_current=True)
        assert rel_err(o, o_ref) <= 1e-12 and rel_err(rem, rem_ref) <= 1e-12
