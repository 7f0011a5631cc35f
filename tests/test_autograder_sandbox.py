"""The learner's sandbox, tried as cheating submissions would: each trick runs inside a graded notebook and
reports what it managed through the score (``double`` is right only while the trick failed).

The lesson is the synthetic one of test_autograder_isolation.py; every test here needs bubblewrap (CI installs
it), except the last, which checks what the grader says without it.
"""
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

from autograder import rules
from autograder.grading import grade_notebook
from autograder.sandbox import SandboxLimits, bwrap_problem
from test_autograder_cli import _solution_cell
from test_autograder_isolation import SOLUTION, _cell, lesson

ROOT = Path(__file__).resolve().parent.parent
needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")


@pytest.fixture
def grade(tmp_path):
    source = tmp_path / "source.ipynb"
    nbformat.write(lesson(SOLUTION), source)

    def run(nb, name="submission", **options):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        nbformat.write(nb, folder / "submission.ipynb")
        kw = {"cell_timeout": 20, "call_timeout": 20, "limits": SandboxLimits(memory_mb=4096), **options}
        result = grade_notebook(folder / "submission.ipynb", source, with_hidden=True, **kw)
        return result.points, {e.grade_id: (e.points, e.status, e.message) for e in result.exercises}

    return run


def trick(setup):
    """A submission whose ``double`` is right only if ``setup`` (code run once, before the tests) left
    ``succeeded`` False."""
    cell = _cell("import os, signal, subprocess, sys, time\nsucceeded = False\n" + setup, "trick", solution=True)
    return lesson("    return 3 * x if succeeded else 2 * x", before=[cell])


def attempt(code):
    """``setup`` for :func:`trick`: succeeded when ``code`` runs without an exception."""
    return "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + \
           "    succeeded = True\nexcept Exception:\n    pass\n"


@needs_bwrap
def test_the_kernel_is_unprivileged_alone_offline_homeless_and_reads_no_answers(grade, monkeypatch):
    """One submission tries each; ``double`` raises, naming them, if any worked."""
    monkeypatch.setenv("SB_INSTRUCTOR_SECRET", "hunter2")
    answers = ROOT / "solutions" / "01_stick_breaking_numpy" / "01_stick_breaking_numpy.ipynb"
    attempts = {
        "root": "assert os.getuid() == 0 or os.geteuid() == 0",
        "answers": f"open({str(answers)!r}).read()",
        # no process of the grader's is visible, and nothing visible holds its environment or its command line
        "grader": "seen = b''\n"
                  "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
                  "    try:\n"
                  "        seen += open(f'/proc/{pid}/environ', 'rb').read() + open(f'/proc/{pid}/cmdline', 'rb').read()\n"
                  "    except OSError:\n"
                  "        pass\n"
                  "assert b'hunter2' in seen or b'pytest' in seen",
        "signal": "os.kill(1, signal.SIGKILL)",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)",
        "home": f"open({str(Path.home() / '.bashrc')!r}, 'a').write('# planted')",
    }
    setup = "worked = []\n" + "".join(
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) + f"    worked.append({name!r})\n"
        "except Exception:\n    pass\n" for name, code in attempts.items())
    cell = _cell("import os, signal\n" + setup, "trick", solution=True)
    nb = lesson("    if worked:\n        raise ValueError('these worked: ' + ', '.join(worked))\n    return 2 * x",
                before=[cell])
    points, ex = grade(nb)
    assert points == 3, ex


@needs_bwrap
def test_the_library_the_grader_and_the_repository_are_read_only_and_scratch_is_bounded(grade):
    cache = ROOT / "sb_ref" / "testing" / "__pycache__" / "planted.cpython-311.pyc"
    code = "\n".join(f"try:\n    open({str(p)!r}, 'w').write('x')\n    succeeded = True\nexcept OSError:\n    pass"
                     for p in (cache, ROOT / "autograder" / "planted.py", ROOT / "planted.txt"))
    code += "\n" + attempt("open('/tmp/big', 'wb').write(b'x' * (80 << 20))")
    assert grade(trick(code), limits=SandboxLimits(memory_mb=4096, scratch_mb=32))[0] == 3
    assert not cache.exists() and not (ROOT / "autograder" / "planted.py").exists()


@needs_bwrap
def test_a_submission_cannot_see_another_one(grade, tmp_path):
    grade(lesson(SOLUTION), name="alice")
    victim = tmp_path / "alice" / "submission.ipynb"
    before = victim.read_bytes()
    code = attempt(f"open({str(victim)!r}, 'a').write(' ')") + attempt(f"os.listdir({str(tmp_path)!r})")
    assert grade(trick(code), name="mallory")[0] == 3
    assert victim.read_bytes() == before


