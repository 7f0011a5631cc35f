"""``python -m autograder --leaderboard FILE``: every lesson-08 submission's kernel in one markdown table, its speed
as the grader measured it in its own process (a GPU only), its numerics everywhere.

On a CPU: the arguments, what the speed check records, the table's ranking and layout, and a real grading of two
submissions (the solution and a wrong kernel, each in a folder of its own) whose table says "no GPU". Marked `gpu`:
the same grading on a GPU, where the table is ranked by the measured ratios, and the check's records on a GPU without
Jupyter (the lesson's kernel taken from the solution notebook)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from autograder.grading import Exercise, NotebookGrade
from autograder.leaderboard import CHECK, EXERCISE, Leaderboard, entry, ranked
from autograder.sandbox import bwrap_problem
from sb_ref.testing.lessons.lesson08 import FAST_FORWARD_TIERS
from sb_ref.testing.speed import TimingCase, _record, check_speed, recorded_speeds, reference_attention, speed_share

ROOT = Path(__file__).resolve().parent.parent
LESSON = "08_performance"
TIMING = TimingCase(4, 12, 4096, 128)
SANDBOX = [] if bwrap_problem() is None else ["--no-sandbox"]  # --with-hidden refuses to run unsandboxed otherwise


def grader(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "autograder", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def submit(folder, name, edit=None):
    """A copy of the lesson-08 solution as ``folder/name/08_performance/08_performance.ipynb``; ``edit`` (right
    text, wrong text) changes the fast_forward or fast_kernel cell."""
    nb = nbformat.read(ROOT / "solutions" / LESSON / f"{LESSON}.ipynb", as_version=4)
    if edit:
        grade_id, right, wrong = edit
        cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
        assert cell.source.count(right) == 1
        cell.source = cell.source.replace(right, wrong)
    path = folder / name / LESSON / f"{LESSON}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    return path


WRONG_NUMERICS = ("fast_forward", "    return o", "    return 1.01 * o")   # 1% off: numerics fail
EVERY_KEY_BLOCK = ("fast_kernel", "tl.cdiv(tl.minimum((pid_m + 1) * BLOCK_M, T), BLOCK_N)", "tl.cdiv(T, BLOCK_N)")


def rows(board):
    """The table's rows as lists of cells (a cell's own "|" is escaped)."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in board.splitlines()
            if line.startswith("| ") and not line.startswith("| rank")]


# -------------------------------------------------------------------------------------------------- arguments

def test_the_option_is_documented_and_its_mistakes_refused(tmp_path):
    proc = grader("--help")
    assert proc.returncode == 0 and "--leaderboard FILE" in proc.stdout and "no GPU" in proc.stdout
    proc = grader("solutions/05_triton_primer", "--leaderboard", tmp_path / "board.md")
    assert proc.returncode == 2 and "no 08_performance.ipynb is among the notebooks" in proc.stderr
    proc = grader(f"solutions/{LESSON}", "--leaderboard", tmp_path)
    assert proc.returncode == 2 and "cannot write a file at" in proc.stderr
    proc = grader(f"solutions/{LESSON}", "--leaderboard", tmp_path / "missing" / "board.md")
    assert proc.returncode == 2 and "cannot write a file at" in proc.stderr
    assert not (tmp_path / "board.md").exists()


# --------------------------------------------------------------------------------------------- what is recorded

