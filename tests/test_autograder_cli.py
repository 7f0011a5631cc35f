"""``python -m autograder`` on the real lessons: full marks for the solutions, zero for the untouched release,
exactly the broken exercises lost for a wrong submission, a JSON report of the documented shape, a home
directory left alone, and ``make grade`` working from a fresh clone."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from autograder.report import SCHEMA

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted(p.name for p in (ROOT / "solutions").glob("[0-9][0-9]_*") if p.is_dir())
ISOLATION = ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR",
             "TRITON_CACHE_DIR")


def grader(*args, env=None, cwd=ROOT, timeout=900):
    return subprocess.run([sys.executable, "-m", "autograder", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_report_shape(report):
    """The JSON shape documented in autograder/report.py."""
    assert report["schema"] == SCHEMA
    assert isinstance(report["graded_at"], str) and isinstance(report["with_hidden"], bool)
    assert isinstance(report["device"], str)
    assert report["points"] == sum(nb["points"] for nb in report["notebooks"])
    assert report["max_points"] == sum(nb["max_points"] for nb in report["notebooks"])
    for nb in report["notebooks"]:
        assert set(nb) == {"path", "lesson", "points", "max_points", "seconds", "error", "notes", "exercises"}
        assert nb["points"] == sum(e["points"] for e in nb["exercises"])
        for e in nb["exercises"]:
            assert set(e) == {"grade_id", "max_points", "points", "status", "message"}
            assert e["status"] in ("passed", "failed", "not attempted", "timed out", "crashed")
            assert 0 <= e["points"] <= e["max_points"]


def exercises(report):
    return {(nb["lesson"], e["grade_id"]): e for nb in report["notebooks"] for e in nb["exercises"]}


def test_help_and_bad_paths(tmp_path):
    proc = grader("--help")
    assert proc.returncode == 0 and "usage: python -m autograder" in proc.stdout and "--with-hidden" in proc.stdout
    proc = grader(tmp_path / "missing")
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


def test_nothing_to_grade_is_said_plainly(tmp_path):
    proc = grader(tmp_path)
    assert proc.returncode == 0 and "No lesson notebooks to grade" in proc.stdout


def test_a_notebook_that_is_no_lesson_is_reported_not_graded(tmp_path):
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "mystery.ipynb")
    proc = grader(tmp_path / "mystery.ipynb")
    assert proc.returncode == 0
    assert "not graded" in proc.stdout and "not a lesson of this course" in proc.stdout


def test_the_solutions_score_full_marks_with_hidden_tests(tmp_path):
    proc = grader("solutions", "--with-hidden", "--json", tmp_path / "grades.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "grades.json").read_text())
    check_report_shape(report)
    assert [nb["lesson"] for nb in report["notebooks"]] == [f"solutions/{n}/{n}" for n in LESSONS]
    assert report["max_points"] > 0 and report["points"] == report["max_points"], proc.stdout
    assert report["with_hidden"] is True
    assert f"total: {report['points']:g}/{report['max_points']:g} points" in proc.stdout


def _solution_cell(nb, grade_id):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def test_a_wrong_submission_loses_exactly_the_broken_exercises(tmp_path):
    lesson = "01_stick_breaking_numpy"
    nb = nbformat.read(ROOT / "solutions" / lesson / f"{lesson}.ipynb", as_version=4)
    cell = _solution_cell(nb, "attention_numpy")
    # softmax instead of stick-breaking, in the last exercise only
    cell.source = ("def attention_numpy(q, k, v, attend_current=False):\n"
                   "    z = q @ k.T / np.sqrt(q.shape[-1])\n"
                   "    w = np.exp(z - z.max(-1, keepdims=True))\n"
                   "    w = w / w.sum(-1, keepdims=True)\n"
                   "    return w @ v, np.zeros(len(z))\n")
    path = tmp_path / "alice" / lesson / f"{lesson}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    proc = grader(tmp_path, "--with-hidden", "--json", tmp_path / "grades.json")
    report = json.loads((tmp_path / "grades.json").read_text())
    check_report_shape(report)
    graded = {e["grade_id"]: e for nb in report["notebooks"] for e in nb["exercises"]}
    failed = {gid for gid, e in graded.items() if e["status"] != "passed"}
    assert failed == {"test_attention_numpy"}, proc.stdout
    assert graded["test_attention_numpy"]["points"] == 0 and graded["test_attention_numpy"]["message"]
    assert "check_attention_numpy" in proc.stdout  # the check's message, printed under the failed row


def test_a_failure_caused_by_an_earlier_exercise_says_so_through_the_grader(tmp_path):
    lesson = "01_stick_breaking_numpy"
    nb = nbformat.read(ROOT / "solutions" / lesson / f"{lesson}.ipynb", as_version=4)
    cell = _solution_cell(nb, "weights_for_query")
    assert cell.source.count("stick = stick * (1.0 - beta)") == 1
    cell.source = cell.source.replace("stick = stick * (1.0 - beta)", "stick = stick")  # the stick never shrinks
    path = tmp_path / "bob" / lesson / f"{lesson}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    proc = grader(tmp_path, "--with-hidden", "--json", tmp_path / "grades.json")
    report = json.loads((tmp_path / "grades.json").read_text())
    graded = {e["grade_id"]: e for nb in report["notebooks"] for e in nb["exercises"]}
    assert {gid for gid, e in graded.items() if e["status"] != "passed"} == \
        {"test_weights_for_query", "test_weight_matrix", "test_attention_numpy"}, proc.stdout
    assert "fix check_weights_for_query first" in graded["test_weight_matrix"]["message"]
    assert "fix check_weight_matrix first" in graded["test_attention_numpy"]["message"]
    assert "builds on" not in graded["test_weights_for_query"]["message"]


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git")
def test_make_grade_on_a_fresh_clone_scores_the_untouched_release_zero_and_leaves_home_alone(tmp_path):
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip("runs make with the project's .venv")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    stamp = venv / ".sb-ref-installed"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS") and not k.startswith("XDG_") and k not in ISOLATION}
    env["HOME"] = str(home)
    # the clone uses this checkout's installed .venv (-o: take its install stamp as it is)
    proc = subprocess.run(["make", "-C", str(clone), "grade", f"VENV={venv}", "-o", str(stamp),
                           f"GRADE_ARGS=--json {tmp_path / 'grades.json'}"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lesson" in proc.stdout and "exercise" in proc.stdout and "total: 0/" in proc.stdout
    report = json.loads((tmp_path / "grades.json").read_text())
    check_report_shape(report)
    assert [nb["lesson"] for nb in report["notebooks"]] == LESSONS
    assert report["points"] == 0 and report["max_points"] > 0
    statuses = {e["status"] for e in exercises(report).values()}
    assert statuses == {"not attempted"}, proc.stdout
    assert "not attempted yet" in proc.stdout
    for lesson in LESSONS:  # the progress lines
        assert f"lessons/{lesson}/{lesson}.ipynb" in proc.stderr
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert not written, f"grading wrote into the home directory: {written}"


def test_a_quadratic_blocked_attention_loses_only_the_memory_points(tmp_path):
    """The allocation probe runs in the notebook's kernel, where the learner's tensors are allocated. The quadratic
    version is the learner's own (the library's is hidden in lesson 04's sandbox)."""
    lesson = "04_tiles"
    nb = nbformat.read(ROOT / "solutions" / lesson / f"{lesson}.ipynb", as_version=4)
    _solution_cell(nb, "blocked_attention").source = (
        "def blocked_attention(q, k, v, block, attend_current=False):\n"
        "    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32\n"
        "    z = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * q.shape[-1] ** -0.5  # T x T logits\n"
        "    T = z.shape[-1]\n"
        "    seen = torch.ones(T, T, dtype=torch.bool).tril(0 if attend_current else -1)\n"
        "    log_keep = torch.nn.functional.logsigmoid(-z).masked_fill(~seen, 0.0)\n"
        "    farther = log_keep.flip(-1).cumsum(-1).flip(-1) - log_keep  # keys nearer than j, summed\n"
        "    A = (torch.nn.functional.logsigmoid(z) + farther).exp().masked_fill(~seen, 0.0)\n"
        "    return (A @ v.to(dtype)).to(q.dtype), log_keep.sum(-1).exp()\n")
    nb.cells.insert(1, nbformat.v4.new_code_cell("import sb_ref, torch"))
    path = tmp_path / "bob" / f"{lesson}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    proc = grader(path, "--json", tmp_path / "grades.json")
    report = json.loads((tmp_path / "grades.json").read_text())
    graded = {e["grade_id"]: e for nb in report["notebooks"] for e in nb["exercises"]}
    assert {gid for gid, e in graded.items() if e["status"] != "passed"} == {"test_blocked_memory"}, proc.stdout
    assert "T * T" in graded["test_blocked_memory"]["message"]


