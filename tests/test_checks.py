"""The checks of lessons 00-04 (sb_ref.testing.lessons.lesson00 ... lesson04): a right answer passes with a one-line
verdict, a wrong one fails with a message that names the case, the error, where it is and a hint, a stub is "not
attempted yet", and nothing reaches stderr (nbgrader scores any stderr output of a test cell as a failure)."""
import gc
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sb_ref
from sb_ref.testing import lessons

# ------------------------------------------------------------------------------------------------- right answers


def sigmoid(z):
    e = np.exp(-np.abs(np.asarray(z, dtype=np.float64)))
    return np.where(np.asarray(z) >= 0, 1 / (1 + e), e / (1 + e))


def weights_for_query(z_row, i, attend_current=False):
    weights, stick = np.zeros(len(z_row)), 1.0
    for j in range(i if attend_current else i - 1, -1, -1):
        beta = sigmoid(z_row[j])
        weights[j], stick = stick * beta, stick * (1 - beta)
    return weights


def weight_matrix(z, attend_current=False):
    return np.stack([weights_for_query(z[i], i, attend_current) for i in range(z.shape[0])])


def attention_numpy(q, k, v, attend_current=False):
    z = q @ k.T / np.sqrt(q.shape[-1])
    T = z.shape[0]
    seen = np.tril(np.ones((T, T), dtype=bool), 0 if attend_current else -1)
    rem = np.prod(np.where(seen, 1 - sigmoid(z), 1.0), axis=1)
    return weight_matrix(z, attend_current) @ v, rem


def log_sigmoids(z):
    return F.logsigmoid(z), F.logsigmoid(-z)


def reverse_exclusive_cumsum(x):
    return F.pad(x.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))


def visible(T, attend_current):
    return torch.ones(T, T, dtype=torch.bool).tril(0 if attend_current else -1)


def stable_weights(logits, attend_current=False):
    z = logits if logits.dtype == torch.float64 else logits.float()
    seen = visible(z.shape[-1], attend_current)
    log_A = F.logsigmoid(z) + reverse_exclusive_cumsum(F.logsigmoid(-z).masked_fill(~seen, 0.0))
    return log_A.exp().masked_fill(~seen, 0.0).to(logits.dtype)


def stable_attention(q, k, v, scale=None, attend_current=False):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    z = scale * q.to(compute) @ k.to(compute).transpose(-1, -2)
    rem = F.logsigmoid(-z).masked_fill(~visible(z.shape[-1], attend_current), 0.0).sum(-1).exp()
    return (stable_weights(z, attend_current) @ v.to(compute)).to(v.dtype), rem


def gradcheck_attention(attention):
    q, k, v = (torch.randn(1, 1, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v), (q, k, v), raise_exception=False)


def repeat_kv(x, n_rep):
    return x.repeat_interleave(n_rep, dim=1)