def _small(device):
    from sb_ref.testing import make_inputs
    return make_inputs("random", B=1, Hq=1, T=32, D=16, device=device, seed=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's records")
def test_check_speed_records_numerics_and_says_no_gpu_only_while_asked():
    with recorded_speeds() as records:
        check_speed(reference_attention, reference_attention, _small, points=1, check=CHECK, timing=TIMING)
        with pytest.raises(AssertionError, match="numerics first"):
            check_speed(lambda q, k, v: 2 * reference_attention(q, k, v), reference_attention, _small, points=1,
                        check=CHECK, timing=TIMING)
        with recorded_speeds() as inner:  # nested: the inner list gets its own, the outer is restored after
            check_speed(reference_attention, reference_attention, _small, points=1, check="inner", timing=TIMING)
        check_speed(reference_attention, reference_attention, _small, points=1, check="after", timing=TIMING)
    assert [(r["check"], r["numerics"]) for r in records] == [(CHECK, True), (CHECK, False), ("after", True)]
    assert [r["check"] for r in inner] == ["inner"]
    first = records[0]
    assert first["ms"] is None and first["ratio"] is None and first["error"].startswith("no GPU")
    assert first["device"] == "cpu" and first["timing"] == TIMING and first["tiers"]
    assert "differs from sb_ref's output by" in records[1]["error"]
    check_speed(reference_attention, reference_attention, _small, points=1, check=CHECK)  # nothing open: no record
    assert len(records) == 3


# ------------------------------------------------------------------------------------------- ranking and layout

def _grade(status="passed", points=3.0, message=""):
    return NotebookGrade("x.ipynb", LESSON, [Exercise(EXERCISE, 3.0, points, status, message)])


def _timed(ms, reference_ms):
    """The record check_speed makes on a GPU, for these times (the ranking is under test, not a measurement)."""
    with recorded_speeds() as records:
        _record(CHECK, TIMING, FAST_FORWARD_TIERS, True, ms=ms, reference_ms=reference_ms)
    return records


def test_the_table_ranks_the_timed_by_ratio_then_the_untimed_then_the_failures():
    board = Leaderboard()
    board.add("slow|er", _grade("failed", 1.5, "partial credit: 1.5"), _timed(8.0, 1.0))
    board.add("broken", _grade("failed", 0.0, "check_fast_forward: o is wrong for regime='random'\n  hint: ..."), [])
    board.add("stub", _grade("not attempted", 0.0, "not attempted yet"), [])
    board.add("fast", _grade(), _timed(2.0, 1.0))
    assert [e.submission for e in ranked(board.entries)] == ["fast", "slow|er", "broken", "stub"]
    page = board.markdown(device="NVIDIA H100", on_gpu=True, date="2026-12-04")
    assert "- device: NVIDIA H100" in page and "- date: 2026-12-04" in page and "torch " in page
    assert "(B, H, T, D) = (4, 12, 4096, 128), bfloat16" in page and ">= 0.25x: 100%" in page
    assert "No GPU" not in page
    table = rows(page)
    share = {ratio: f"{speed_share(ratio, FAST_FORWARD_TIERS):.0%}" for ratio in (0.5, 0.125)}
    assert table[0][:6] == ["1", "fast", "2.000", "1.000", "0.500x", share[0.5]]
    assert table[1][:6] == ["2", "slow\\|er", "8.000", "1.000", "0.125x", share[0.125]]
    assert table[0][6] == table[1][6] == "pass"
    assert table[2][0] == "-" and table[2][6] == "fail" and table[2][7].startswith("check_fast_forward: o is wrong")
    assert table[3][6] == "not attempted"
    with pytest.raises(TypeError, match="on_gpu must be a bool"):
        board.markdown(device="cpu", on_gpu="yes")
    with pytest.raises(ValueError, match="submission must be a non-empty name"):
        entry("", _grade(), [])


# -------------------------------------------------------------------------------------------- real submissions

@pytest.mark.skipif(torch.cuda.is_available(), reason="the table without a GPU")
def test_grading_two_submissions_without_a_gpu_writes_their_numerics_and_no_gpu(tmp_path):
    submit(tmp_path, "alice")
    submit(tmp_path, "bob", WRONG_NUMERICS)
    board_path = tmp_path / "board.md"
    proc = grader(tmp_path, "--with-hidden", *SANDBOX, "--leaderboard", board_path, "--json", tmp_path / "g.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the leaderboard needs one to time the kernels" in proc.stderr and "Leaderboard:" in proc.stdout
    board = board_path.read_text()
    assert "- device: cpu" in board and "**No GPU: nothing was timed.**" in board
    table = rows(board)
    assert [row[1].rsplit("/", 1)[-1] for row in table] == ["alice", "bob"]
    assert table[0] == ["-", str(tmp_path / "alice"), "no GPU", "no GPU", "no GPU", "no GPU", "pass", ""]
    assert table[1][2:7] == ["-", "-", "-", "-", "fail"] and "check_fast_forward: o is wrong" in table[1][7]
    graded = {Path(nb["path"]).parent.parent.name: {e["grade_id"]: e for e in nb["exercises"]}
              for nb in json.loads((tmp_path / "g.json").read_text())["notebooks"]}
    assert graded["alice"][EXERCISE]["status"] == "passed" and graded["bob"][EXERCISE]["status"] == "failed"


@pytest.mark.gpu
def test_on_a_gpu_the_table_is_ranked_by_the_speeds_measured_in_the_grader(tmp_path):
    """Needs the course environment (Jupyter) on the GPU machine, as grading does."""
    submit(tmp_path, "alice")
    submit(tmp_path, "carol", EVERY_KEY_BLOCK)   # right numerics, every key tile: slower
    submit(tmp_path, "bob", WRONG_NUMERICS)
    board_path = tmp_path / "board.md"
    proc = grader(tmp_path, "--with-hidden", *SANDBOX, "--leaderboard", board_path, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    board = board_path.read_text()
    assert f"- device: {torch.cuda.get_device_name()}" in board and "No GPU" not in board
    table = {row[1].rsplit("/", 1)[-1]: row for row in rows(board)}
    assert [row[1].rsplit("/", 1)[-1] for row in rows(board)] == ["alice", "carol", "bob"]
    for name, rank in (("alice", "1"), ("carol", "2")):
        row = table[name]
        ms, reference_ms, ratio = float(row[2]), float(row[3]), float(row[4].rstrip("x"))
        assert row[0] == rank and row[6] == "pass" and ms > 0 and reference_ms > 0
        assert ratio == pytest.approx(reference_ms / ms, rel=2e-3, abs=2e-3)
        assert row[5] == f"{speed_share(ratio, FAST_FORWARD_TIERS):.0%}"
    assert float(table["alice"][4].rstrip("x")) > float(table["carol"][4].rstrip("x"))
    assert table["bob"][0] == "-" and table["bob"][6] == "fail"


GPU_SCRIPT = """
import sys, torch
sys.path[:0] = [{root!r}, {folder!r}]
from lesson08_kernels import fast_forward
from sb_ref.testing.lessons.lesson08 import check_fast_forward
from sb_ref.testing.speed import recorded_speeds
from autograder.grading import Exercise, NotebookGrade
from autograder.leaderboard import Leaderboard
board = Leaderboard()
with recorded_speeds() as records:
    score = check_fast_forward(fast_forward)
board.add("solution", NotebookGrade("x", "08", [Exercise("test_fast_forward", 3.0, float(score), "passed")]), records)
print(board.markdown(device=torch.cuda.get_device_name(), on_gpu=True))
"""


@pytest.mark.gpu
def test_on_a_gpu_the_check_records_what_it_timed(tmp_path):
    """The check's records and the table on a GPU, without Jupyter: the solution's kernel and launcher, from its
    notebook's JSON, as a module (Triton reads a kernel's source from its file)."""
    cells = json.loads((ROOT / "solutions" / LESSON / f"{LESSON}.ipynb").read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells
               if c["metadata"].get("nbgrader", {}).get("grade_id") in ("fast_kernel", "fast_forward")]
    assert len(sources) == 2
    (tmp_path / "lesson08_kernels.py").write_text("import torch\nimport triton\nimport triton.language as tl\n\n\n"
                                                  + "\n\n\n".join(sources) + "\n")
    script = tmp_path / "board.py"
    script.write_text(GPU_SCRIPT.format(root=str(ROOT), folder=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = next(r for r in rows(proc.stdout) if r[1] == "solution")
    ms, reference_ms, ratio = float(row[2]), float(row[3]), float(row[4].rstrip("x"))
    assert row[0] == "1" and row[6] == "pass" and ms > 0 and reference_ms > 0
    assert ratio == pytest.approx(reference_ms / ms, rel=2e-3, abs=2e-3)
    assert row[5] == f"{speed_share(ratio, FAST_FORWARD_TIERS):.0%}"
    assert re.search(r"check_fast_forward: speed on .*x its throughput", proc.stdout)
