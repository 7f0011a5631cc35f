"""The grader against adversarial submissions: every trick gets a bounded, correct score and grading goes on.

The lesson here is synthetic (one function, two test cells, one hidden block) so that each case is quick.
"""
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from autograder.grading import grade_notebook
from autograder.kernel import MAX_STDOUT_CHARS, LearnerKernel
from autograder.sandbox import Sandbox, SandboxLimits, bwrap_problem

SOLUTION = "    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"
TEST_VISIBLE = "assert torch.equal(double(torch.ones(3)), 2 * torch.ones(3)), 'double(x) must be 2 * x'"
TEST_HIDDEN = "### BEGIN HIDDEN TESTS\nassert double(torch.tensor(-5.0)) == -10, 'hidden: negative input (qz7)'\n" \
              "### END HIDDEN TESTS"
TEST_GRAD = "x = torch.ones(2, requires_grad=True)\ndouble(x).sum().backward()\n" \
            "assert torch.equal(x.grad, 2 * torch.ones(2)), 'gradient of double must be 2'"


def _cell(source, grade_id, **meta):
    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"grade_id": grade_id, "schema_version": 3, "solution": False, "grade": False,
                                 "locked": False, **meta}
    return cell


def lesson(body, before=(), after=()):
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# Doubling"),
                _cell("import torch", "imports", locked=True),
                *before,
                _cell("def double(x):\n" + body, "double", solution=True),
                _cell(TEST_VISIBLE + "\n" + TEST_HIDDEN, "test_double", grade=True, locked=True, points=2),
                _cell(TEST_GRAD, "test_double_grad", grade=True, locked=True, points=1),
                *after]
    return nb


@pytest.fixture
def grade(tmp_path):
    source = tmp_path / "source.ipynb"
    nbformat.write(lesson(SOLUTION), source)

    def run(nb, with_hidden=True, **limits):
        path = tmp_path / "submission.ipynb"
        nbformat.write(nb, path)
        kw = {"cell_timeout": 8, "call_timeout": 8, "limits": SandboxLimits(memory_mb=4096), **limits}
        result = grade_notebook(path, source, with_hidden=with_hidden, **kw)
        return result, {e.grade_id: (e.points, e.status, e.message) for e in result.exercises}

    return run


def test_the_solution_scores_full_marks(grade):
    result, ex = grade(lesson(SOLUTION))
    assert (result.points, result.max_points) == (3, 3)
    assert {s for _, s, _ in ex.values()} == {"passed"}


def test_a_stub_is_not_attempted(grade):
    _, ex = grade(lesson("    raise NotImplementedError('write double')"))
    assert ex["test_double"][:2] == (0, "not attempted") and ex["test_double_grad"][:2] == (0, "not attempted")


def test_a_wrong_answer_fails_with_the_checks_message(grade):
    _, ex = grade(lesson("    return x + x.detach()"))  # right values, wrong gradient
    assert ex["test_double"][:2] == (2, "passed")
    assert ex["test_double_grad"] == (0, "failed", "gradient of double must be 2")


def test_hidden_tests_run_only_for_the_instructor(grade):
    nb = lesson("    return 2 * x.abs()")  # wrong only for negative inputs
    assert grade(nb, with_hidden=False)[1]["test_double"][:2] == (2, "passed")
    assert grade(nb, with_hidden=True)[1]["test_double"] == (0, "failed", "hidden: negative input (qz7)")


def test_editing_or_deleting_a_locked_test_cell_changes_nothing(grade):
    nb = lesson("    return 3 * x")
    nb.cells[3].source = "pass"  # the visible test, emptied
    del nb.cells[4]  # the gradient test, deleted
    result, ex = grade(nb)
    assert result.max_points == 3 and result.points == 0
    assert ex["test_double"][1] == "failed" and ex["test_double_grad"][1] == "failed"


def test_monkeypatching_checks_or_builtins_in_the_notebook_changes_nothing(grade):
    sneaky = _cell("import builtins, torch\nbuiltins.AssertionError = Exception\n"
                   "torch.equal = lambda a, b: True", "sneaky", solution=True)
    _, ex = grade(lesson("    return 3 * x", before=[sneaky]))
    assert ex["test_double"][:2] == (0, "failed")