def apply_remainder(o, rem, v, mode, bias=None):
    if mode == "self":
        return o + rem[..., None] * repeat_kv(v, o.shape[1] // v.shape[1])
    if mode == "bias":
        return o + rem[..., None] * bias[None, :, None, :]
    return o


def combine(near, far):
    return near[0] + near[1].exp()[..., None] * far[0], near[1] + far[1]


def blocked_attention(q, k, v, block, attend_current=False):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    *lead, T, D = q.shape
    o, rem = q.new_zeros(*lead, T, v.shape[-1]), q.new_ones(*lead, T)
    for qs in range(0, T, block):
        qe = min(qs + block, T)
        o_b, carry = q.new_zeros(*lead, qe - qs, v.shape[-1]), q.new_zeros(*lead, qe - qs)
        for ks in range(qs, -1, -block):
            ke = min(ks + block, T)
            z = D ** -0.5 * q[..., qs:qe, :] @ k[..., ks:ke, :].transpose(-1, -2)
            i, j = torch.arange(qs, qe)[:, None], torch.arange(ks, ke)[None, :]
            seen = (j <= i) if attend_current else (j < i)
            log_keep = F.logsigmoid(-z).masked_fill(~seen, 0.0)
            log_A = F.logsigmoid(z) + carry[..., None] + reverse_exclusive_cumsum(log_keep)
            o_b = o_b + log_A.exp().masked_fill(~seen, 0.0) @ v[..., ks:ke, :]
            carry = carry + log_keep.sum(-1)
        o[..., qs:qe, :], rem[..., qs:qe] = o_b, carry.exp()
    return o, rem


RIGHT = {
    "check_sigmoid": sigmoid,
    "check_weights_for_query": weights_for_query,
    "check_weight_matrix": weight_matrix,
    "check_attention_numpy": attention_numpy,
    "check_log_sigmoids": log_sigmoids,
    "check_reverse_exclusive_cumsum": reverse_exclusive_cumsum,
    "check_stable_weights": stable_weights,
    "check_stable_attention": stable_attention,
    "check_gradcheck_attention": gradcheck_attention,
    "check_attention_gradients": stable_attention,
    "check_repeat_kv": repeat_kv,
    "check_apply_remainder": apply_remainder,
    "check_layer_forward": sb_ref.StickBreakingSelfAttention,
    "check_combine": combine,
    "check_blocked_attention": blocked_attention,
    "check_blocked_memory": blocked_attention,
}


def run_check(name, fn, **kwargs):
    return lessons.checks()[name](fn, **kwargs)


def failure(name, fn, **kwargs):
    with pytest.raises(AssertionError) as info:
        run_check(name, fn, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------- tests


def test_every_check_is_exported():
    """Each lesson's module exports its checks, and the grader sees them all: lessons 00-04's (tested here) and those
    of the later lessons (tested in tests/test_checks_NN.py)."""
    import importlib

    modules = [importlib.import_module(f"sb_ref.testing.lessons.{lesson}") for lesson in lessons.LESSONS]
    exported = [name for module in modules for name in module.__all__ if name.startswith("check_")]
    assert len(exported) == len(set(exported)), "two lessons export a check of the same name"
    early = {name for module in modules[:5] for name in module.__all__}
    assert early == set(RIGHT)
    assert set(lessons.checks()) == set(exported)
    assert all(callable(check) for check in lessons.checks().values())


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_right_answer_passes_quietly(name, capfd):
    gc.collect()  # objects that earlier tests leaked would warn (ResourceWarning) whenever they are collected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_check(name, RIGHT[name])
    out, err = capfd.readouterr()
    assert result is None, "checks return nothing (nbgrader would read a number as partial credit)"
    assert out.startswith(f"{name}: passed") and out.count("\n") == 1, out
    caught = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert err == "" and not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_stub_is_not_attempted(name, capfd):
    def stub(*args, **kwargs):
        raise NotImplementedError("my_function: not written yet (see the task above)")

    if name == "check_layer_forward":
        class stub(sb_ref.StickBreakingSelfAttention):  # noqa: N801 (the given constructor, forward still a stub)
            def forward(self, x):
                raise NotImplementedError("StickBreakingLayer.forward: not written yet")

    message = failure(name, stub)
    assert "not attempted yet" in message and name in message
    assert capfd.readouterr().err == ""


def test_failure_names_the_case_the_error_its_place_and_a_hint():
    def softmax_matrix(z, attend_current=False):
        T = z.shape[0]
        A = np.zeros((T, T))
        for i in range(T):
            n = i + 1 if attend_current else i
            if n:
                e = np.exp(z[i, :n] - z[i, :n].max())
                A[i, :n] = e / e.sum()
        return A

    message = failure("check_weight_matrix", softmax_matrix)
    for part in ("regime='random'", "T=17", "attend_current=False", "relative error", "tolerance", "index [",
                 "got", "expected", "hint:", "like softmax"):
        assert part in message, (part, message)


def test_hints_point_at_the_likely_mistake():
    with_diagonal = failure("check_weight_matrix", lambda z, attend_current=False: weight_matrix(z, True))
    assert "diagonal must be 0" in with_diagonal
    without_diagonal = failure("check_weight_matrix", lambda z, attend_current=False: weight_matrix(z, False))
    assert "attend_current=True" in without_diagonal and "diagonal" in without_diagonal
    inclusive = failure("check_reverse_exclusive_cumsum", lambda x: x.flip(-1).cumsum(-1).flip(-1))
    assert "includes x[..., j] itself" in inclusive
    tiled = failure("check_repeat_kv", lambda x, n: x.repeat(1, n, 1, 1))
    assert "not tiled" in tiled


def test_unstable_logs_fail_with_the_dtype_and_the_identity_to_use():
    message = failure("check_log_sigmoids", lambda z: (torch.log(torch.sigmoid(z)), torch.log(1 - torch.sigmoid(z))))
    assert "dtype=float64" in message and "softplus" in message and "largest relative error of one entry" in message


def test_half_precision_compute_fails_with_a_hint_to_use_float32():
    def bf16_weights(logits, attend_current=False):  # the product taken in the logits' own dtype
        T = logits.shape[-1]
        seen = visible(T, attend_current)
        keep = torch.where(seen, 1 - torch.sigmoid(logits), torch.ones_like(logits))
        after = torch.cat([keep.flip(-1).cumprod(-1).flip(-1)[..., 1:], torch.ones_like(keep[..., :1])], -1)
        return torch.where(seen, torch.sigmoid(logits) * after, torch.zeros_like(logits))

    message = failure("check_stable_weights", bf16_weights)
    assert "dtype=bfloat16" in message and "compute in float32" in message


def test_errors_inside_the_learner_code_name_the_case():
    def broken(q, k, v, scale=None, attend_current=False):
        return q @ k  # wrong shapes for a matmul

    message = failure("check_stable_attention", broken)
    assert "raised RuntimeError" in message and "case: regime='random'" in message


def test_wrong_arity_shape_and_nan_are_reported():
    assert "should return 2 values (o, rem)" in failure(
        "check_stable_attention", lambda q, k, v, scale=None, attend_current=False: stable_attention(q, k, v)[0])
    assert "has shape" in failure(
        "check_weight_matrix", lambda z, attend_current=False: weight_matrix(z, attend_current)[:, :-1])

    def nan_rem(q, k, v, scale=None, attend_current=False):
        o, rem = stable_attention(q, k, v, scale, attend_current)
        return o, rem * float("nan")

    assert "not finite" in failure("check_stable_attention", nan_rem)


def test_a_remainder_taken_as_one_minus_the_weights_fails_where_sticks_are_used_up():
    # right to ~1e-16 absolutely, so a Frobenius norm of rem passes it; entry by entry it is noise where rem is tiny
    def one_minus_sum(q, k, v, scale=None, attend_current=False):
        o, _ = stable_attention(q, k, v, scale, attend_current)
        z = q.double() @ k.double().transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
        return o, (1 - sb_ref.stick_breaking_weights(z, attend_current=attend_current).sum(-1)).to(
            torch.float64 if q.dtype == torch.float64 else torch.float32)

    message = failure("check_stable_attention", one_minus_sum)
    assert "rem is wrong" in message and "entry by entry" in message and "1 - sum(A)" in message


def test_a_failure_caused_by_an_earlier_exercise_says_to_fix_that_one_first():
    # weight_matrix is right but calls a weights_for_query that forgets to shrink the stick
    namespace = {"np": np, "sigmoid": lambda x: 1 / (1 + np.exp(-x))}
    exec(
        "def weights_for_query(z_row, i, attend_current=False):\n"
        "    w = np.zeros(len(z_row))\n"
        "    for j in range(i if attend_current else i - 1, -1, -1):\n"
        "        w[j] = sigmoid(z_row[j])\n"
        "    return w\n"
        "def weight_matrix(z, attend_current=False):\n"
        "    return np.stack([weights_for_query(z[i], i, attend_current) for i in range(z.shape[0])])\n",
        namespace)
    message = failure("check_weight_matrix", namespace["weight_matrix"])
    assert message.startswith("check_weight_matrix: `weights_for_query`, which `weight_matrix` builds on, is wrong: "
                              "fix check_weights_for_query first")
    assert "check_weights_for_query: the weights of query" in message
    # a wrong weight_matrix over a right weights_for_query gets its own message only
    assert "builds on" not in failure("check_weight_matrix", lambda z, attend_current=False: np.zeros_like(z) + 0.1)


def test_gradients_of_naive_logs_fail_in_the_saturated_regime():
    def multiplied_mask(q, k, v, scale=None, attend_current=False):
        z = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        seen = visible(z.shape[-1], attend_current).double()
        log_keep = torch.log(1 - torch.sigmoid(z)) * seen
        A = (torch.log(torch.sigmoid(z)) + reverse_exclusive_cumsum(log_keep)).exp() * seen
        return A @ v, log_keep.sum(-1).exp()

    message = failure("check_attention_gradients", multiplied_mask)
    assert "regime='saturated'" in message or "regime='long'" in message
    assert "logsigmoid" in message


def test_gradcheck_exercise_must_use_float64_and_report_what_gradcheck_says():
    def float32_gradcheck(attention):
        q, k, v = (torch.randn(1, 1, 4, 3, requires_grad=True) for _ in range(3))
        return torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v), (q, k, v), raise_exception=False)

    assert "rejected a correct attention" in failure("check_gradcheck_attention", float32_gradcheck)
    assert "accepted an attention whose backward is wrong" in failure("check_gradcheck_attention", lambda a: True)
    # letting gradcheck raise its error counts as rejecting
    raising = lambda a: torch.autograd.gradcheck(  # noqa: E731
        lambda q, k, v: a(q, k, v), tuple(torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
                                          for _ in range(3)))
    run_check("check_gradcheck_attention", raising)


