"""Grading one notebook: the learner's cells in a limited kernel, the trusted test cells in the grader.

1. The trusted copy of the lesson is its source in ``solutions/``: its locked cells (tests included) replace
   whatever the submission has under the same ``grade_id``, so editing a test cell changes nothing; hidden
   test blocks are cut out unless the instructor asks for them; test cells the learner deleted come back.
2. Every other code cell up to the last test cell runs, in order, in a fresh
   :class:`~autograder.kernel.LearnerKernel` with time and memory limits (what comes after the last test cannot
   change a score, so it does not run). A cell that times out or kills the kernel is recorded; the kernel is restarted and the cells
   that ran before are replayed, so one bad cell costs only what depends on it.
3. Each test cell runs in the grader's process, its names resolving to the real checks and, for the learner's
   functions, to proxies into the kernel (:mod:`autograder.remote`). A cell that raises nothing earns its
   points (or the number its last expression gives, for partial credit); an ``AssertionError`` fails it, with
   the check's message; "not attempted" (a ``NotImplementedError`` stub) scores zero without blame.
"""
import ast
import contextlib
import io
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from . import rules
from .kernel import LearnerKernel
from .replay import Replayer
from .remote import LearnerCrash, LearnerTimeout, RemoteFunction, RemoteNamespace, RemoteSession
from .sandbox import Sandbox, SandboxLimits

HIDDEN = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS.*?^[ \t]*### END HIDDEN TESTS[^\n]*\n?", re.M | re.S)
STATUSES = ("passed", "failed", "not attempted", "timed out", "crashed")


@dataclass
class Exercise:
    """The outcome of one autograded test cell."""

    grade_id: str
    max_points: float
    points: float = 0.0
    status: str = "not attempted"
    message: str = ""


@dataclass
class NotebookGrade:
    """The outcome of one notebook: its exercises, totals, and a note if grading it could not run at all."""

    path: str
    lesson: str
    exercises: list = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    notes: list = field(default_factory=list)  # cells that timed out or killed the kernel

    @property
    def points(self):
        return sum(e.points for e in self.exercises)

    @property
    def max_points(self):
        return sum(e.max_points for e in self.exercises)

    def to_dict(self):
        return {"path": self.path, "lesson": self.lesson, "points": self.points, "max_points": self.max_points,
                "seconds": round(self.seconds, 2), "error": self.error, "notes": list(self.notes),
                "exercises": [asdict(e) for e in self.exercises]}


def _nbgrader(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def is_test_cell(cell):
    meta = _nbgrader(cell)
    return cell.cell_type == "code" and meta.get("grade", False) and not meta.get("solution", False)


def trusted_cells(source_nb, with_hidden):
    """grade_id -> trusted cell for every locked or graded cell of the source notebook."""
    cells = {}
    for cell in source_nb.cells:
        meta = _nbgrader(cell)
        if meta.get("grade_id") and (meta.get("locked") or is_test_cell(cell)) and not meta.get("solution"):
            cell = nbformat.from_dict(dict(cell))
            if not with_hidden:
                cell.source = HIDDEN.sub("", cell.source)
            cells[meta["grade_id"]] = cell
    return cells


def cells_to_run(submission_nb, source_nb, with_hidden):
    """The code cells to execute, in the submission's order, with trusted cells put back.

    Only the trusted copy decides what is a test: a submission's own cells run as plain code, whatever their
    metadata claims (a cell dressed up as a graded test earns nothing). Each cell is tagged ``cell.origin``:
    "trusted" (a locked cell, from solutions/), "given" (the lesson's own code, unchanged), "exercise" (the
    learner's answer in a solution cell of the lesson) or "free" (anything else the learner wrote)."""
    trusted = trusted_cells(source_nb, with_hidden)
    exercises = {_nbgrader(c).get("grade_id") for c in source_nb.cells if _nbgrader(c).get("solution")}
    given = {c.source for c in source_nb.cells if c.cell_type == "code" and not _nbgrader(c).get("solution")}
    seen, cells = set(), []
    for cell in submission_nb.cells:
        grade_id = _nbgrader(cell).get("grade_id")
        if grade_id in trusted:
            if grade_id in seen:
                continue  # a duplicated locked cell is run once
            seen.add(grade_id)
            cell = trusted[grade_id]
            cell.origin = "trusted"
        elif cell.cell_type == "code":
            origin = ("exercise" if grade_id in exercises and _nbgrader(cell).get("solution") else
                      "given" if cell.source in given else "free")
            cell = nbformat.v4.new_code_cell(cell.source)
            cell.origin = origin
        if cell.cell_type == "code":
            cells.append(cell)
    for gid, cell in trusted.items():
        if gid not in seen and is_test_cell(cell):
            cell.origin = "trusted"
            cells.append(cell)
    return cells


def _run_trusted(source, namespace, trusted_globals):
    """Execute a test cell in the grader; returns the value of its last expression (or None)."""
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, "<test cell>", "exec"), trusted_globals, namespace)
    if last is not None:
        return eval(compile(ast.Expression(last.value), "<test cell>", "eval"), trusted_globals, namespace)
    return None


