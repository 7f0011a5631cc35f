"""The grader counts a learner's Triton loads where no learner code ran: the launches recorded in the notebook, the
sources checked (plain Triton only), the launches replayed in a fresh kernel that defines nothing else, and the
replay's result matched against the function's.

Unit tests of the record check and of the replay, then real submissions graded end to end: an honest kernel, and
kernels that load whole rows while taking the interpreter's watch off, or forge the record."""
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from autograder.replay import RecordRefused, kernel_cell  # noqa: E402
from sb_ref.testing.loads import record_launches, replay_launches, watched_loads  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's loads (a CPU grader)")

LAUNCHERS = '''
@triton.jit
def walk_kernel(x_ptr, out_ptr, R, n, s_xr, s_xn, s_or, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    "Reverse exclusive cumsum of rows, BLOCK_N columns at a time, right to left, with a carry; out contiguous."
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    carry = tl.zeros([BLOCK_R, 1], dtype=tl.float32)
    n_blocks = tl.cdiv(n, BLOCK_N)
    for step in range(n_blocks):
        cols = (n_blocks - 1 - step) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < R)[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :] * s_xn, mask=mask, other=0.0)
        tl.store(out_ptr + rows[:, None] * s_or + cols[None, :],
                 tl.cumsum(x, axis=1, reverse=True) - x + carry, mask=mask)
        carry += tl.sum(x, axis=1, keep_dims=True)


@triton.jit
def zero_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    "Given x, reads none of it: zeros."
    o = tl.arange(0, BLOCK)
    tl.store(out_ptr + o, tl.zeros([BLOCK], dtype=tl.float32), mask=o < n)


def walk(x, block=32):
    R, n = x.shape
    out = torch.empty((R, n), dtype=torch.float32)
    walk_kernel[(triton.cdiv(R, 16),)](x, out, R, n, x.stride(0), x.stride(1), n, BLOCK_R=16, BLOCK_N=block)
    return out


def whole_rows(x, block=32):
    "Right answer, but one load per row of the whole row: not the walk."
    return walk(x, triton.next_power_of_2(x.shape[1]))
'''

namespace = {"torch": torch, "triton": triton, "tl": tl}


def _define():
    import linecache
    name = "<launchers of test_autograder_replay>"
    linecache.cache[name] = (len(LAUNCHERS), None, LAUNCHERS.splitlines(True), name)  # Triton reads the source
    exec(compile(LAUNCHERS, name, "exec"), namespace)


_define()


