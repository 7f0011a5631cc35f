"""``python -m autograder``: grade lesson notebooks and print a report. See ``--help``."""
import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LESSONS_DIR = REPO_ROOT / "lessons"
SOLUTIONS_DIR = REPO_ROOT / "solutions"

DESCRIPTION = """\
Grade the course's lesson notebooks and print, per exercise, the points earned and what to fix.

Each notebook's own code runs in a fresh Jupyter kernel of its own, inside a bubblewrap sandbox (its own
namespaces, an unprivileged uid, a read-only view of the library and of its own folder only), with time, memory
and process limits. The test cells run in the grader, from the course's trusted copy in solutions/ (so editing a
test cell changes nothing), calling into the notebook's functions. Hidden tests run only with --with-hidden,
and only in the sandbox unless --no-sandbox says otherwise.
"""

EPILOG = """\
exit status: 0 when grading ran, whatever the score; 2 for a bad argument or path, or --with-hidden where no
sandbox can be made (without --no-sandbox); 1 when a notebook changed the grader's own files (autograder/,
sb_ref/, solutions/), after which no score could be trusted.

examples:
  python -m autograder                                  grade every lesson in lessons/
  python -m autograder lessons/02_log_space             grade one lesson
  python -m autograder --with-hidden submitted/         instructors: a folder of submissions, hidden tests too
  python -m autograder --json grades.json               also write the report as JSON
  python -m autograder --with-hidden submitted/ --leaderboard board.md
                                                        also rank every submission's lesson-08 kernel by its speed
                                                        against sb_ref's, timed in this process (needs a GPU; without
                                                        one the table lists the numerics and says "no GPU")
"""


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m autograder", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", metavar="PATH", nargs="*", type=Path,
                        help="notebooks, or folders to search for notebooks (default: lessons/)")
    parser.add_argument("--with-hidden", action="store_true",
                        help="instructors: also run the hidden tests, taken from solutions/")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the report to FILE as JSON")
    parser.add_argument("--leaderboard", metavar="FILE", type=Path,
                        help="also write a markdown table of every lesson-08 kernel's speed against sb_ref's, "
                             "ranked (timed on a GPU only; autograder/leaderboard.py)")
    parser.add_argument("--solutions", metavar="DIR", type=Path, default=SOLUTIONS_DIR,
                        help="the trusted lessons, with their tests (default: solutions/)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=300.0,
                        help="time limit for each cell and each call into the notebook (default: 300)")
    parser.add_argument("--memory-mb", metavar="MB", type=int, default=8192,
                        help="memory limit of each notebook's processes together (default: 8192)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run the notebooks' code without bubblewrap, with your own rights (not for grading "
                             "others' work)")
    return parser


def find_notebooks(paths):
    """The notebooks to grade, sorted: given notebooks as they are, folders searched recursively (Jupyter's
    checkpoint copies skipped); with no paths, ``lessons/*/*.ipynb``."""
    if not paths:
        return sorted(LESSONS_DIR.glob("*/*.ipynb"))
    found = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        if path.is_dir():
            found += [p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts]
        elif path.suffix == ".ipynb":
            found.append(path)
        else:
            raise ValueError(f"not a notebook (.ipynb) or a folder: {path}")
    return sorted({p.resolve() for p in found})