def _score_test(cell, session, trusted_globals):
    meta = _nbgrader(cell)
    exercise = Exercise(meta["grade_id"], float(meta.get("points", 0)))
    namespace = RemoteNamespace(session, trusted_globals)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = _run_trusted(cell.source, namespace, trusted_globals)
    except NotImplementedError as exc:
        exercise.status, exercise.message = "not attempted", str(exc) or "not attempted yet"
    except AssertionError as exc:
        message = str(exc) or "a check failed"
        exercise.status = "not attempted" if "not attempted" in message.lower() else "failed"
        exercise.message = message
    except LearnerTimeout as exc:
        exercise.status, exercise.message = "timed out", str(exc)
    except LearnerCrash as exc:
        exercise.status, exercise.message = "crashed", str(exc)
    except Exception as exc:  # the check could not run: the learner's function misbehaved
        exercise.status, exercise.message = "failed", f"{type(exc).__name__}: {exc}"
    else:
        exercise.status = "passed"
        exercise.points = exercise.max_points
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # partial credit
            exercise.points = min(max(float(value), 0.0), exercise.max_points)
            exercise.message = getattr(value, "note", "")
            if exercise.points < exercise.max_points:
                exercise.status = "failed"
                exercise.message = f"partial credit: {exercise.points:g}" + (
                    f" ({exercise.message})" if exercise.message else "")
    return exercise


def trusted_globals():
    """The namespace test cells run in: the learners' checks and the usual modules, nothing of the learner."""
    import numpy as np
    import torch

    import sb_ref
    import sb_ref.testing
    from sb_ref.testing import lessons

    names = {"__name__": "__autograder__", "np": np, "numpy": np, "torch": torch, "sb_ref": sb_ref}
    names.update({k: getattr(sb_ref.testing, k) for k in sb_ref.testing.__all__})
    names.update(lessons.checks())  # so a one-line test cell calls the real check, whatever the learner defines
    return names


