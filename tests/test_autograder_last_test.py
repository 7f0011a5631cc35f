"""The grader runs a notebook's cells only up to its last graded test cell: what comes after cannot change a score, so
it never runs (the capstone's training, say), however slow or deadly it is; a cell before a test still runs."""
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from autograder.grading import grade_notebook
from autograder.sandbox import SandboxLimits

SLOW = "import time\ntime.sleep(60)"
DEADLY = "import os\nos._exit(1)"


def _cell(source, grade_id, **meta):
    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"grade_id": grade_id, "schema_version": 3, "solution": False, "grade": False,
                                 "locked": False, **meta}
    return cell


def lesson():
    nb = new_notebook()
    nb.cells = [new_markdown_cell("# Doubling"),
                _cell("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION", "double",
                      solution=True),
                _cell("assert double(2) == 4", "test_first", grade=True, locked=True, points=1),
                new_code_cell(SLOW),  # before the last test: it runs, times out, and the grading goes on
                _cell("assert double(3) == 6", "test_last", grade=True, locked=True, points=1),
                new_markdown_cell("## After the last test"),
                new_code_cell(SLOW),
                new_code_cell(DEADLY)]
    return nb


def test_nothing_after_the_last_test_cell_runs(tmp_path):
    source, submission = tmp_path / "source.ipynb", tmp_path / "submission.ipynb"
    nbformat.write(lesson(), source)
    nbformat.write(lesson(), submission)
    grade = grade_notebook(submission, source, cell_timeout=4, call_timeout=8, limits=SandboxLimits(memory_mb=4096))
    assert (grade.points, grade.max_points) == (2, 2)
    assert len(grade.notes) == 1 and "ran past its time limit" in grade.notes[0], grade.notes  # the one before