def test_sys_exit_in_a_cell_is_just_an_error(grade):
    exits = _cell("import sys\nsys.exit(0)", "exits", solution=True)
    result, _ = grade(lesson(SOLUTION, before=[exits]))
    assert result.points == 3


def test_os_exit_during_a_check_crashes_only_that_exercise(grade):
    body = "    import os\n    if x.requires_grad:\n        os._exit(1)\n    return 2 * x"
    _, ex = grade(lesson(body))
    assert ex["test_double"][:2] == (2, "passed")
    assert ex["test_double_grad"][:2] == (0, "crashed")


def test_os_exit_while_defining_takes_the_definition_with_it(grade):
    body = SOLUTION + "\nimport os\nos._exit(0)"
    result, ex = grade(lesson(body))
    assert result.points == 0
    assert "died" in ex["test_double"][2] and result.notes


def test_an_endless_loop_times_out_and_grading_goes_on(grade):
    body = "    if x.dim() == 0:\n        while True:\n            pass\n    return 2 * x"
    result, ex = grade(lesson(body), call_timeout=3)
    assert ex["test_double"][:2] == (0, "timed out")  # the hidden check's call never returns
    assert ex["test_double_grad"][:2] == (1, "passed")  # the kernel was restarted and the definition replayed


def test_unbounded_allocation_fails_inside_the_learners_code(grade):
    body = "    hog = torch.empty(1 << 34)\n    return 2 * x"  # 64 GiB
    result, ex = grade(lesson(body))
    assert result.points == 0 and "RuntimeError" in ex["test_double"][2]


def test_a_crashing_native_call_is_contained(grade):
    body = "    import ctypes\n    ctypes.string_at(0)\n    return 2 * x"  # a segmentation fault
    result, ex = grade(lesson(body))
    assert result.points == 0 and {s for _, s, _ in ex.values()} == {"crashed"}


def test_the_kernel_never_holds_the_hidden_tests(grade):
    """The learner's code can search its whole process: the hidden tests' code is not there to find. The search
    answers through the score: double is right only while nothing is found."""
    body = ("    import gc\n"
            "    needle = 'negative input' + ' (qz7)'  # the hidden test's message, never written whole here\n"
            "    def strings(o):\n"
            "        items = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()\n"
            "        return [s for s in items if isinstance(s, str)]\n"
            "    hits = sum(needle in s and s != needle for o in gc.get_objects() for s in strings(o))\n"
            "    return 2 * x if hits == 0 else 3 * x")
    result, _ = grade(lesson(body))
    assert result.points == 3
    # the search does find the hidden test's words once they have been run in the kernel
    leak = _cell("# hidden: negative input (qz7)", "leak", locked=True)
    assert grade(lesson(body, before=[leak]))[0].points == 0


def test_a_crash_inside_the_triton_interpreter_is_contained(grade):
    """An out-of-bounds store through the interpreter takes the kernel process down, not the grader."""
    kernel = _cell("import os\nos.environ['TRITON_INTERPRET'] = '1'\nimport triton, triton.language as tl\n"
                   "@triton.jit\ndef scribble(P):\n    tl.store(P + 10**12 + tl.arange(0, 1024), 1.0)\n",
                   "scribble", solution=True)
    body = "    if x.requires_grad:\n        scribble[(1,)](x.detach())\n    return 2 * x"
    _, ex = grade(lesson(body, before=[kernel]))
    assert ex["test_double"][:2] == (2, "passed")
    assert ex["test_double_grad"][:2] == (0, "crashed")


def test_a_cell_dressed_up_as_a_test_earns_nothing(grade):
    forged = _cell("pass", "test_bonus", grade=True, locked=True, points=100)
    result, ex = grade(lesson("    return 3 * x", after=[forged]))
    assert set(ex) == {"test_double", "test_double_grad"} and (result.points, result.max_points) == (0, 3)


