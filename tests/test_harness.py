"""The lessons' harness (sb_ref.testing.lessons.harness) and the checks' side of the grader's protocol
(sb_ref.testing.remote): one stub detector for every lesson, one tolerance table, one way to run a piece of a check
where the learner's function lives."""
import pytest
import torch

from sb_ref.testing.lessons import harness
from sb_ref.testing.remote import run_where_it_lives


def raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (whatever the learner's code raises)
        return exc
    raise AssertionError("expected an exception")


class CompilationError(Exception):
    """What Triton's compiler raises for a kernel it cannot compile (matched by name, as the detector does)."""


def _stub():
    raise NotImplementedError("weight_matrix: not written yet (see the task above)")


def _wrapped(outer, inner):
    def fn():
        try:
            raise inner
        except Exception as exc:
            raise outer from exc
    return fn


@pytest.mark.parametrize("make, stub", [
    (_stub, harness.Stub("weight_matrix", False)),                                      # the function itself
    (lambda: (_ for _ in ()).throw(NotImplementedError()), harness.Stub(None, False)),  # a bare stub
    (_wrapped(RuntimeError("interpreter"), NotImplementedError("dq_kernel: not written yet")),
     harness.Stub("dq_kernel", True)),                                                  # in a kernel, interpreted
    (_wrapped(RuntimeError("NotImplementedError('log_sigmoids: not written yet')"), ValueError("x")),
     harness.Stub("log_sigmoids", True)),                                              # quoted by a wrapper
    (lambda: (_ for _ in ()).throw(CompilationError("unsupported AST node type: Raise")),
     harness.Stub(None, True)),                                                         # compiled: rejected raise
    (lambda: (_ for _ in ()).throw(CompilationError('raise NotImplementedError("k: not written yet")')),
     harness.Stub("k", True)),
])
def test_find_stub_covers_every_kind_of_stub(make, stub):
    assert harness.find_stub(raised(make)) == stub


@pytest.mark.parametrize("make", [
    _wrapped(RuntimeError("the kernel failed"), NotImplementedError("not supported in the interpreter")),
    lambda: (_ for _ in ()).throw(ValueError("shapes do not match")),
    lambda: (_ for _ in ()).throw(CompilationError("type mismatch")),
])
def test_find_stub_leaves_real_errors_alone(make):
    assert harness.find_stub(raised(make)) is None


def test_call_says_not_attempted_and_names_what_still_raises():
    with pytest.raises(AssertionError, match="check_x: not attempted yet. `weight_matrix` still raises"):
        harness.call("check_x", lambda: _stub(), (), {}, "case")
    nested = _wrapped(RuntimeError("interpreter"), NotImplementedError("my_kernel: not written yet"))
    with pytest.raises(AssertionError, match=r"the kernel that `launch` launches still raises NotImplementedError "
                                             r"\(`my_kernel`: not written yet\)"):
        harness.call("check_x", lambda: nested(), (), {}, "case", label="launch")
    with pytest.raises(AssertionError, match="`f` raised ValueError: bad\n  case: T=3\n  hint: look"):
        harness.call("check_x", lambda: (_ for _ in ()).throw(ValueError("bad")), (), {}, "T=3", "look", label="f")


def test_one_tolerance_table_holds_the_course_contract():
    assert harness.TOLERANCE.output == {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.5e-3,
                                        torch.float16: 2.5e-3}
    assert harness.TOLERANCE.gradient == {torch.float64: 1e-10, torch.float32: 3e-5}


def plus_one(fn, x):
    return fn(x) + 1


def test_run_where_it_lives_here_and_through_a_proxy():
    assert run_where_it_lives(lambda x: 2 * x, plus_one, 3) == 7

    class Proxy:  # the grader's RemoteFunction, as the checks see it
        def run_in_kernel(self, helper, *args):
            return helper, args

    assert run_where_it_lives(Proxy(), plus_one, 3) == (f"{__name__}:plus_one", (3,))
