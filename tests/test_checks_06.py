"""The checks of lesson 06 (sb_ref.testing.lessons.lesson06): the lesson's Triton solution passes with a one-line
verdict; the typical mistakes (naive logs, a kernel that ignores attend_current, a causal mask on the same-index tile
only, a launcher that builds the logits in PyTorch) fail with a message that names the case and a hint; a stub, in the
launcher or inside a kernel, is "not attempted yet"; nothing reaches stderr. Without a GPU the kernels run through
Triton's interpreter (tests/conftest.py switches it on), on small sizes."""
import sys
import warnings

import pytest
import torch
import triton
import triton.language as tl

from sb_ref.testing.lessons.lesson06 import check_log_sigmoids_triton, check_sb_forward, check_sb_forward_memory

# ------------------------------------------------------------------------------------- the lesson's solution


@triton.jit
def log_sigmoids(z):
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    d = u - 1.0
    log1p_e = tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))
    return tl.minimum(z, 0.0) - log1p_e, -tl.maximum(z, 0.0) - log1p_e


@triton.jit
def naive_log_sigmoids(z):
    log1p_e = tl.log(1.0 + tl.exp(-tl.abs(z)))  # loses the digits of small e
    return tl.minimum(z, 0.0) - log1p_e, -tl.maximum(z, 0.0) - log1p_e


@triton.jit
def sigmoid_log_sigmoids(z):
    beta = 1.0 / (1.0 + tl.exp(-z))
    return tl.log(beta), tl.log(1.0 - beta)


@triton.jit
def stub_log_sigmoids(z):
    raise NotImplementedError("log_sigmoids: not written yet (see the task above)")


@triton.jit
def _log_sigmoids_kernel(Z, LOG_BETA, LOG_KEEP, n, METHOD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(Z + offs, mask=mask, other=0.0)
    if METHOD == 0:
        log_beta, log_keep = log_sigmoids(z)
    elif METHOD == 1:
        log_beta, log_keep = naive_log_sigmoids(z)
    elif METHOD == 2:
        log_beta, log_keep = sigmoid_log_sigmoids(z)
    else:
        log_beta, log_keep = stub_log_sigmoids(z)
    tl.store(LOG_BETA + offs, log_beta, mask=mask)
    tl.store(LOG_KEEP + offs, log_keep, mask=mask)


def launcher(method):
    def log_sigmoids_of(z):
        z = z.contiguous()
        log_beta, log_keep = torch.empty_like(z), torch.empty_like(z)
        n = z.numel()
        _log_sigmoids_kernel[(triton.cdiv(n, 1024),)](z, log_beta, log_keep, n, METHOD=method, BLOCK=1024)
        return log_beta, log_keep
    return log_sigmoids_of


@triton.jit
def sb_forward_kernel(Q, K, V, O, REM, T, scale,
                      D: tl.constexpr, DV: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      MISTAKE: tl.constexpr):
    head, block = tl.program_id(0), tl.program_id(1)
    Q += head * T * D
    K += head * T * D
    V += head * T * DV
    O += head * T * DV
    REM += head * T
    first = block * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + rows[:, None] * D + d[None, :], mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)
    q = q.to(tl.float32)
    o = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_blocks = tl.cdiv(tl.minimum(first + BLOCK_M, T), BLOCK_N)
    for i in range(n_blocks):
        kb = n_blocks - 1 - i
        cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(K + cols[:, None] * D + d[None, :], mask=(cols[:, None] < T) & (d[None, :] < D), other=0.0)
        v = tl.load(V + cols[:, None] * DV + dv[None, :], mask=(cols[:, None] < T) & (dv[None, :] < DV), other=0.0)
        z = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        log_beta, log_keep = log_sigmoids(z)
        if MISTAKE == 2:
            crosses = kb == block
        else:
            crosses = kb * BLOCK_N + BLOCK_N > first
        if crosses:
            if ATTEND_CURRENT and MISTAKE != 1:
                seen = cols[None, :] <= rows[:, None]
            else:
                seen = cols[None, :] < rows[:, None]
            log_beta = tl.where(seen, log_beta, float("-inf"))
            log_keep = tl.where(seen, log_keep, 0.0)
        nearer = tl.cumsum(log_keep, axis=1, reverse=True) - log_keep
        a = tl.exp(log_beta + carry[:, None] + nearer)
        o = tl.dot(a, v.to(tl.float32), o, input_precision="ieee")
        carry += tl.sum(log_keep, axis=1)
    tl.store(O + rows[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty),
             mask=(rows[:, None] < T) & (dv[None, :] < DV))
    tl.store(REM + rows, tl.exp(carry), mask=rows < T)


def forward(mistake=0):
    def sb_forward(q, k, v, attend_current=False, block_m=16, block_n=16):
        B, H, T, D = q.shape
        Dv = v.shape[-1]
        o = torch.empty(B, H, T, Dv, device=q.device, dtype=q.dtype)
        rem = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        if mistake == 3:  # the logits in PyTorch: a T x T tensor
            _ = q @ k.transpose(-1, -2)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        sb_forward_kernel[(B * H, triton.cdiv(T, block_m))](
            q, k, v, o, rem, T, D ** -0.5, D=D, DV=Dv, ATTEND_CURRENT=attend_current, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
            MISTAKE=mistake)
        return o, rem
    return sb_forward


