"""sb_ref.testing.speed: tiers on a GPU, proxies without one (never a wall-clock score on a CPU), and the same
check run by the grader against a notebook's function."""
import pytest
import torch
import triton
import triton.language as tl
import sb_ref
from sb_ref.testing import make_inputs
from sb_ref.testing.speed import (Score, check_speed, key_elements_loaded, largest_allocation, reference_attention,
                                  speed_share)

T, D, H, BLOCK = 256, 16, 2, 64  # the interpreter's query block for sb_ref's forward is 64


def make_args(device, size):
    T_ = T if size == "small" else 8192
    B_, H_ = (1, H) if size == "small" else (4, 16)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    return make_inputs("random", B=B_, Hq=H_, T=T_, D=D if size == "small" else 128, dtype=dtype, device=device)


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
    q, k, v = make_args("cpu", "small")
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
    same = check_speed(reference_attention, reference_attention, make_args, points=4)
    assert same >= 3 and "ms" in same.note  # the same kernel: about 1x, timing noise aside

    def slower(q, k, v):
        for _ in range(3):
            out = reference_attention(q, k, v)
        return out

    slow = check_speed(slower, reference_attention, make_args, points=4)
    assert slow < same and "of the points" in slow.note


SPEED_CELL = """from sb_ref.testing.speed import check_speed, reference_attention
from test_speed_checks import make_args, FULL_SWEEP
check_speed(fast_attention, reference_attention, make_args, points=2, full_sweep_loads=FULL_SWEEP)"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU proxies")
@pytest.mark.parametrize("body, points, status", [
    ("    return sb_ref.stick_breaking_attention(q, k, v, backend='triton')", 2, "passed"),
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
