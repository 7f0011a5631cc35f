"""The course notebooks and their nbgrader pipeline, end to end.

- ``solutions/`` is clean (no outputs, execution counts or per-machine metadata) and well formed for nbgrader;
- every solution notebook runs top to bottom on the CPU (in the round trip's autograde below, the venv's python3
  kernel) with every check passing, within the time budget;
- ``lessons/`` is exactly what ``nbgrader generate_assignment`` makes of ``solutions/`` (regenerated here into a
  temporary course root), and holds no solution code, hidden tests or markers;
- a full nbgrader round trip in that course root: the solutions as one student's submission get full marks, and a
  deliberately wrong submission per lesson loses exactly the points of the exercises it breaks (scores read back
  from the gradebook); for lessons 05-09 another submission answers every exercise wrong, each in its own way, and
  loses every point; a submission that fails only a hidden test loses that test's points; the feedback hides the
  hidden tests, and their tracebacks. (The untouched release scoring zero is checked once, through the course's
  grader on a fresh clone: tests/test_autograder_cli.py. Its test cells are the same; nbgrader's way of scoring a
  failing cell zero is what the wrong submissions show here.)

Jupyter, IPython and matplotlib write only into temporary folders here, never into the home directory.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pytest

# nbgrader's gradebook module trips SQLAlchemy deprecation warnings on import; they are nbgrader's, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:User-placed attribute:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ["00_setup", "01_stick_breaking_numpy", "02_log_space", "03_attention_layer", "04_tiles",
           "05_triton_primer", "06_triton_forward", "07_triton_backward", "08_performance", "09_capstone"]
COURSE_ID = "stick-breaking-attention"
VENV_BIN = Path(sys.executable).parent
TIME_BUDGET_S = 120  # per notebook on a 2-core CPU; the lessons take 5-15 s each

# Points of every graded test cell: the course's grading scheme, checked against the notebooks.
POINTS = {
    "00_setup": {"test_sigmoid": 1},
    "01_stick_breaking_numpy": {"test_weights_for_query": 2, "test_weight_matrix": 2, "test_attention_numpy": 3},
    "02_log_space": {"test_log_sigmoids": 2, "test_reverse_exclusive_cumsum": 1, "test_stable_weights": 3,
                     "test_stable_attention": 3, "test_gradcheck_attention": 1, "test_attention_gradients": 2},
    "03_attention_layer": {"test_repeat_kv": 1, "test_apply_remainder": 2, "test_layer_forward": 3},
    "04_tiles": {"test_combine": 2, "test_blocked_attention": 3, "test_blocked_memory": 2},
    "05_triton_primer": {"test_scaled_copy": 1, "test_add_row_vector": 2, "test_tile_matmul": 2,
                         "test_tile_reverse_cumsum_scan": 1, "test_tile_reverse_cumsum_matmul": 1,
                         "test_long_reverse_cumsum": 2},
    "06_triton_forward": {"test_log_sigmoids": 2, "test_sb_forward": 4, "test_sb_forward_memory": 1},
    "07_triton_backward": {"test_dl_and_dz": 2, "test_sb_backward_dq": 3, "test_sb_backward_dkdv": 3,
                           "test_sb_attention": 2},
    "08_performance": {"test_attention_flops": 1, "test_median_ms": 2, "test_fast_forward": 3},
    "09_capstone": {"test_flip_flop_batch": 2, "test_rope": 2, "test_tiny_lm": 2, "test_evaluate": 1},
}

# Lessons 05-09 make their mistakes as edits of the solution: (solution grade_id, right text, wrong text).
TRIANGLE_WITH_DIAGONAL = ("tile_reverse_cumsum", "cols[:, None] > cols[None, :]", "cols[:, None] >= cols[None, :]")
MASK_ON_ONE_TILE = ("sb_forward_kernel", "if kb * BLOCK_N + BLOCK_N > first:",   # wrong for BLOCK_M != BLOCK_N
                    "if kb == block:")
INCLUSIVE_C = ("sb_backward_dq", "(tl.cumsum(dl, axis=1) - dl)", "tl.cumsum(dl, axis=1)")
EVERY_KEY_BLOCK = ("fast_kernel", "tl.cdiv(tl.minimum((pid_m + 1) * BLOCK_M, T), BLOCK_N)", "tl.cdiv(T, BLOCK_N)")
POSITIONAL_ENCODING = ("tiny_lm", "        x = self.embed(tokens)\n",
                       "        x = self.embed(tokens)\n"
                       "        pos = torch.arange(x.shape[1], device=x.device)[:, None]\n"
                       "        x = x + torch.sin(pos / 10000 ** (torch.arange(x.shape[2], device=x.device) / x.shape[2]))\n")

# One deliberately wrong submission per lesson: solution cell (grade_id) -> wrong source (or a list of edits), and
# the test cells that must lose their points (every other test cell keeps them).
WRONG = {
    "00_setup": ({"sigmoid": '''
def sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    return np.exp(z) / (1 + np.exp(z))   # inf / inf = nan for large z
'''}, {"test_sigmoid"}),
    "01_stick_breaking_numpy": ({"weight_matrix": '''
def weight_matrix(z, attend_current=False):
    T = z.shape[0]
    A = np.zeros((T, T))
    for i in range(T):   # softmax instead of stick-breaking
        n = i + 1 if attend_current else i
        if n:
            e = np.exp(z[i, :n] - z[i, :n].max())
            A[i, :n] = e / e.sum()
    return A
'''}, {"test_weight_matrix", "test_attention_numpy"}),
    "02_log_space": ({"log_sigmoids": '''
def log_sigmoids(z):
    return torch.log(torch.sigmoid(z)), torch.log(1 - torch.sigmoid(z))   # the unstable logs
'''}, {"test_log_sigmoids", "test_stable_attention", "test_attention_gradients"}),
    "03_attention_layer": ({"layer_forward": '''
class StickBreakingLayer(nn.Module):
    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, bias=False, remainder="self",
                 attend_current=False):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = embed_dim // num_heads
        self.remainder, self.attend_current = remainder, attend_current
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, self.num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        self.remainder_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim)) if remainder == "bias" else None

    def forward(self, x):   # softmax attention instead of stick-breaking
        B, T, E = x.shape
        Hq, Hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, Hq, d).transpose(1, 2)
        k = repeat_kv(self.k_proj(x).view(B, T, Hk, d).transpose(1, 2), Hq // Hk)
        v = repeat_kv(self.v_proj(x).view(B, T, Hk, d).transpose(1, 2), Hq // Hk)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, Hq * d))
'''}, {"test_layer_forward"}),
    "04_tiles": ({"blocked_attention": '''
def blocked_attention(q, k, v, block, attend_current=False):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    *lead, T, D = q.shape
    o = q.new_zeros(*lead, T, v.shape[-1])
    rem = q.new_ones(*lead, T)
    for qs in range(0, T, block):
        qe = min(qs + block, T)
        o_b = q.new_zeros(*lead, qe - qs, v.shape[-1])
        carry = q.new_zeros(*lead, qe - qs)
        for ks in range(qs, -1, -block):
            ke = min(ks + block, T)
            z = D ** -0.5 * q[..., qs:qe, :] @ k[..., ks:ke, :].transpose(-1, -2)
            visible = torch.arange(ks, ke)[None, :] <= torch.arange(qs, qe)[:, None]   # diagonal always included
            log_keep = F.logsigmoid(-z).masked_fill(~visible, 0.0)
            log_A = F.logsigmoid(z) + carry[..., None] + reverse_exclusive_cumsum(log_keep)
            o_b = o_b + log_A.exp().masked_fill(~visible, 0.0) @ v[..., ks:ke, :]
            carry = carry + log_keep.sum(-1)
        o[..., qs:qe, :] = o_b
        rem[..., qs:qe] = carry.exp()
    return o, rem
'''}, {"test_blocked_attention", "test_blocked_memory"}),
    "05_triton_primer": ([TRIANGLE_WITH_DIAGONAL], {"test_tile_reverse_cumsum_matmul"}),
    "06_triton_forward": ([MASK_ON_ONE_TILE], {"test_sb_forward"}),
    "07_triton_backward": ([INCLUSIVE_C], {"test_sb_backward_dq", "test_sb_attention"}),
    "08_performance": ([EVERY_KEY_BLOCK], {"test_fast_forward"}),
    "09_capstone": ([POSITIONAL_ENCODING], {"test_tiny_lm"}),
}

# For the Triton-era lessons, a second wrong submission answers EVERY exercise wrong, each with its own plausible
# mistake, as (solution grade_id, right text, wrong text) edits of the solution: every test cell of the lesson must
# lose its points (with WRONG, which breaks one exercise and keeps the others, every exercise is shown to be caught).
WRONG_EVERYWHERE = {
    "05_triton_primer": [
        ("scaled_copy", "grid = (triton.cdiv(n, BLOCK),)", "grid = (n // BLOCK,)"),
        ("add_row_vector", "x.stride(0), x.stride(1), out.stride(0)", "x.shape[1], 1, out.stride(0)"),
        ("tile_matmul", "grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))",
         "grid = (triton.cdiv(M, BLOCK_M), 1)"),
        ("tile_reverse_cumsum", "out = tl.cumsum(x, axis=1, reverse=True) - x", "out = tl.cumsum(x, axis=1, reverse=True)"),
        TRIANGLE_WITH_DIAGONAL,
        ("long_reverse_cumsum", "- x + carry", "- x"),
    ],
    "06_triton_forward": [
        ("log_sigmoids", "log1p_e = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))",
         "log1p_e = tl.log(u)"),
        ("sb_forward_kernel", "if kb * BLOCK_N + BLOCK_N > first:", "if kb * BLOCK_N == first:"),
        ("sb_forward", "q, k, v = q.contiguous(), k.contiguous(), v.contiguous()",
         "q, k, v = q.contiguous(), k.contiguous(), v.contiguous()\n"
         "    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()"),
    ],
    "07_triton_backward": [
        ("dl_and_dz", "C = dl.cumsum(-1) - dl", "C = dl.flip(-1).cumsum(-1).flip(-1) - dl"),
        INCLUSIVE_C,
        ("sb_backward_dkdv", "R + tile_sum, mask=rows)", "R, mask=rows)"),
        ("sb_attention", "g = dRem.float() * rem.float()", "g = dRem.float()"),
    ],
    "08_performance": [
        ("attention_flops", "(1 if causal else 2)", "(2 if causal else 1)"),
        ("median_ms", "    for _ in range(warmup):\n        fn(*args)\n", ""),
        EVERY_KEY_BLOCK,
    ],
    "09_capstone": [
        ("flip_flop_batch", "bits = torch.where(instr == READ, bits.gather(1, last_write), bits)", "bits = bits"),
        ("rope", "x1, x2 = x[..., 0::2], x[..., 1::2]", "x1, x2 = x[..., : d // 2], x[..., d // 2 :]"),
        POSITIONAL_ENCODING,
        ("evaluate", "hit = logits[:, :-1].argmax(dim=-1) == tokens[:, 1:]", "hit = logits.argmax(dim=-1) == tokens"),
        ("evaluate", "read_mask[:, 1:]", "read_mask"),
    ],
}

# A submission that passes the visible check of test_weight_matrix and fails its hidden one (T = 29 is a hidden size):
# its feedback must say that the test failed without showing the hidden test.
HIDDEN_ONLY = ("01_stick_breaking_numpy", {"weight_matrix": '''
def weight_matrix(z, attend_current=False):
    T = z.shape[0]
    A = np.zeros((T, T))
    for i in range(T):
        A[i] = weights_for_query(z[i], i, attend_current or T == 29)
    return A
'''}, {"test_weight_matrix"})

MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")


def solution_path(lesson):
    return ROOT / "solutions" / lesson / f"{lesson}.ipynb"


def read(path):
    return nbformat.read(str(path), as_version=4)


def nbgrader_meta(cell):
    return cell.metadata.get("nbgrader", {})


def region(source, begin, end):
    """The lines strictly between the begin and end markers (all regions of the cell)."""
    lines, inside = [], False
    for line in source.splitlines():
        if begin in line:
            inside = True
        elif end in line:
            inside = False
        elif inside:
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def isolated_env(tmp_path_factory):
    """Environment for Jupyter, IPython, matplotlib and nbgrader: state in temporary folders, the venv's tools first."""
    base = tmp_path_factory.mktemp("jupyter-state")
    env = {
        "JUPYTER_CONFIG_DIR": base / "config", "JUPYTER_DATA_DIR": base / "data",
        "JUPYTER_RUNTIME_DIR": base / "runtime", "IPYTHONDIR": base / "ipython", "MPLCONFIGDIR": base / "matplotlib",
        "XDG_CACHE_HOME": base / "cache", "TRITON_CACHE_DIR": base / "triton",
    }
    for folder in env.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {name: str(folder) for name, folder in env.items()}
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield dict(os.environ)