def stub(*args, **kwargs):
    raise NotImplementedError("sb_forward: not written yet (see the task above)")


def failure(check, fn, **kwargs):
    with pytest.raises(AssertionError) as info:
        check(fn, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("check, fn", [(check_log_sigmoids_triton, launcher(0)), (check_sb_forward, forward()),
                                       (check_sb_forward_memory, forward())])
def test_the_solution_passes_quietly(check, fn, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check(fn) is None
    out, err = capfd.readouterr()
    assert out.startswith(f"{check.__name__}: passed") and out.count("\n") == 1, out
    caught = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert err == "" and not caught, (err, [str(w.message) for w in caught])


@pytest.mark.parametrize("check", [check_log_sigmoids_triton, check_sb_forward, check_sb_forward_memory])
def test_a_stub_is_not_attempted(check, capfd):
    message = failure(check, stub)
    assert "not attempted yet" in message and check.__name__ in message and "`sb_forward`" in message
    assert capfd.readouterr().err == ""


def test_a_stub_inside_a_kernel_is_not_attempted_and_names_the_helper(capfd):
    message = failure(check_log_sigmoids_triton, launcher(3))
    assert "not attempted yet" in message and "`log_sigmoids`" in message
    assert capfd.readouterr().err == ""


def test_naive_log1p_fails_with_the_stable_form_in_the_hint():
    message = failure(check_log_sigmoids_triton, launcher(1))
    for part in ("log(1 - beta)", "regime='long'", "largest relative error of one entry", "index [",
                 "log(u) * e / (u - 1)"):
        assert part in message, (part, message)


def test_log_of_sigmoid_fails():
    message = failure(check_log_sigmoids_triton, launcher(2))
    assert "log(beta)" in message and "never log(sigmoid(z))" in message


def test_ignoring_attend_current_is_named():
    message = failure(check_sb_forward, forward(mistake=1))
    for part in ("attend_current=True", "your o is the one for attend_current=False", "regime='random'",
                 "relative error", "worst entry at index"):
        assert part in message, (part, message)


def test_masking_only_the_same_index_tile_fails_on_mixed_blocks():
    message = failure(check_sb_forward, forward(mistake=2))
    assert "block_m=32, block_n=16" in message and "not only the one with the same index" in message


def test_memory_check_catches_logits_in_pytorch():
    message = failure(check_sb_forward_memory, forward(mistake=3))
    T = 2048 if torch.cuda.is_available() else 256
    assert "T * T" in message and f"(1, {T}, {T})" in message and "never in a PyTorch tensor" in message


def test_memory_check_needs_a_correct_result():
    def zeros(q, k, v, attend_current=False, block_m=16, block_n=16):
        return torch.zeros_like(v), torch.ones(q.shape[:-1])

    assert "correct result first" in failure(check_sb_forward_memory, zeros)


def test_wrong_dtype_arity_and_shape_are_reported():
    def float64_rem(q, k, v, attend_current=False, block_m=16, block_n=16):
        o, rem = forward()(q, k, v, attend_current, block_m, block_n)
        return o, rem.double()

    assert "rem is float64, expected float32" in failure(check_sb_forward, float64_rem)
    assert "should return 2 values (o, rem)" in failure(
        check_sb_forward, lambda q, k, v, attend_current=False, block_m=16, block_n=16: forward()(q, k, v)[0])
    assert "has shape" in failure(
        check_sb_forward, lambda q, k, v, attend_current=False, block_m=16, block_n=16:
        (forward()(q, k, v, attend_current, block_m, block_n)[0], torch.ones(1)))


def test_learner_stderr_is_silenced_and_hidden_variants_change_the_cases(capfd):
    def noisy(q, k, v, attend_current=False, block_m=16, block_n=16):
        print("debugging", file=sys.stderr)
        warnings.warn("careful")
        return forward()(q, k, v, attend_current, block_m, block_n)

    check_sb_forward(noisy, seed=3, cases=((1, 1, 9, 40, 12, 16, 32),), regimes=("long",))
    out, err = capfd.readouterr()
    assert err == "" and "(1, 1, 9, 40, 12, 16, 32)" in out and "regimes long" in out
    check_log_sigmoids_triton(launcher(0), seed=5, T=7)
    check_sb_forward_memory(forward(), T=192, block=32, seed=2)
    out, err = capfd.readouterr()
    assert err == "" and "T = 192" in out


def test_a_wrapped_not_implemented_error_without_the_stub_words_is_a_real_error():
    def unsupported(z):  # what a kernel calling libdevice gives under the interpreter, say
        raise RuntimeError("the kernel failed") from NotImplementedError("not supported in the interpreter")

    message = failure(check_log_sigmoids_triton, unsupported)
    assert "not attempted" not in message and "raised RuntimeError: the kernel failed" in message
