"""sb_ref.testing.lessons.earlier: a later lesson takes the learner's function from an earlier lesson's notebook (its
definitions only), uses it once it passes that lesson's check, and otherwise falls back to the library's, saying why.
"""
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import sb_ref
from sb_ref.testing.lessons.earlier import from_lesson, notebook_definitions
from sb_ref.testing.lessons.lesson02 import check_stable_attention
from sb_ref.testing.lessons.lesson06 import check_sb_forward

ROOT = Path(__file__).resolve().parent.parent


def library_attention(q, k, v, scale=None, attend_current=False):
    return sb_ref.stick_breaking_attention(q, k, v, scale=scale, attend_current=attend_current, return_remainder=True)


def graded_cell(source, points=1):
    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"grade_id": "test_it", "grade": True, "solution": False, "locked": True,
                                 "points": points, "schema_version": 3}
    return cell


@pytest.fixture
def course(tmp_path, monkeypatch):
    """A lessons folder; the current folder is its lesson "later", as when a notebook runs."""
    (tmp_path / "later").mkdir()
    monkeypatch.chdir(tmp_path / "later")

    def add(lesson, cells):
        (tmp_path / lesson).mkdir()
        nb = new_notebook()
        nb.cells = [new_markdown_cell("# an earlier lesson"), *cells]
        nbformat.write(nb, tmp_path / lesson / f"{lesson}.ipynb")
        return tmp_path / lesson / f"{lesson}.ipynb"

    return add


def test_only_the_definitions_run(course):
    path = course("01_x", [
        new_code_cell("import math\nSCALE = 3\nLIMITS = (1, 2)\ndef triple(x):\n    return SCALE * x\n"
                      "print('a demo')\nraise RuntimeError('the demo ran')"),
        new_code_cell("values = [triple(i) for i in range(10 ** 9)]"),          # a demo: never runs
        new_code_cell("%matplotlib inline\ndef broken(:"),                      # not Python: left out
        new_code_cell("class Twice:\n    def __call__(self, x):\n        return 2 * x\ntwice = Twice()"),
        graded_cell("raise AssertionError('a test cell ran')"),
    ])
    module = notebook_definitions(path)
    assert module.triple(2) == 6 and module.LIMITS == (1, 2) and module.math.pi > 3
    assert isinstance(module.Twice(), object) and not hasattr(module, "twice") and not hasattr(module, "values")


def test_a_passing_function_is_used_and_a_failing_one_is_replaced(course, capsys):
    course("01_x", [new_code_cell("def triple(x):\n    return 3 * x\ndef wrong(x):\n    return 4 * x")])

    def check_triple(fn):
        print("check_triple: passed")
        assert fn(2) == 6, "check_triple: triple(2) should be 6, got " + str(fn(2))

    def library_triple(x):
        return 3 * x

    assert from_lesson("01_x", "triple", check_triple, fallback=library_triple).__module__ == "01_x"
    assert capsys.readouterr().out == "lesson 01_x: your `triple` passes check_triple: it is the one used here\n"
    assert from_lesson("01_x", "wrong", check_triple, fallback=library_triple) is library_triple
    assert capsys.readouterr().out == (
        "lesson 01_x: your `wrong` does not pass check_triple yet (check_triple: triple(2) should be 6, got 8); "
        "using `library_triple` (the library's) in its place\n")
    assert from_lesson("01_x", "missing", check_triple, fallback=library_triple) is library_triple
    assert "its notebook defines no `missing`" in capsys.readouterr().out
    assert from_lesson("02_y", "triple", check_triple, fallback=library_triple) is library_triple
    assert "lesson 02_y: no notebook 02_y/02_y.ipynb beside this one" in capsys.readouterr().out


def test_definitions_that_raise_fall_back(course, capsys):
    course("01_x", [new_code_cell("import no_such_module_here\ndef triple(x):\n    return 3 * x")])
    fallback = from_lesson("01_x", "triple", lambda fn: None, fallback=library_attention)
    assert fallback is library_attention
    assert "lesson 01_x: its definitions raise ModuleNotFoundError" in capsys.readouterr().out


def test_the_real_lessons_solution_is_used_and_its_release_stub_is_not(course, capsys):
    """Lesson 02's solution passes its check and is used; the release's stub says "not attempted yet"."""
    shutil.copy(ROOT / "solutions" / "02_log_space" / "02_log_space.ipynb", course("02_log_space", []))
    mine = from_lesson("02_log_space", "stable_attention", check_stable_attention, fallback=library_attention)
    assert mine is not library_attention and "passes check_stable_attention" in capsys.readouterr().out
    q, k, v = torch.randn(3, 1, 2, 9, 4, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(mine(q, k, v), library_attention(q, k, v), rtol=1e-12, atol=1e-12)
    shutil.copy(ROOT / "lessons" / "02_log_space" / "02_log_space.ipynb", Path("../02_log_space/02_log_space.ipynb"))
    assert from_lesson("02_log_space", "stable_attention", check_stable_attention,
                       fallback=library_attention) is library_attention
    assert "does not pass check_stable_attention yet (check_stable_attention: not attempted yet." \
        in capsys.readouterr().out


def test_a_triton_kernel_of_an_earlier_notebook_runs(course, capsys):
    """``@triton.jit`` reads its function's source: the loaded cells' sources are where it looks (linecache)."""
    shutil.copy(ROOT / "solutions" / "06_triton_forward" / "06_triton_forward.ipynb", course("06_triton_forward", []))
    sb_forward = from_lesson("06_triton_forward", "sb_forward", check_sb_forward, fallback=library_attention)
    assert sb_forward is not library_attention, capsys.readouterr().out


@pytest.mark.parametrize("args, error, words", [
    (("../04_tiles", "blocked_attention", print, print), ValueError, "lesson must be the name of a lesson's folder"),
    (("", "blocked_attention", print, print), ValueError, "lesson must be"),
    (("04_tiles", "blocked attention", print, print), ValueError, "name must be the name of a function"),
    (("04_tiles", "blocked_attention", "check_it", print), TypeError, "check must be a function, got str"),
    (("04_tiles", "blocked_attention", print, None), TypeError, "fallback must be a function, got NoneType"),
])
def test_bad_arguments_are_refused(args, error, words):
    with pytest.raises(error, match=words):
        from_lesson(*args)


def test_an_earlier_lesson_that_takes_from_another_says_so(course, capsys):
    course("01_x", [new_code_cell("def triple(x):\n    return 3 * x")])
    course("02_y", [new_code_cell("from sb_ref.testing.lessons.earlier import from_lesson\n"
                                  "triple = from_lesson('01_x', 'triple', lambda fn: None, fallback=abs)\n"
                                  "def ninefold(x):\n    return triple(triple(x))")])
    ninefold = from_lesson("02_y", "ninefold", lambda fn: None, fallback=abs)
    assert ninefold(2) == 18
    assert capsys.readouterr().out.splitlines() == [
        "lesson 01_x: your `triple` passes <lambda>: it is the one used here",
        "lesson 02_y: your `ninefold` passes <lambda>: it is the one used here"]