# --------------------------------------------------------------------------------------------------------------
# the source notebooks

@pytest.mark.parametrize("lesson", LESSONS)
def test_solution_notebook_is_clean_and_well_formed(lesson):
    nb = read(solution_path(lesson))
    nbformat.validate(nb)
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, f"per-machine notebook metadata: {set(nb.metadata)}"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert set(nb.metadata.get("language_info", {})) <= {"name"}
    points, ids = {}, set()
    for cell in nb.cells:
        assert set(cell.metadata) <= {"nbgrader"}, f"cell {cell.get('id')}: per-machine metadata {set(cell.metadata)}"
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.get('id')} has outputs"
        meta = nbgrader_meta(cell)
        if not meta:
            assert not any(m in cell.source for m in MARKERS), f"markers outside nbgrader cells: {cell.source[:80]}"
            continue
        assert meta["grade_id"] not in ids, f"duplicate grade_id {meta['grade_id']}"
        ids.add(meta["grade_id"])
        if meta.get("solution"):
            assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source
            assert not meta.get("grade") and not meta.get("locked")
        if meta.get("grade"):
            assert meta["locked"] and cell.cell_type == "code" and meta["grade_id"].startswith("test_")
            points[meta["grade_id"]] = meta["points"]
            hidden = region(cell.source, "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
            assert len(hidden) <= 3, f"{meta['grade_id']}: keep hidden-test blocks small"
            visible = [line for line in cell.source.splitlines() if line.strip() and not line.startswith("###")]
            assert any(line.startswith("check_") for line in visible), f"{meta['grade_id']} calls no check"
    assert points == POINTS[lesson]


# --------------------------------------------------------------------------------------------------------------
# release and the nbgrader round trip

def nbgrader(env, course, *args, timeout=600):
    proc = subprocess.run([str(VENV_BIN / "nbgrader"), *args], cwd=course, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def wrong_submission(lesson, mistakes=None):
    """The solution notebook with its mistakes: whole solution cells by grade_id (a dict), or edits (a list of
    (grade_id, right text, wrong text), each right text found exactly once in its cell)."""
    nb = read(solution_path(lesson))
    mistakes = WRONG[lesson][0] if mistakes is None else mistakes
    cells = {nbgrader_meta(cell).get("grade_id"): cell for cell in nb.cells}
    if isinstance(mistakes, dict):
        for grade_id, source in mistakes.items():
            cells[grade_id].source = source.strip("\n")
    else:
        for grade_id, right, wrong in mistakes:
            assert cells[grade_id].source.count(right) == 1, f"{lesson}/{grade_id}: {right!r} is not in the solution once"
            cells[grade_id].source = cells[grade_id].source.replace(right, wrong)
    return nb


@pytest.fixture(scope="module")
def course(isolated_env, tmp_path_factory):
    """A temporary course root: release, the students' submissions (solutions, wrong, wrong everywhere, hidden
    only), autograde, feedback."""
    course = tmp_path_factory.mktemp("course")
    shutil.copy(ROOT / "nbgrader_config.py", course)
    for lesson in LESSONS:
        shutil.copytree(ROOT / "solutions" / lesson, course / "solutions" / lesson)
    timings = {}
    start = time.perf_counter()
    nbgrader(isolated_env, course, "generate_assignment", "0*", "--force")  # every lesson, in one process
    timings["release"] = time.perf_counter() - start
    for lesson in LESSONS:
        submissions = {"solutions": read(solution_path(lesson)),
                       "wrong": wrong_submission(lesson)}
        if lesson in WRONG_EVERYWHERE:
            submissions["wrong_everywhere"] = wrong_submission(lesson, WRONG_EVERYWHERE[lesson])
        for student, nb in submissions.items():
            folder = course / "submitted" / student / lesson
            folder.mkdir(parents=True)
            nbformat.write(nb, str(folder / f"{lesson}.ipynb"))
    lesson, replacements, _ = HIDDEN_ONLY
    folder = course / "submitted" / "hidden_only" / lesson
    folder.mkdir(parents=True)
    nbformat.write(wrong_submission(lesson, replacements), str(folder / f"{lesson}.ipynb"))
    for step in ("autograde", "generate_feedback"):
        start = time.perf_counter()
        nbgrader(isolated_env, course, step, "0*", *(["--create"] if step == "autograde" else []))
        timings[step] = time.perf_counter() - start
    print("nbgrader round trip (s):", {k: round(v, 1) for k, v in timings.items()})
    return course


def test_committed_release_is_what_nbgrader_generates(course):
    for lesson in LESSONS:
        committed = (ROOT / "lessons" / lesson / f"{lesson}.ipynb").read_text()
        fresh = (course / "lessons" / lesson / f"{lesson}.ipynb").read_text()
        assert committed == fresh, f"lessons/{lesson} is stale: run `make release` and commit the result"
    generated = sorted(p.name for p in (ROOT / "lessons").iterdir() if p.is_dir())
    assert generated == LESSONS, f"lessons/ holds folders without a source in solutions/: {generated}"


@pytest.mark.parametrize("lesson", LESSONS)
def test_release_holds_no_solutions_or_hidden_tests(lesson):
    release = read(ROOT / "lessons" / lesson / f"{lesson}.ipynb")
    source = read(solution_path(lesson))
    text = (ROOT / "lessons" / lesson / f"{lesson}.ipynb").read_text()
    for marker in MARKERS:
        assert marker not in text, f"{marker} in lessons/{lesson}"
    by_id = {nbgrader_meta(c).get("grade_id"): c for c in release.cells if nbgrader_meta(c)}
    for cell in source.cells:
        meta = nbgrader_meta(cell)
        if meta.get("solution"):
            stub = by_id[meta["grade_id"]].source
            assert "raise NotImplementedError(" in stub
            task = re.findall(r"(?:def|class) (\w+)", cell.source.split("### BEGIN SOLUTION")[0])[-1]
            assert re.search(rf'NotImplementedError\("(\w+\.)?{task}:', stub), f"the stub does not name {task}"
            for line in region(cell.source, "BEGIN SOLUTION", "END SOLUTION"):
                if len(line.strip()) > 12:
                    assert line.strip() not in stub, f"solution code in lessons/{lesson}: {line.strip()}"
        if meta.get("grade"):
            for line in region(cell.source, "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
                assert line.strip() not in text, f"hidden test in lessons/{lesson}: {line.strip()}"
    for cell in release.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def gradebook_scores(course):
    from nbgrader.api import Gradebook

    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        for lesson in LESSONS:
            for student in ("solutions", "wrong") + (("wrong_everywhere",) if lesson in WRONG_EVERYWHERE else ()):
                submission = gb.find_submission(lesson, student)
                scores[lesson, student] = {grade.name: (grade.score, grade.max_score)
                                           for notebook in submission.notebooks for grade in notebook.grades}
    return scores


def test_autograde_scores(course):
    scores = gradebook_scores(course)
    for lesson in LESSONS:
        full = {name: (float(p), float(p)) for name, p in POINTS[lesson].items()}
        assert scores[lesson, "solutions"] == full, f"{lesson}: the solutions lost points"
        _, broken = WRONG[lesson]
        expected = {n: ((0.0 if n in broken else m), m) for n, (_, m) in full.items()}
        assert scores[lesson, "wrong"] == expected, f"{lesson}: the wrong submission's scores"
        if lesson in WRONG_EVERYWHERE:
            assert scores[lesson, "wrong_everywhere"] == {n: (0.0, m) for n, (_, m) in full.items()}, \
                f"{lesson}: a test cell kept its points although every exercise was answered wrong"


def test_hidden_tests_count(course):
    from nbgrader.api import Gradebook

    lesson, _, broken = HIDDEN_ONLY
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", COURSE_ID) as gb:
        submission = gb.find_submission(lesson, "hidden_only")
        scores = {g.name: g.score for nb in submission.notebooks for g in nb.grades}
    assert scores == {name: (0.0 if name in broken else float(p)) for name, p in POINTS[lesson].items()}


def seconds_to_run(nb):
    """Wall time of a notebook's run, from the first cell's start to the last cell's reply (the timestamps the
    notebook client records in each cell's metadata)."""
    stamps = [c.metadata.get("execution", {}) for c in nb.cells if c.cell_type == "code"]
    started = datetime.fromisoformat(stamps[0]["iopub.execute_input"].replace("Z", "+00:00"))
    finished = datetime.fromisoformat(stamps[-1]["shell.execute_reply"].replace("Z", "+00:00"))
    return (finished - started).total_seconds()


@pytest.mark.parametrize("lesson", LESSONS)
def test_solution_notebook_runs_on_the_cpu(course, lesson):
    """The solution, run top to bottom by the autograde above: every check prints that it passed, nothing goes to
    stderr, and the notebook stays within its time budget."""
    nb = read(course / "autograded" / "solutions" / lesson / f"{lesson}.ipynb")
    seconds = seconds_to_run(nb)
    assert seconds < TIME_BUDGET_S, f"{lesson} took {seconds:.0f} s"
    for cell in nb.cells:
        if nbgrader_meta(cell).get("grade"):
            streams = [o for o in cell.outputs if o.output_type == "stream"]
            assert all(o.name == "stdout" for o in streams), f"{nbgrader_meta(cell)['grade_id']} wrote to stderr"
            text = "".join(o.text for o in streams)
            assert "passed" in text and "error" not in [o.output_type for o in cell.outputs], \
                f"{lesson}/{nbgrader_meta(cell)['grade_id']}: {text[-500:]}"


def test_autograde_runs_the_environment_kernel(course):
    nb = read(course / "autograded" / "solutions" / "00_setup" / "00_setup.ipynb")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"at {sys.executable}" in text


def visible_text(path):
    """The text of an HTML feedback page, as a reader sees it (tags removed, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text()))


def test_feedback_hides_the_hidden_tests(course):
    for lesson in LESSONS:
        source = read(solution_path(lesson))
        hidden = [line.strip() for cell in source.cells if nbgrader_meta(cell).get("grade")
                  for line in region(cell.source, "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")]
        visible_call = next(line for cell in source.cells if nbgrader_meta(cell).get("grade")
                            for line in cell.source.splitlines() if line.startswith("check_"))
        for student in ("solutions", "wrong"):
            page = course / "feedback" / student / lesson / f"{lesson}.html"
            text = visible_text(page)
            assert visible_call in text, f"{page}: the visible tests should be there"
            assert "HIDDEN TESTS" not in text
            for line in hidden:
                assert line not in text, f"{page} shows a hidden test: {line}"
    # a failed hidden test: the feedback shows the check's message, not the test or its traceback
    lesson, _, _ = HIDDEN_ONLY
    text = visible_text(course / "feedback" / "hidden_only" / lesson / f"{lesson}.html")
    assert "check_weight_matrix: the weight matrix is wrong for regime='random', T=29" in text
    assert "seed=23" not in text and "---->" not in text and "Cell In[" not in text  # no traceback