# --------------------------------------------------------------------------------------------------------------
# a notebook that replaces its own side of the protocol (the kernel runs `serve_call(...)` by name: a cell can
# define its own) gets its answers refused, and the grader neither imports, blocks nor writes where it points

def _own_serve_call(body):
    return _cell("import os, torch\nfrom autograder import wire\n"
                 "from autograder.serve import serve_call as real_serve_call\n\n"
                 "def serve_call(namespace, target, request_path, answer, call_id):\n" + body,
                 "own_protocol", solution=True)


def test_an_answer_naming_a_module_to_import_is_refused(grade, tmp_path, monkeypatch):
    """The module is planted by the test on the grader's path (the sandbox cannot write there): the grader must
    still not import what an answer names."""
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "imported.txt"
    (tmp_path / "sb_planted_module.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef f(*args):\n"
                                                   "    return True\n")
    body = ("    path, n = answer\n"
            "    import io; value = {'__dict__': [('result', {'__function__': ['sb_planted_module', 'f']})]}\n"
            "    buffer = io.BytesIO(); torch.save(value, buffer); data = buffer.getvalue()\n"
            "    open(path, 'wb').write(wire.FRAME.pack(wire.MAGIC, n, len(data)) + data)\n")
    result, ex = grade(lesson("    return 2 * x", before=[_own_serve_call(body)]))
    assert not marker.exists() and "sb_planted_module" not in sys.modules, "the grader imported the module"
    assert result.points == 0 and ex["test_double"][1] == "failed"
    assert "refused" in ex["test_double"][2] and "imports nothing" in ex["test_double"][2]


@pytest.mark.parametrize("written, refusal", [
    ("b'not a frame at all, and then some more bytes'", "not an answer of the grader's protocol"),
    ("wire.FRAME.pack(wire.MAGIC, n, 3 << 30)", "more than"),
    ("b''", "no answer"),
])
def test_what_the_notebook_writes_into_the_answer_pipe_is_bounded_and_never_blocks(grade, written, refusal):
    body = f"    path, n = answer\n    open(path, 'wb').write({written})\n"
    start = time.monotonic()
    result, ex = grade(lesson("    return 2 * x", before=[_own_serve_call(body)]))
    assert time.monotonic() - start < 60, "reading the answer blocked"
    assert result.points == 0 and refusal in ex["test_double"][2]


def test_the_call_folder_cannot_be_written_from_the_sandbox(grade, tmp_path):
    """A link planted as the next request would make the grader write where the notebook chose: the sandbox sees
    the grader's call folder read-only, so there is nothing to plant, and the calls go on."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the learner's target")
    body = ("    folder, name = os.path.split(request_path)\n"
            "    n = int(name.split('.')[0])\n"
            "    try:\n"
            f"        os.symlink({str(victim)!r}, os.path.join(folder, f'{{n + 1}}.request.pt'))\n"
            "    except OSError:\n"
            "        pass\n"
            "    else:\n"
            "        raise SystemExit('planted')\n"
            "    real_serve_call(namespace, target, request_path, answer, call_id)\n")
    result, ex = grade(lesson("    return 2 * x", before=[_own_serve_call(body)]))
    assert victim.read_text() == "the learner's target"
    assert result.points == 3, ex


def test_a_stride_0_tensor_of_gigabytes_is_refused_before_any_copy(grade):
    result, ex = grade(lesson("    return torch.zeros(1).expand(1 << 29)"))  # 2 GiB once copied
    assert result.points == 0 and "refused" in ex["test_double"][2] and "MiB" in ex["test_double"][2]


def test_the_grader_keeps_at_most_a_bounded_part_of_what_a_cell_prints(tmp_path):
    sandbox = Sandbox(tmp_path, SandboxLimits(memory_mb=4096), enabled=bwrap_problem() is None)
    with LearnerKernel(sandbox) as kernel:
        outcome = kernel.run("print('x' * (8 << 20))", timeout=60)
    sandbox.close()
    assert outcome.status == "ok" and MAX_STDOUT_CHARS <= len(outcome.stdout) < MAX_STDOUT_CHARS + 100
