"""Grading harness for the course's lesson notebooks.

Run it from the repository root with ``python -m autograder`` (or ``make grade``). It is not
installed with ``sb_ref``: it runs from this repository only. The checks that notebooks call
live in the installed package, in ``sb_ref.testing``.

What grading means today: every lesson notebook is executed top to bottom in its own process
and a fresh Jupyter kernel, with a time limit; a notebook passes when all of its cells, its
visible checks included, run without an error.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "LESSONS_DIR",
    "DEFAULT_TIMEOUT",
    "NotebookFailed",
    "NotebookResult",
    "find_notebooks",
    "execute_notebook",
    "grade_notebook",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
LESSONS_DIR = REPO_ROOT / "lessons"

#: Default time limit for one notebook, in seconds.
DEFAULT_TIMEOUT = 600.0

#: On a failure, the child process prints its verdict on one line that starts with this.
ERROR_MARKER = "AUTOGRADER-ERROR: "


class NotebookFailed(Exception):
    """A notebook did not run to the end; the message says where and why."""


@dataclass
class NotebookResult:
    """The outcome of running one notebook."""

    path: Path
    passed: bool
    seconds: float
    message: str = ""


def find_notebooks(paths: list[Path] | None = None) -> list[Path]:
    """Return the notebooks to grade, sorted.

    With no paths, the lessons: ``lessons/*/*.ipynb`` (one folder per lesson). A path that is a
    notebook is taken as it is; a folder is searched recursively. Jupyter's checkpoint copies are
    skipped. Raises ``FileNotFoundError`` for a path that does not exist and ``ValueError`` for a
    file that is not a notebook.
    """
    if not paths:
        found = list(LESSONS_DIR.glob("*/*.ipynb")) if LESSONS_DIR.is_dir() else []
    else:
        found = []
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"no such file or folder: {path}")
            if path.is_dir():
                found.extend(path.rglob("*.ipynb"))
            elif path.suffix == ".ipynb":
                found.append(path)
            else:
                raise ValueError(f"not a notebook (.ipynb) or a folder: {path}")
    notebooks = {p.resolve() for p in found if ".ipynb_checkpoints" not in p.parts}
    return sorted(notebooks)


def execute_notebook(path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Execute one notebook in this process, in a new kernel whose working directory is its folder.

    Raises ``NotebookFailed`` naming the first failing cell and its error, or saying that the
    cells together ran past ``timeout`` seconds. The kernel is shut down either way; nothing is
    written back to the notebook.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:
        raise NotebookFailed(f"cannot read the notebook: {type(exc).__name__}: {exc}") from exc

    deadline = time.monotonic() + timeout
    client = NotebookClient(
        nb,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        allow_errors=False,
        # One budget for the whole notebook: each cell gets whatever time is left.
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
    )
    try:
        client.execute()
    except CellExecutionError as exc:
        raise NotebookFailed(f"{_where(nb)}{exc.ename}: {_first_line(exc.evalue)}") from exc
    except CellTimeoutError as exc:
        raise NotebookFailed(f"{_where(nb, running=True)}did not finish within {timeout:g} s") from exc
    except DeadKernelError as exc:
        raise NotebookFailed(f"the kernel died (crash or out of memory): {_first_line(str(exc))}") from exc


def _where(nb, running: bool = False) -> str:
    """'cell N: ' for the cell that failed (the first with an error output, or the last one
    that started when ``running``), or '' when it cannot be told."""
    last_started = None
    for index, cell in enumerate(nb.cells, start=1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index}: "
        if cell.get("cell_type") == "code" and "execution" in cell.get("metadata", {}):
            last_started = index
    if running and last_started is not None:
        return f"cell {last_started}: "
    return ""


def _first_line(text: str) -> str:
    text = (text or "").strip()
    return text.splitlines()[0] if text else ""


def grade_notebook(path: Path, timeout: float = DEFAULT_TIMEOUT) -> NotebookResult:
    """Run one notebook in a child process and report whether every cell ran without an error.

    The child is ``python -m autograder --execute-one PATH``, so a notebook that crashes or hangs
    cannot take the grader down with it. The child stops the notebook after ``timeout`` seconds;
    should the child itself hang, it is killed a minute later. Either way the notebook fails.
    """
    path = Path(path).resolve()
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "autograder", "--execute-one", str(path), "--timeout", str(timeout)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
    except subprocess.TimeoutExpired:
        return NotebookResult(path, False, time.monotonic() - start, f"did not finish within {timeout:g} s")
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return NotebookResult(path, True, seconds)
    return NotebookResult(path, False, seconds, _failure_message(proc.stdout + "\n" + proc.stderr))


def _failure_message(output: str) -> str:
    """The child's verdict line, or else the last line it printed."""
    lines = [line.rstrip() for line in output.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith(ERROR_MARKER):
            return line[len(ERROR_MARKER):]
    return lines[-1] if lines else "failed without output"