def test_monkeypatching_the_real_checks_in_the_notebook_changes_nothing(tmp_path):
    lesson = "01_stick_breaking_numpy"
    nb = nbformat.read(ROOT / "lessons" / lesson / f"{lesson}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import importlib, sb_ref.testing.lessons as lessons\n"
        "for lesson in lessons.LESSONS:\n"
        "    module = importlib.import_module(f'sb_ref.testing.lessons.{lesson}')\n"
        "    for name in module.__all__:\n"
        "        setattr(module, name, lambda *a, **k: None)\n"))
    nb.cells.insert(0, nb.cells.pop())  # before the import cell and the tests
    imports = next(i for i, cell in enumerate(nb.cells)
                   if cell.metadata.get("nbgrader", {}).get("grade_id") == "import_checks")
    nb.cells.insert(imports + 1, nbformat.v4.new_code_cell(  # the test cells' names, shadowed after their import
        "check_weight_matrix = check_weights_for_query = check_attention_numpy = lambda *a, **k: None"))
    path = tmp_path / "mallory" / f"{lesson}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    proc = grader(path, "--json", tmp_path / "grades.json")
    report = json.loads((tmp_path / "grades.json").read_text())
    assert report["points"] == 0 and report["max_points"] > 0, proc.stdout


@pytest.mark.skipif(__import__("autograder.sandbox").sandbox.bwrap_problem() is not None, reason="no sandbox here")
def test_a_submission_that_rewrites_the_grader_is_stopped_by_the_sandbox_and_else_by_the_fingerprint(tmp_path):
    """Learner code that writes into what grading trusts: in the sandbox it cannot; without one (--no-sandbox)
    the grader sees the change and stops instead of going on."""
    course = tmp_path / "course"
    shutil.copytree(ROOT / "autograder", course / "autograder")
    shutil.copytree(ROOT / "solutions" / "00_setup", course / "solutions" / "00_setup")
    lesson = "00_setup"
    nb = nbformat.read(ROOT / "lessons" / lesson / f"{lesson}.ipynb", as_version=4)
    target = course / "solutions" / lesson / f"{lesson}.ipynb"
    before = target.read_bytes()
    nb.cells.insert(0, nbformat.v4.new_code_cell(f"open({str(target)!r}, 'a').write(' ')"))
    path = tmp_path / "eve" / f"{lesson}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    sandboxed = grader(path, cwd=course)
    assert sandboxed.returncode == 0 and target.read_bytes() == before, sandboxed.stdout + sandboxed.stderr
    unsandboxed = grader(path, "--no-sandbox", cwd=course)
    assert unsandboxed.returncode == 1, unsandboxed.stdout + unsandboxed.stderr
    assert "changed the grader's files" in unsandboxed.stderr and "tampered" in unsandboxed.stderr