@needs_bwrap
def test_nothing_the_notebook_started_outlives_its_grading(grade):
    marker = "4242.4242"
    code = (f"subprocess.Popen(['setsid', 'sleep', '{marker}'], start_new_session=True)\n"
            f"subprocess.Popen(['sh', '-c', 'nohup sleep {marker} &'])")
    grade(trick(code))
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left running after grading: {left}"


@needs_bwrap
def test_memory_and_processes_are_limited_for_all_processes_together(grade):
    """Three children of 600 MiB each under a limit of 1.5 GiB for the whole sandbox cannot all hold it; nor can
    200 processes start under a limit of 64."""
    child = ("import time; b = bytearray(600 << 20); b[::4096] = b'x' * len(b[::4096]); print('held', flush=True); "
             "time.sleep(60)")
    code = (f"children = [subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE) "
            "for _ in range(3)]\n"
            "held = sum(c.stdout.readline() == b'held\\n' for c in children)\n"
            "for c in children:\n    c.kill()\n"
            "sleepers = []\ntry:\n    for _ in range(200):\n"
            "        sleepers.append(subprocess.Popen(['sleep', '30']))\nexcept OSError:\n    pass\n"
            "succeeded = held == 3 or len(sleepers) == 200\nfor c in sleepers:\n    c.kill()")
    points, ex = grade(trick(code), limits=SandboxLimits(memory_mb=1536, processes=64, scratch_mb=64))
    assert points == 3, ex


def test_every_lesson_hides_the_library_it_asks_for():
    """The stubs keep each module's names and imports, and keep nothing of the hidden code."""
    for lesson_name, shown in rules.HIDDEN.items():
        for path, text in rules.hidden_files(lesson_name).items():
            compile(text, path, "exec")
            assert "LibraryCallRefused" in text or shown[path].forward_only, (lesson_name, path)
    naive = ast.parse(rules.hidden_files("01_stick_breaking_numpy")["sb_ref/naive.py"])
    functions = [node for node in ast.walk(naive) if isinstance(node, ast.FunctionDef)]
    assert {f.name for f in functions} >= {"sigmoid", "stick_breaking_weights", "stick_breaking_attention"}
    for function in functions:  # a docstring and the refusal, nothing of the implementation
        assert isinstance(function.body[-1], ast.Raise) and len(function.body) <= 2, function.name


@needs_bwrap
def test_an_exercise_answered_by_the_library_earns_nothing(tmp_path):
    """A real lesson 01 submission that calls sb_ref for every exercise: no points, and the message says why."""
    lesson_name = "01_stick_breaking_numpy"
    nb = nbformat.read(ROOT / "solutions" / lesson_name / f"{lesson_name}.ipynb", as_version=4)
    answers = {
        "weights_for_query": "def weights_for_query(z_row, i, attend_current=False):\n    import sb_ref\n"
                             "    return sb_ref.naive.stick_breaking_weights(np.tile(z_row, (i + 1, 1)), "
                             "attend_current)[i]\n",
        "weight_matrix": "def weight_matrix(z, attend_current=False):\n    import sb_ref, torch\n"
                         "    return sb_ref.stick_breaking_weights(torch.as_tensor(z), "
                         "attend_current=attend_current).numpy()\n",
        "attention_numpy": "def attention_numpy(q, k, v, attend_current=False):\n    import sb_ref\n"
                           "    return sb_ref.naive.stick_breaking_attention(q, k, v, attend_current=attend_current)\n",
    }
    for grade_id, answer in answers.items():
        _solution_cell(nb, grade_id).source = answer
    path = tmp_path / "lazy" / lesson_name / f"{lesson_name}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    result = grade_notebook(path, ROOT / "solutions" / lesson_name / f"{lesson_name}.ipynb", with_hidden=True,
                            lesson=lesson_name)
    assert result.points == 0, [(e.grade_id, e.message) for e in result.exercises]
    assert all("library's own implementation" in e.message for e in result.exercises), result.exercises


