"""sb_ref.testing.speed: tiers on a GPU, proxies without one (never a wall-clock score on a CPU), and the same
check run by the grader against a notebook's function."""
import pytest
import torch
import triton
import triton.language as tl
import sb_ref
from sb_ref.testing import make_inputs
from sb_ref.testing.speed import (Score, TimingCase, check_speed, key_elements_loaded, largest_allocation,
                                  reference_attention, speed_share, time_pair, timed_calls)

T, D, H, BLOCK = 256, 16, 2, 64  # the interpreter's query block for sb_ref's forward is 64


def make_args(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return make_inputs("random", B=1, Hq=H, T=T, D=D, dtype=dtype, device=device)


SMALL_TIMING = TimingCase(1, 2, 64, 16, "float32", device="cpu")  # what a CPU can time in a test


def torch_reference(q, k, v):
    return sb_ref.stick_breaking_attention(q, k, v, backend="torch")


FULL_SWEEP = triton.cdiv(T, BLOCK) * T * D * H  # every query block loading every key row


def quadratic(q, k, v):
    return sb_ref.testing.oracle_attention(q, k, v)[0].to(q.dtype)


@triton.jit
def _touch_every_key(K, OUT, T, D: tl.constexpr, BLOCK: tl.constexpr):
    i_m, i_h = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros([D], dtype=tl.float32)
    for start in range(0, T, BLOCK):
        o_t = start + tl.arange(0, BLOCK)
        acc += tl.sum(tl.load(K + i_h * T * D + o_t[:, None] * D + tl.arange(0, D)[None, :],
                              mask=o_t[:, None] < T, other=0.0), 0)
    tl.store(OUT + (i_h * tl.num_programs(0) + i_m) * D + tl.arange(0, D), acc)


def sweeping(q, k, v):
    """Right answer, but a kernel that visits every key tile for every query block."""
    out = torch.empty(H * triton.cdiv(T, BLOCK), D, device=k.device)
    _touch_every_key[(triton.cdiv(T, BLOCK), H)](k.contiguous(), out, T, D=D, BLOCK=BLOCK)
    return reference_attention(q, k, v)


def test_tiers():
    assert speed_share(1.3) == 1.0 and speed_share(0.9) == 1.0 and speed_share(0.7) == 0.75
    assert speed_share(0.4) == 0.5 and speed_share(0.01) == 0.25
    assert repr(Score(1.5, "note")) == "1.5" and Score(1.5, "note").note == "note"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxies")
def test_without_a_gpu_the_proxies_pass_a_tiled_causal_kernel():
    score = check_speed(reference_attention, reference_attention, make_args, points=2,
                        full_sweep_loads=FULL_SWEEP)
    assert score == 2 and "no GPU" in score.note and "proxies" in score.note


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxies")
def test_the_proxies_measure_what_they_say():
    q, k, v = make_args("cpu")
    assert largest_allocation(quadratic, (q, k, v)) >= T * T
    assert largest_allocation(reference_attention, (q, k, v)) <= q.numel()  # o itself
    causal = key_elements_loaded(reference_attention, (q, k, v))
    assert causal == pytest.approx(FULL_SWEEP * (T // BLOCK + 1) / (2 * (T // BLOCK)), rel=0.01)
    assert key_elements_loaded(sweeping, (q, k, v)) == causal + FULL_SWEEP


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxies")
def test_a_quadratic_op_or_a_full_sweep_fails_its_proxy():
    with pytest.raises(AssertionError, match="at least T\\*T"):
        check_speed(quadratic, reference_attention, make_args, points=2)
    with pytest.raises(AssertionError, match="diagonal"):
        check_speed(sweeping, reference_attention, make_args, points=2, full_sweep_loads=FULL_SWEEP)


def test_numerics_come_first():
    def wrong(q, k, v):
        return reference_attention(q, k, v) * 1.01

    with pytest.raises(AssertionError, match="numerics first"):
        check_speed(wrong, reference_attention, make_args, points=2)


@pytest.mark.gpu
def test_on_a_gpu_the_score_is_a_tier_of_measured_speed():
    timing = TimingCase(4, 16, 8192, 128)
    same = check_speed(reference_attention, reference_attention, make_args, points=4, timing=timing)
    assert same >= 3 and "ms" in same.note  # the same kernel: about 1x, timing noise aside

    def slower(q, k, v):
        for _ in range(3):
            out = reference_attention(q, k, v)
        return out

    slow = check_speed(slower, reference_attention, make_args, points=4, timing=timing)
    assert slow < same and "of the points" in slow.note


def test_timed_calls_give_each_call_its_own_inputs_and_a_digest_of_its_output():
    digests, norms = timed_calls(torch_reference, SMALL_TIMING, seed=3, reps=5)
    assert digests.shape == norms.shape == (5, 1, 2) and (norms > 0).all()
    again, _ = timed_calls(torch_reference, SMALL_TIMING, seed=3, reps=5)
    assert torch.equal(digests, again)  # the same seed: the same inputs
    assert len(set(digests[:, 0, 0].tolist())) == 5  # each call its own q, so its own output


def test_timing_catches_a_result_kept_from_an_earlier_call():
    kept = {}

    def cached(q, k, v):
        if "o" not in kept:
            kept["o"] = torch_reference(q, k, v)
        return kept["o"]

    t_fn, t_ref = time_pair(torch_reference, torch_reference, SMALL_TIMING, rounds=1)
    assert t_fn > 0 and t_ref > 0
    with pytest.raises(AssertionError, match="not sb_ref's for its inputs"):
        time_pair(cached, torch_reference, SMALL_TIMING, rounds=1)


TIMING_CELL = """from sb_ref.testing.speed import time_pair
from test_speed_checks import SMALL_TIMING, torch_reference
t_fn, t_ref = time_pair({name}, torch_reference, SMALL_TIMING)
assert 0 < t_fn and 0 < t_ref, (t_fn, t_ref)
assert answer() == 42  # the notebook's kernel is back, its state with it"""

TIMED = {
    "honest": "    return sb_ref.stick_breaking_attention(q, k, v, backend='torch')",
    # one output kept and given back for every call
    "kept": "    global KEPT\n"
            "    if 'KEPT' not in globals():\n"
            "        KEPT = sb_ref.stick_breaking_attention(q, k, v, backend='torch')\n"
            "    return KEPT",
    # the grader's timing helper replaced in the learner's kernel: instant, made-up digests
    "forged": "    import sb_ref.testing.speed as speed\n"
              "    speed.timed_calls = lambda fn, case, seed, reps: (torch.zeros(reps, 1, 2, dtype=torch.float64),\n"
              "                                                      torch.ones(reps, 1, 2, dtype=torch.float64))\n"
              "    return sb_ref.stick_breaking_attention(q, k, v, backend='torch')",
}


def test_the_grader_times_the_learner_from_outside_and_sb_ref_alone(tmp_path, monkeypatch):
    """The grader's clock, the digests checked against sb_ref's, and the notebook's kernel back afterwards."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from autograder.grading import grade_notebook

    nb = new_notebook()
    cells = [(new_code_cell("import sb_ref, torch\nANSWER = 42\n\ndef answer():\n    return ANSWER"), "setup",
              {"locked": True})]
    cells += [(new_code_cell(f"def {name}(q, k, v):\n{body}"), name, {"solution": True})
              for name, body in TIMED.items()]
    cells += [(new_code_cell(TIMING_CELL.format(name=name)), f"test_{name}",
               {"grade": True, "locked": True, "points": 1}) for name in TIMED]
    # after every timing shut the learner's processes down: the notebook's state is back
    cells.append((new_code_cell("assert answer() == 42"), "test_after", {"grade": True, "locked": True, "points": 1}))
    for cell, gid, meta in cells:
        cell.metadata["nbgrader"] = {"grade_id": gid, "schema_version": 3, "solution": False, "grade": False,
                                     "locked": False, **meta}
    nb.cells = [cell for cell, _, _ in cells]
    path = tmp_path / "timing.ipynb"
    nbformat.write(nb, path)
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))  # the timing case for the cell
    result = grade_notebook(path, path, call_timeout=300, gpu=torch.cuda.is_available())
    honest, kept, forged, after = result.exercises
    assert honest.status == "passed", honest.message
    for cheat in (kept, forged):
        assert cheat.status == "failed" and "not sb_ref's for its inputs" in cheat.message, cheat.message
    assert after.status == "passed", after.message


SPEED_CELL = """from sb_ref.testing.speed import check_speed, reference_attention
from test_speed_checks import make_args, LESSON_SWEEP
check_speed(fast_attention, reference_attention, make_args, points=2, full_sweep_loads=LESSON_SWEEP)"""

LESSON_SWEEP = triton.cdiv(T, 16) * T * D * H  # the lesson's kernel on a CPU: 16 x 16 tiles


def _lesson_08_fast_forward():
    """Lesson 08's solution kernel and launcher, as the body of ``fast_attention``: a kernel of the course's kind,
    which the grader can replay (sb_ref's own kernels take arguments no learner's kernel needs)."""
    import nbformat
    from test_autograder_cli import ROOT, _solution_cell

    nb = nbformat.read(ROOT / "solutions" / "08_performance" / "08_performance.ipynb", as_version=4)
    source = "\n\n".join(_solution_cell(nb, gid).source for gid in ("fast_kernel", "fast_forward"))
    source = "\n".join(line for line in source.splitlines() if "### " not in line)
    return "    return fast_forward(q, k, v)\n\n\nimport triton\nimport triton.language as tl\n\n\n" + source


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxies")
@pytest.mark.parametrize("body, points, status", [
    (_lesson_08_fast_forward(), 2, "passed"),
    ("    return sb_ref.testing.oracle_attention(q, k, v)[0].float()", 0, "failed"),
    # the in-process probes replaced at call time: the grader's measure is not taken in the learner's process
    ("    import sb_ref.testing.speed as speed\n"
     "    speed._probed_record = lambda fn, args: (fn(*args), (1, (1,), 'forged'))\n"
     "    speed.peak_memory = lambda *args: None\n"
     "    return sb_ref.testing.oracle_attention(q, k, v)[0].float()", 0, "failed"),
    # ballast held from a first call, given up in the measured one to make room and taken back before it returns
    ("    global BALLAST\n"
     "    if 'BALLAST' in globals():\n"
     "        del BALLAST\n"
     "        o = sb_ref.testing.oracle_attention(q, k, v)[0].float()\n"
     "        BALLAST = torch.ones(32 << 20, dtype=torch.uint8)\n"
     "        return o\n"
     "    BALLAST = torch.ones(32 << 20, dtype=torch.uint8)\n"
     "    return sb_ref.testing.oracle_attention(q, k, v)[0].float()", 0, "failed"),
    # more ballast than may be held at all
    ("    global BALLAST\n"
     "    BALLAST = torch.ones(320 << 20, dtype=torch.uint8)\n"
     "    return sb_ref.testing.oracle_attention(q, k, v)[0].float()", 0, "held"),
])
def test_the_grader_runs_the_probes_in_the_notebooks_kernel(tmp_path, monkeypatch, body, points, status):
    """The learner's function is measured where it runs: a quadratic one is caught through the proxy."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from autograder.grading import grade_notebook

    nb = new_notebook()
    setup = new_code_cell("import sb_ref, torch")
    solution = new_code_cell("def fast_attention(q, k, v):\n" + body)
    test = new_code_cell(SPEED_CELL)
    for cell, gid, meta in ((setup, "setup", {"locked": True}), (solution, "fast", {"solution": True}),
                            (test, "test_speed", {"grade": True, "locked": True, "points": 2})):
        cell.metadata["nbgrader"] = {"grade_id": gid, "schema_version": 3, "solution": False, "grade": False,
                                     "locked": False, **meta}
    nb.cells = [setup, solution, test]
    path = tmp_path / "speed.ipynb"
    nbformat.write(nb, path)
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))  # make_args for the cell
    result = grade_notebook(path, path, call_timeout=300)
    (exercise,) = result.exercises
    assert exercise.points == points and exercise.status == ("failed" if status == "held" else status), \
        exercise.message
    if status == "passed":
        assert "no GPU" in exercise.message and "measured from outside" in exercise.message
    elif status == "held":
        assert exercise.status == "failed" and "held" in exercise.message
    else:
        assert "T*T" in exercise.message and "measured from outside" in exercise.message
