"""``python -m autograder [PATH ...]``: grade lesson notebooks. See ``--help``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import (
    DEFAULT_TIMEOUT,
    ERROR_MARKER,
    LESSONS_DIR,
    NotebookFailed,
    execute_notebook,
    find_notebooks,
    grade_notebook,
)

DESCRIPTION = """\
Grade the course's lesson notebooks. Each notebook runs top to bottom in its own process and
a fresh Jupyter kernel (working directory: the notebook's folder), and the report says, per
notebook, whether every cell, its visible checks included, ran without an error.
"""

EPILOG = """\
exit status: 0 when every notebook passed (or there was nothing to grade), 1 when one failed,
2 for a bad argument.

examples:
  python -m autograder                              grade every lesson in lessons/
  python -m autograder lessons/01-numpy             grade one lesson
  python -m autograder path/to/notebook.ipynb       grade one notebook
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autograder",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        metavar="PATH",
        nargs="*",
        type=Path,
        help="notebooks, or folders to search for notebooks (default: lessons/*/*.ipynb)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"time limit for each notebook (default: {DEFAULT_TIMEOUT:g})",
    )
    # Internal: what each notebook's child process runs.
    parser.add_argument("--execute-one", metavar="NOTEBOOK", type=Path, help=argparse.SUPPRESS)
    return parser


def _display(path: Path) -> str:
    """The path relative to the working directory when it lies inside it, else in full."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")

    if args.execute_one is not None:
        try:
            execute_notebook(args.execute_one, timeout=args.timeout)
        except NotebookFailed as exc:
            print(ERROR_MARKER + str(exc), flush=True)
            return 1
        return 0

    try:
        notebooks = find_notebooks(args.paths)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))

    if not notebooks:
        if args.paths:
            print("No notebooks found in: " + ", ".join(str(p) for p in args.paths))
        else:
            print(
                f"No lessons exist yet: {_display(LESSONS_DIR)}/ holds no lesson notebooks "
                "(lessons/<lesson>/<notebook>.ipynb).\n"
                "Once lessons are there, this command runs each one top to bottom in a fresh "
                "kernel and reports, per notebook, whether every cell and visible check passed."
            )
        return 0

    count = len(notebooks)
    print(
        f"Grading {count} notebook{'s' if count != 1 else ''} "
        f"(each in a fresh kernel, time limit {args.timeout:g} s each)",
        flush=True,
    )
    width = max(len(_display(p)) for p in notebooks)
    passed = failed = 0
    for notebook in notebooks:
        result = grade_notebook(notebook, timeout=args.timeout)
        verdict = "PASS" if result.passed else "FAIL"
        print(f"  {verdict}  {_display(notebook):<{width}}  ({result.seconds:.1f} s)", flush=True)
        if result.passed:
            passed += 1
        else:
            failed += 1
            print(f"        {result.message}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