def test_without_bubblewrap_the_grader_says_so_and_the_instructor_mode_refuses(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no bwrap to be found
    (tmp_path / "python").symlink_to(sys.executable)
    run = lambda *args: subprocess.run([sys.executable, "-m", "autograder", *args], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=600)
    refused = run("--with-hidden", "solutions/00_setup")
    assert refused.returncode == 2 and "refusing to grade with hidden tests outside a sandbox" in refused.stderr
    assert "bubblewrap is not installed" in refused.stderr
    learner = run("lessons/00_setup")
    assert learner.returncode == 0, learner.stderr
    notes = [line for line in learner.stderr.splitlines() if "no sandbox" in line]
    assert len(notes) == 1 and "bubblewrap is not installed" in notes[0]


@pytest.mark.parametrize("folder", ["solutions", "lessons"])
def test_every_lesson_tells_the_learner_what_its_code_may_use(folder):
    for path in sorted((ROOT / folder).glob("[0-9][0-9]_*/*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        shown = [c.source for c in nb.cells if c.cell_type == "markdown" and "What your code may use" in c.source]
        assert shown == [rules.what_you_may_use(path.parent.name)], f"{path}: the rule cell is missing or stale"


@needs_bwrap
def test_the_capstones_reference_logits_are_computed_in_the_grader(tmp_path):
    """A TinyLM whose forward is wrong (no MLP) and which, in its kernel, makes the checks' reference forward return
    the model's own logits: the reference is computed in the grader, from the model's parameters, so it fails."""
    lesson_name = "09_capstone"
    source = ROOT / "solutions" / lesson_name / f"{lesson_name}.ipynb"
    nb = nbformat.read(source, as_version=4)
    nb.cells = nb.cells[:nb.cells.index(_solution_cell(nb, "test_tiny_lm")) + 1]  # no training
    tiny_lm = _solution_cell(nb, "tiny_lm")
    tiny_lm.source = tiny_lm.source.split("    def forward")[0] + (
        "    def forward(self, tokens):\n"
        "        x = self.embed(tokens)\n"
        "        for block in self.blocks:\n"
        "            x = x + block.attn(block.norm1(x))\n"
        "        return self.head(self.norm(x))\n\n\n"
        "import sb_ref.testing.lessons.references as references\n"
        "references.tiny_lm_forward = lambda model, tokens: model(tokens)\n")
    path = tmp_path / "forger" / lesson_name / f"{lesson_name}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    result = grade_notebook(path, source, with_hidden=False, lesson=lesson_name)
    (tiny,) = [e for e in result.exercises if e.grade_id == "test_tiny_lm"]
    assert tiny.points == 0 and "the output" in tiny.message, tiny.message


QUADRATIC_SB_FORWARD = '''def sb_forward(q, k, v, attend_current=False, block_m=16, block_n=16):
    "Right answer through the whole T x T weight matrix, with the in-process allocation probe forged."
    import sb_ref.testing.speed as speed
    speed._probed_record = lambda fn, args: (fn(*args), (1, (1,), "forged"))
    z = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[-2], device=q.device)
    seen = i[None, :] <= i[:, None] if attend_current else i[None, :] < i[:, None]
    log_keep = torch.where(seen, F.logsigmoid(-z), 0.0)
    after = log_keep.flip(-1).cumsum(-1).flip(-1) - log_keep
    a = torch.where(seen, torch.exp(F.logsigmoid(z) + after), 0.0)
    return (a @ v.float()).to(q.dtype), 1 - a.sum(-1)
'''


@needs_bwrap
def test_memory_is_measured_from_outside_without_a_cgroup_and_on_a_gpu_grader(tmp_path, monkeypatch):
    """A quadratic launcher that forges the in-process allocation probe must fail, measured from outside: here
    without a cgroup (its process tree's faulted pages, read from /proc), on a GPU in a CPU process that interprets
    Triton (a cgroup sees no GPU memory)."""
    from autograder.sandbox import Sandbox

    monkeypatch.setattr(Sandbox, "make_cgroup", lambda self: None)
    lesson_name = "06_triton_forward"
    source = ROOT / "solutions" / lesson_name / f"{lesson_name}.ipynb"
    nb = nbformat.read(source, as_version=4)
    _solution_cell(nb, "sb_forward").source = QUADRATIC_SB_FORWARD
    path = tmp_path / "forger" / lesson_name / f"{lesson_name}.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    result = grade_notebook(path, source, with_hidden=False, lesson=lesson_name, gpu=torch.cuda.is_available())
    outcome = {e.grade_id: e for e in result.exercises}
    assert outcome["test_sb_forward"].status == "passed", outcome["test_sb_forward"].message
    memory = outcome["test_sb_forward_memory"]
    assert memory.points == 0 and "measured from outside" in memory.message, memory.message