def test_layer_check_needs_the_given_parameter_names():
    class Renamed(sb_ref.StickBreakingSelfAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.query = self.q_proj
            del self.q_proj

    assert "parameter names" in failure("check_layer_forward", Renamed)


def test_memory_check_catches_a_full_matrix():
    message = failure("check_blocked_memory", lambda q, k, v, block, attend_current=False: stable_attention(q, k, v))
    assert "T * T" in message and "384, 384)" in message


def test_memory_check_needs_a_correct_result():
    message = failure("check_blocked_memory", lambda q, k, v, block, attend_current=False:
                      (torch.zeros_like(v), torch.ones(q.shape[:-1])))
    assert "correct result first" in message


def test_blocked_check_mentions_short_last_block():
    def ignores_the_tail(q, k, v, block, attend_current=False):
        T = q.shape[-2]
        full = T - T % block
        o, rem = blocked_attention(q, k, v, block, attend_current)
        o[..., full:, :] = 0
        return o, rem

    message = failure("check_blocked_attention", ignores_the_tail)
    assert "not a multiple of block" in message and "the last block is short" in message

    def wrong_first_block(q, k, v, block, attend_current=False):
        o, rem = blocked_attention(q, k, v, block, attend_current)
        o[..., :block, :] = 0
        return o, rem

    message = failure("check_blocked_attention", wrong_first_block)
    assert "o is wrong" in message and "short" not in message


def test_learner_output_to_stderr_and_warnings_are_silenced(capfd):
    def noisy(z, attend_current=False):
        print("debugging", file=sys.stderr)
        warnings.warn("careful")
        np.exp(np.array([1000.0]))  # overflow RuntimeWarning
        return weight_matrix(z, attend_current)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_check("check_weight_matrix", noisy)
        with pytest.raises(AssertionError):
            run_check("check_weight_matrix", lambda z, attend_current=False: (print("x", file=sys.stderr), z)[1])
    caught = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert capfd.readouterr().err == "" and not caught


def test_hidden_variants_change_the_cases(capfd):
    run_check("check_weight_matrix", weight_matrix, seed=23, sizes=(29, 3))
    assert "T in (29, 3)" in capfd.readouterr().out
    run_check("check_stable_attention", stable_attention, seed=5, shapes=((1, 1, 9, 80, 7),),
              dtypes=(torch.float32,), regimes=("long",))
    assert "(1, 1, 9, 80, 7)" in capfd.readouterr().out