def _display(path):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _fingerprint():
    """A digest of everything grading trusts: the grader, the installed sb_ref (checks included), solutions/."""
    import hashlib

    import sb_ref

    digest = hashlib.sha256()
    for root in (Path(__file__).resolve().parent, Path(sb_ref.__file__).resolve().parent, SOLUTIONS_DIR):
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and ".ipynb_checkpoints" not in path.parts:
                digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _device():
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    if args.memory_mb < 0:
        parser.error("--memory-mb must be 0 (no limit) or a positive number")
    try:
        notebooks = find_notebooks(args.paths)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if not notebooks:
        where = ", ".join(map(str, args.paths)) if args.paths else f"{_display(LESSONS_DIR)}/ (<lesson>/<lesson>.ipynb)"
        print(f"No lesson notebooks to grade in {where}.")
        return 0
    if args.leaderboard is not None:
        from .leaderboard import LESSON
        if not any(p.stem == LESSON for p in notebooks):
            parser.error(f"--leaderboard ranks lesson 08's kernels, and no {LESSON}.ipynb is among the notebooks "
                         "to grade")
        if args.leaderboard.is_dir() or not args.leaderboard.parent.is_dir():
            parser.error(f"--leaderboard: cannot write a file at {args.leaderboard}")

    from .sandbox import SandboxLimits, bwrap_problem

    problem = "--no-sandbox was given" if args.no_sandbox else bwrap_problem()
    if problem and args.with_hidden and not args.no_sandbox:
        print(f"error: refusing to grade with hidden tests outside a sandbox: {problem}. Install bubblewrap, or "
              "pass --no-sandbox to grade unsandboxed anyway.", file=sys.stderr)
        return 2
    if problem:
        print(f"note: no sandbox ({problem}): the notebooks' code runs with your own rights.", file=sys.stderr)

    from sb_ref.testing.speed import recorded_speeds

    from .grading import NotebookGrade, grade_notebook  # heavy imports only once there is work
    from .leaderboard import LESSON, Leaderboard, submission_name
    from .report import table, write_json

    device = _device()
    on_gpu = device != "cpu"
    trusted = _fingerprint()
    grades = []
    board = Leaderboard() if args.leaderboard is not None else None
    if board is not None and not on_gpu:
        print("note: no GPU: the leaderboard needs one to time the kernels; its table will list the numerics only, "
              "with \"no GPU\" for the speed.", file=sys.stderr)
    print(f"Grading {len(notebooks)} notebook(s) on {device}"
          f"{', hidden tests included' if args.with_hidden else ''}:", file=sys.stderr, flush=True)
    for n, path in enumerate(notebooks, 1):
        label = path.stem if path.parent.parent == LESSONS_DIR.resolve() else _display(path)[:-len(".ipynb")]
        source = args.solutions / path.stem / f"{path.stem}.ipynb"
        print(f"  [{n}/{len(notebooks)}] {_display(path)} ...", end="", file=sys.stderr, flush=True)
        for_board = board is not None and path.stem == LESSON
        with recorded_speeds() as speeds:  # what the speed checks measure, here in the grader's process
            if not source.exists():
                grade = NotebookGrade(str(path), label, error=f"not a lesson of this course: no {_display(source)}")
            else:
                try:
                    grade = grade_notebook(path, source, with_hidden=args.with_hidden, lesson=label,
                                           cell_timeout=args.timeout, call_timeout=args.timeout,
                                           limits=SandboxLimits(memory_mb=args.memory_mb), sandboxed=not problem,
                                           gpu=on_gpu)
                except Exception as exc:  # an unreadable notebook, a kernel that cannot start: this notebook only
                    grade = NotebookGrade(str(path), label, error=f"could not be graded: {type(exc).__name__}: {exc}")
        if _fingerprint() != trusted:  # learner code wrote into the grader's own files: nothing after is sound
            print(f"\nerror: grading {_display(path)} changed the grader's files (autograder/, sb_ref/ or "
                  "solutions/). Restore them (git status, git checkout) and grade again; that submission "
                  "tampered with the grader.", file=sys.stderr)
            return 1
        grades.append(grade)
        if for_board:
            board.add(submission_name(path, _display), grade, speeds)
        print(f" {grade.points:g}/{grade.max_points:g} points ({grade.seconds:.0f} s)", file=sys.stderr, flush=True)
    print(table(grades))
    if args.json:
        write_json(args.json, grades, with_hidden=args.with_hidden, device=device)
        print(f"\nJSON report: {_display(args.json)}")
    if board is not None:
        board.write(args.leaderboard, device=device, on_gpu=on_gpu)
        print(f"\nLeaderboard: {_display(args.leaderboard)}" + ("" if on_gpu else " (no GPU: numerics only)"))
    return 0