def _replay_here(record, watched, result):
    """The grader's two steps, in this process: the check of the record, then the replay on kernels defined from
    the checked cell alone."""
    import linecache
    import sys
    import types

    cell = kernel_cell(record)
    module = types.ModuleType("replayed_kernels")
    linecache.cache["<replayed>"] = (len(cell), None, cell.splitlines(True), "<replayed>")
    exec(compile(cell, "<replayed>", "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return replay_launches(record, watched, result, namespace=module.__name__)


def test_a_replayed_walk_loads_what_the_walk_loads():
    x = torch.randn(4, 200)
    result, record = record_launches(namespace["walk"], (x, 32))
    assert set(record["kernels"]) == {"walk_kernel"} and len(record["launches"]) == 1
    report = _replay_here(record, x, result)
    assert report == {"elements": 800, "widest": 32, "error": ""}
    _, here = watched_loads(namespace["walk"], (x, 32))  # the notebook's count: the same numbers
    assert (here.elements, here.widest) == (800, 32)
    _, wide = record_launches(namespace["whole_rows"], (x, 32))
    assert _replay_here(wide, x, namespace["whole_rows"](x))["widest"] == 200


def test_a_replay_that_does_not_give_the_result_or_has_no_kernel_is_an_error():
    x = torch.randn(4, 200)
    result, record = record_launches(namespace["walk"], (x, 32))
    assert "did not give your function's result" in _replay_here(record, x, result + 1)["error"]
    assert "none of the tensors" in _replay_here(record, torch.randn(4, 200), result)["error"]
    empty = {"tensors": [], "kernels": {}, "constants": {}, "launches": []}
    assert "launched no Triton kernel" in _replay_here(empty, x, result)["error"]


def _builtins_module_name():
    """A name under tl.core that is a module outside triton.language (standard library imports)."""
    import types
    return next(n for n in dir(tl.core) if not n.startswith("_") and isinstance(getattr(tl.core, n), types.ModuleType)
                and not getattr(tl.core, n).__name__.startswith("triton.language"))


BODY = "def walk_kernel(x_ptr, out_ptr, R, n, s_xr, s_xn, s_or, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):\n    {}\n"
HOSTILE = {
    "an import": ("import os", "Import"),
    "a builtin that reaches Python": ("open('/etc/hostname')", "`open`"),
    "a dunder": ("x = x_ptr.__class__", "not an attribute of a Triton tensor"),
    "the tensor's handle": ("x = tl.load(x_ptr).handle", "not an attribute of a Triton tensor"),
    "a module under tl": (f"m = tl.core.{_builtins_module_name()}", "not part of triton.language"),
    "another part of triton": ("x = triton.runtime", "triton.language (tl) only"),
    "a lambda": ("f = lambda: 0", "Lambda"),
    "a nested function": ("def inner():\n        pass", "FunctionDef"),
    "a global of the notebook": ("x = torch", "`torch`"),
    "rebinding tl": ("tl = 3", "rebinds"),
    "calling a variable": ("f = R\n    f()", "calls its own variable"),
}


@pytest.mark.parametrize("what", HOSTILE)
def test_a_record_whose_kernel_is_not_plain_triton_is_refused(what):
    body, message = HOSTILE[what]
    x = torch.randn(4, 200)
    _, record = record_launches(namespace["walk"], (x, 32))
    record["kernels"]["walk_kernel"] = BODY.format(body)
    with pytest.raises(RecordRefused, match=re.escape(message)):
        kernel_cell(record)


@pytest.mark.parametrize("what, change", [
    ("an unknown kernel", lambda r: r["launches"][0].update(kernel="os")),
    ("a huge grid", lambda r: r["launches"][0].update(grid=[1 << 20])),
    ("a tensor of no storage", lambda r: r["launches"][0]["args"][0]["tensor"].update(storage=7)),
    ("an object argument", lambda r: r["launches"][0]["args"].append({"value": [1, 2]})),
    ("two functions in one source", lambda r: r["kernels"].update(
        walk_kernel=r["kernels"]["walk_kernel"] + "\n\ndef other():\n    pass\n")),
    ("a name that is not a name", lambda r: r["constants"].update({"__builtins__": 1})),
])
def test_a_malformed_record_is_refused(what, change):
    _, record = record_launches(namespace["walk"], (torch.randn(4, 200), 32))
    change(record)
    with pytest.raises(RecordRefused):
        kernel_cell(record)


# ------------------------------------------------------------------------------------------------- graded

TRICKS = {
    "honest": "walk(x, block)",
    # the interpreter's load watch put back to the original before the launch: nothing in the notebook is counted
    "unwatched": "(setattr(interpreter.InterpreterBuilder, 'create_masked_load', ORIGINAL_LOAD), "
                 "whole_rows(x, block))[1]",
    # the launch recorder taken off as well: no launch is recorded at all
    "unrecorded": "(setattr(interpreter.InterpreterBuilder, 'create_masked_load', ORIGINAL_LOAD), "
                  "setattr(interpreter.InterpretedFunction, 'run', ORIGINAL_RUN), whole_rows(x, block))[2]",
    # a record of a kernel that is given x and loads none of it, for the whole-row kernel's result
    "forged": "(setattr(loads, 'record_launches', forged_record), whole_rows(x, block))[1]",
}

SETUP = LAUNCHERS + '''
from triton.runtime import interpreter
import sb_ref.testing.loads as loads

ORIGINAL_LOAD, ORIGINAL_RUN = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpretedFunction.run
REAL_RECORD = loads.record_launches


def forged_record(fn, args):
    x = args[0]
    out = torch.empty_like(x)
    _, record = REAL_RECORD(lambda: zero_kernel[(1,)](x, out, 1, BLOCK=16), ())
    return fn(*args), record
'''

TEST_CELL = """from sb_ref.testing.lessons.lesson05 import check_long_reverse_cumsum
check_long_reverse_cumsum({name}, cases=((3, 40, 16),))"""


def test_the_grader_counts_the_loads_of_a_replay_not_the_notebooks(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from autograder.grading import grade_notebook

    cells = [(new_code_cell("import os\nos.environ['TRITON_INTERPRET'] = '1'\nimport torch, triton\n"
                            "import triton.language as tl\n" + SETUP), "setup", {"locked": True})]
    cells += [(new_code_cell(f"def {name}(x, block=32):\n    return {body}"), name, {"solution": True})
              for name, body in TRICKS.items()]
    cells += [(new_code_cell(TEST_CELL.format(name=name)), f"test_{name}",
               {"grade": True, "locked": True, "points": 1}) for name in TRICKS]
    for cell, gid, meta in cells:
        cell.metadata["nbgrader"] = {"grade_id": gid, "schema_version": 3, "solution": False, "grade": False,
                                     "locked": False, **meta}
    nb = new_notebook()
    nb.cells = [cell for cell, _, _ in cells]
    path = tmp_path / "loads.ipynb"
    nbformat.write(nb, path)
    result = grade_notebook(path, path, call_timeout=120)
    outcome = {e.grade_id.removeprefix("test_"): e for e in result.exercises}
    assert outcome["honest"].status == "passed", outcome["honest"].message
    assert "read 200 columns" in outcome["unwatched"].message, outcome["unwatched"].message
    assert "launched no Triton kernel" in outcome["unrecorded"].message, outcome["unrecorded"].message
    assert "did not give your function's result" in outcome["forged"].message, outcome["forged"].message
    assert result.points == 1