def grade_notebook(path, source_path, *, with_hidden=False, cell_timeout=120.0, call_timeout=120.0,
                   limits=SandboxLimits(), sandboxed=True, gpu=False, lesson=None):
    """Grade the notebook at ``path`` against the trusted source at ``source_path``, its code in a sandbox of its
    own (:class:`~autograder.sandbox.Sandbox`, off with ``sandboxed=False``) under ``limits``; ``gpu`` lets it see the
    GPUs (and watches its resident memory where no cgroup holds it)."""
    start = time.monotonic()
    grade = NotebookGrade(str(path), lesson or Path(path).stem)
    submission, source = nbformat.read(path, as_version=4), nbformat.read(source_path, as_version=4)
    cells = cells_to_run(submission, source, with_hidden)
    grade.exercises = [Exercise(_nbgrader(c)["grade_id"], float(_nbgrader(c).get("points", 0)))
                       for c in cells if is_test_cell(c)]
    env = {"MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    names = trusted_globals()
    sandbox = Sandbox(Path(path).resolve().parent, limits, hidden=rules.hidden_files(Path(source_path).stem),
                      enabled=sandboxed)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(sandbox.close)
        kernel = cleanup.enter_context(LearnerKernel(sandbox, gpu=gpu, rss_limit_mb=limits.memory_mb if gpu else 0,
                                                     env=env))
        session = RemoteSession(kernel, call_timeout)
        cleanup.callback(session.close)
        definitions = []  # (source, learner's?) of the trusted, given and exercise cells run so far
        session.measuring = MeasuringKernel(sandbox, definitions, env, gpu, call_timeout)
        cleanup.callback(session.measuring.close)
        if gpu:  # memory is read off a cgroup, which sees no GPU memory: it is measured on the CPU, interpreted
            session.memory_measuring = MeasuringKernel(sandbox, definitions, {**env, "TRITON_INTERPRET": "1"}, False,
                                                       call_timeout)
            cleanup.callback(session.memory_measuring.close)
        session.replayer = Replayer(limits, sandboxed, call_timeout)
        cleanup.callback(session.replayer.close)
        session.bootstrap()
        replay, results = [], {}
        session.restore = lambda: _restart(kernel, session, replay, cell_timeout)  # after a check's alone()
        last_test = max((i for i, c in enumerate(cells) if is_test_cell(c)), default=-1)
        for cell in cells[:last_test + 1]:  # what runs after the last test cannot change a score
            if is_test_cell(cell):
                exercise = results[_nbgrader(cell)["grade_id"]] = _score_test(cell, session, names)
                if exercise.status in ("timed out", "crashed"):  # the kernel is fresh: bring its state back
                    session.bootstrap()
                    _replay(kernel, replay, cell_timeout)
                elif exercise.status == "failed" and "NameError" in exercise.message and grade.notes:
                    exercise.message += f" (earlier: {grade.notes[-1]})"
                continue
            outcome = kernel.run(cell.source, timeout=cell_timeout)
            if outcome.status in ("timeout", "died"):
                first_line = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                grade.notes.append(f"the cell starting {first_line[:40]!r} {outcome.message}")
                session.bootstrap()
                _replay(kernel, replay, cell_timeout)
            else:
                replay.append(cell.source)
                if cell.origin != "free":
                    definitions.append((cell.source, cell.origin == "exercise"))
        grade.exercises = [results.get(e.grade_id, e) for e in grade.exercises]
    grade.seconds = time.monotonic() - start
    return grade


class MeasuringKernel:
    """Where the grader measures the learner's functions from outside: a second kernel, in a cgroup of its own, that
    runs the lesson's own cells and the learner's exercise cells (nothing else of the notebook), then the calls to
    measure. It stays for the notebook's later checks (started again after a timeout, a crash, or
    :meth:`RemoteSession.alone`).

    - :meth:`memory` (:meth:`autograder.remote.RemoteFunction.measure_memory`): whatever the learner's code leaves
      held there (its cells and every call, counted as anonymous memory, which no ballast freed later can hide) is
      ``held``. Before a measured call the cgroup's peak is reset: its rise above the memory charged at that moment
      is what the call took. What a call took is the larger of that peak and the pages it faulted in, so memory
      freed and taken again during the call (ballast given up to make room) counts too.
    - :meth:`time_calls` (:meth:`autograder.remote.RemoteFunction.time_calls`): the grader's clock around each
      call into the kernel."""

    def __init__(self, sandbox, definitions, env, gpu, timeout):
        self.sandbox, self.definitions, self.env, self.gpu, self.timeout = sandbox, definitions, env, gpu, timeout
        self.kernel = self.session = None
        self.ran = self.held = 0

    def _ready(self):
        """Starts the kernel if need be and runs the cells defined since; returns its memory meter (its cgroup, or
        its process tree where the machine gives no cgroup)."""
        if self.kernel is None:
            self.kernel = LearnerKernel(self.sandbox, gpu=self.gpu, env=self.env)
            self.kernel.start()
            self.session = RemoteSession(self.kernel, self.timeout)
            self.session.bootstrap()
            self.ran = self.held = 0
        cgroup = self.kernel.meter
        for source, learners in self.definitions[self.ran:]:
            self._learner_code(cgroup, lambda: self.kernel.run(source, timeout=self.timeout), learners)
        self.ran = len(self.definitions)
        return cgroup

    def memory(self, target, warmup_args, args):
        with self._afresh_after_failure():
            cgroup = self._ready()
            if cgroup is None:
                return None
            fn = RemoteFunction(self.session, target, target)
            warm = self._learner_code(cgroup, lambda: fn(*warmup_args))
            peak = cgroup.watch_peak()
            start, faulted = cgroup.memory_bytes(), cgroup.faulted_bytes()
            self._learner_code(cgroup, lambda: fn(*args))
            took = max(peak() - start, cgroup.faulted_bytes() - faulted, 0)
            return warm, took, self.held

    def time_calls(self, target, helper, case, seeds, reps):
        with self._afresh_after_failure():
            cgroup = self._ready()
            fn, timed = RemoteFunction(self.session, target, target), RemoteFunction(self.session, helper, helper)
            self._learner_code(cgroup, lambda: timed(fn, case, seeds[0] ^ 1, min(reps, 2)))  # compile, autotune
            runs = []
            for seed in seeds:
                start = time.perf_counter()
                result = self._learner_code(cgroup, lambda: timed(fn, case, seed, reps))
                runs.append((time.perf_counter() - start, result))
            return runs

    @contextlib.contextmanager
    def _afresh_after_failure(self):
        try:
            yield
        except BaseException:  # a timeout or a crash took the kernel's state: the next measure starts afresh
            self.close()
            raise

    def _learner_code(self, cgroup, run, counted=True):
        if cgroup is None:
            return run()
        before = cgroup.anonymous_bytes()
        try:
            return run()
        finally:
            if counted:
                self.held += max(0, cgroup.anonymous_bytes() - before)

    def close(self):
        if self.session is not None:
            self.session.close()
        if self.kernel is not None:
            self.kernel.shutdown()
        self.kernel = self.session = None


def _restart(kernel, session, sources, timeout):
    kernel.start()
    session.bootstrap()
    _replay(kernel, sources, timeout)


def _replay(kernel, sources, timeout):
    for source in sources:
        kernel.run(source, timeout=timeout)
