"""Every solution notebook's GPU path, on a CUDA machine: the notebook's code cells run top to bottom as one
script, with the real Triton compiler and the larger sizes the lessons choose on a GPU, and every check (speed
tiers included) must pass.

The cells run as a plain Python script rather than through a Jupyter kernel, so this needs neither Jupyter nor
nbformat on the GPU machine (notebooks are JSON). Marked `gpu`: skipped without CUDA. Set SB_LESSON_LOGS=folder
to keep each notebook's output.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted(p.name for p in (ROOT / "solutions").glob("[0-9][0-9]_*") if p.is_dir())

# What a notebook gets from IPython that a script does not: display() and an inline backend for pictures.
PRELUDE = """\
import matplotlib
matplotlib.use("Agg")
try:
    from IPython.display import display
except ImportError:
    display = print
"""


def notebook_as_script(path):
    """The code cells of a notebook, in order, as one script (IPython magics and shell lines left out)."""
    cells = json.loads(path.read_text())["cells"]
    code = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
        code.append("\n".join(lines))
    return PRELUDE + "\n\n".join(code) + "\n"


def composes(notebook):
    """Whether a notebook takes a function from an earlier lesson (sb_ref.testing.lessons.earlier.from_lesson)."""
    return "from_lesson(" in notebook_as_script(notebook)


@pytest.mark.parametrize("lesson", LESSONS)
def test_solution_notebook_runs_on_the_gpu(lesson, tmp_path):
    """Run from a copy of the whole solutions folder, so that a lesson that builds on an earlier one finds that
    lesson's notebook beside it, as in a learner's course folder, and must use it rather than the fallback."""
    course = tmp_path / "solutions"
    shutil.copytree(ROOT / "solutions", course, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    notebook = course / lesson / f"{lesson}.ipynb"
    script = tmp_path / f"{lesson}.py"
    script.write_text(notebook_as_script(notebook))
    env = dict(os.environ, MPLBACKEND="Agg", MPLCONFIGDIR=str(tmp_path / "mpl"))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=notebook.parent, env=env, capture_output=True,
                          text=True, timeout=900)
    logs = os.environ.get("SB_LESSON_LOGS")
    if logs:
        Path(logs).mkdir(parents=True, exist_ok=True)
        (Path(logs) / f"{lesson}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, f"{lesson} failed on the GPU:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "passed" in proc.stdout, f"{lesson}: no check said it passed:\n{proc.stdout[-2000:]}"
    if composes(notebook):
        assert "it is the one used here" in proc.stdout and "in its place" not in proc.stdout, \
            f"{lesson} fell back to the library instead of the earlier lesson's solution:\n{proc.stdout[-2000:]}"
