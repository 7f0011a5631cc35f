"""The checks of lesson 05 (sb_ref.testing.lessons.lesson05): the reference kernels pass with a one-line verdict, the
typical mistakes of a first Triton kernel fail with a message that names the case, the error and a hint (masks, strides,
TF32, the triangle's direction, the carry), stubs are "not attempted yet", and nothing reaches stderr.

Triton runs through its interpreter without a GPU (set before triton is imported); sizes stay small."""
import os
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sb_ref.testing.lessons import lesson05  # noqa: E402

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _scaled_copy_kernel(x_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, alpha * x, mask=mask)


def scaled_copy(x, alpha, BLOCK=128):
    out = torch.empty_like(x)
    n = x.numel()
    _scaled_copy_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, alpha, BLOCK=BLOCK)
    return out


def scaled_copy_floor_grid(x, alpha, BLOCK=128):  # n // BLOCK programs: the short last block is never written
    out = torch.zeros_like(x)
    n = x.numel()
    _scaled_copy_kernel[(n // BLOCK,)](x, out, n, alpha, BLOCK=BLOCK)
    return out


@triton.jit
def _add_row_vector_kernel(x_ptr, b_ptr, out_ptr, M, N, s_xm, s_xn, s_om, s_on,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :] * s_xn, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=cols < N, other=0.0)
    tl.store(out_ptr + rows[:, None] * s_om + cols[None, :] * s_on, x + b[None, :], mask=mask)


def add_row_vector(x, b, BLOCK_M=32, BLOCK_N=32, contiguous_strides=False):
    M, N = x.shape
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    s_xm, s_xn = (N, 1) if contiguous_strides else x.stride()
    _add_row_vector_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        x, b, out, M, N, s_xm, s_xn, out.stride(0), out.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_TF32: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a = tl.load(a_ptr + rows[:, None] * s_am + ks[None, :] * s_ak, mask=(rows < M)[:, None] & (ks < K)[None, :],
                other=0.0)
    b = tl.load(b_ptr + ks[:, None] * s_bk + cols[None, :] * s_bn, mask=(ks < K)[:, None] & (cols < N)[None, :],
                other=0.0)
    if ROUND_TF32:  # what TF32 does to the inputs: 10 bits of mantissa
        a = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        b = (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    c = tl.dot(a, b, input_precision="ieee")
    tl.store(c_ptr + rows[:, None] * s_cm + cols[None, :] * s_cn, c, mask=(rows < M)[:, None] & (cols < N)[None, :])


def tile_matmul(a, b, BLOCK_M=32, BLOCK_N=32, round_tf32=False):
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    _matmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=max(16, triton.next_power_of_2(K)), ROUND_TF32=round_tf32)
    return c


@triton.jit
def _tile_cumsum_kernel(x_ptr, out_ptr, R, n, s_xr, s_xn, s_or, s_on, METHOD: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, MISTAKE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < R)[:, None] & (cols < n)[None, :]
    x = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :] * s_xn, mask=mask, other=0.0)
    if METHOD == "scan":
        if MISTAKE == "inclusive":
            out = tl.cumsum(x, axis=1, reverse=True)
        elif MISTAKE == "forward":
            out = tl.cumsum(x, axis=1) - x
        else:
            out = tl.cumsum(x, axis=1, reverse=True) - x
    else:
        if MISTAKE == "inclusive":
            tri = tl.where(cols[:, None] >= cols[None, :], 1.0, 0.0)
        elif MISTAKE == "forward":
            tri = tl.where(cols[:, None] < cols[None, :], 1.0, 0.0)
        else:
            tri = tl.where(cols[:, None] > cols[None, :], 1.0, 0.0)
        out = tl.dot(x, tri, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * s_or + cols[None, :] * s_on, out, mask=mask)


def tile_reverse_cumsum(x, method="scan", BLOCK_R=16, mistake=""):
    R, n = x.shape
    out = torch.empty((R, n), dtype=torch.float32, device=x.device)
    _tile_cumsum_kernel[(triton.cdiv(R, BLOCK_R),)](x, out, R, n, *x.stride(), *out.stride(), METHOD=method,
                                                      BLOCK_R=BLOCK_R, BLOCK_N=max(16, triton.next_power_of_2(n)),
                                                      MISTAKE=mistake)
    return out


@triton.jit
def _long_cumsum_kernel(x_ptr, out_ptr, R, n, s_xr, s_xn, s_or, s_on, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        CARRY: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    carry = tl.zeros([BLOCK_R, 1], dtype=tl.float32)
    n_blocks = tl.cdiv(n, BLOCK_N)
    for step in range(n_blocks):
        cols = (n_blocks - 1 - step) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < R)[:, None] & (cols < n)[None, :]
        x = tl.load(x_ptr + rows[:, None] * s_xr + cols[None, :] * s_xn, mask=mask, other=0.0)
        out = tl.cumsum(x, axis=1, reverse=True) - x + carry
        tl.store(out_ptr + rows[:, None] * s_or + cols[None, :] * s_on, out, mask=mask)
        if CARRY:
            carry += tl.sum(x, axis=1, keep_dims=True)


def long_reverse_cumsum(x, block=32, BLOCK_R=16, carry=True):
    R, n = x.shape
    out = torch.empty((R, n), dtype=torch.float32, device=x.device)
    _long_cumsum_kernel[(triton.cdiv(R, BLOCK_R),)](x, out, R, n, *x.stride(), *out.stride(), BLOCK_R=BLOCK_R,
                                                      BLOCK_N=block, CARRY=carry)
    return out


def whole_row_cumsum(x, block=32):  # right, but one tile per row: not the walk of the exercise
    return long_reverse_cumsum(x, block=max(16, triton.next_power_of_2(max(x.shape[1], 1))))


RIGHT = {
    "check_scaled_copy": scaled_copy,
    "check_add_row_vector": add_row_vector,
    "check_tile_matmul": tile_matmul,
    "check_tile_reverse_cumsum": tile_reverse_cumsum,
    "check_long_reverse_cumsum": long_reverse_cumsum,
}


def failure(name, fn, **kwargs):
    with pytest.raises(AssertionError) as info:
        getattr(lesson05, name)(fn, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------- tests


def test_every_check_is_exported():
    assert set(lesson05.__all__) == set(RIGHT)


@pytest.mark.parametrize("name, kwargs", [(name, {}) for name in sorted(RIGHT)]
                         + [("check_tile_reverse_cumsum", {"method": "matmul"})])
def test_right_answer_passes_quietly(name, kwargs, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = getattr(lesson05, name)(RIGHT[name], **kwargs)
    out, err = capfd.readouterr()
    assert result is None
    assert out.startswith(f"{name}: passed") and out.count("\n") == 1, out
    caught = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert err == "" and not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_stub_is_not_attempted(name, capfd):
    def stub(*args, **kwargs):
        raise NotImplementedError("my_launcher: not written yet (see the task above)")

    message = failure(name, stub)
    assert "not attempted yet" in message and name in message
    assert capfd.readouterr().err == ""


def test_a_kernel_that_still_raises_is_not_attempted(capfd):
    @triton.jit
    def stub_kernel(x_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        raise NotImplementedError("scaled_copy: not written yet (see the task above)")

    def written_launcher(x, alpha, BLOCK=128):
        out = torch.empty_like(x)
        stub_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), alpha, BLOCK=BLOCK)
        return out

    message = failure("check_scaled_copy", written_launcher)
    assert "not attempted yet" in message and "the kernel that `written_launcher` launches" in message
    assert capfd.readouterr().err == ""


def test_missing_last_block_names_the_size_and_the_grid():
    message = failure("check_scaled_copy", scaled_copy_floor_grid)
    for part in ("n=1000", "relative error", "tolerance", "index [", "first wrong entry is [896]", "triton.cdiv",
                 "mask"):
        assert part in message, (part, message)


def test_assumed_row_major_strides_fail_on_a_view_with_a_strides_hint():
    message = failure("check_add_row_vector", lambda x, b: add_row_vector(x, b, contiguous_strides=True))
    assert "layout=transposed" in message and "strides" in message and "x.stride(0)" in message


def test_tf32_products_fail_with_the_ieee_hint():
    message = failure("check_tile_matmul", lambda a, b: tile_matmul(a, b, round_tf32=True))
    assert "errors around 1e-3 are TF32's" in message and 'input_precision="ieee"' in message


@pytest.mark.parametrize("method", ["scan", "matmul"])
def test_inclusive_and_forward_sums_get_their_own_hints(method):
    inclusive = failure("check_tile_reverse_cumsum", lambda x, m: tile_reverse_cumsum(x, m, mistake="inclusive"),
                        method=method)
    assert "exclusive" in inclusive and f"method='{method}'" in inclusive
    assert ("subtract x" if method == "scan" else "k > j, not k >= j") in inclusive
    forward = failure("check_tile_reverse_cumsum", lambda x, m: tile_reverse_cumsum(x, m, mistake="forward"),
                      method=method)
    assert "LEFT (k < j)" in forward and ("reverse=True" if method == "scan" else "o[:, None] > o[None, :]") in forward


def test_walk_without_carry_fails_on_the_first_multi_block_row():
    message = failure("check_long_reverse_cumsum", lambda x, block: long_reverse_cumsum(x, block, carry=False))
    assert "x=(3, 100), block=32" in message and "carry" in message


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the loads are watched in the interpreter")
def test_walk_check_catches_a_whole_row_in_one_tile():
    message = failure("check_long_reverse_cumsum", whole_row_cumsum)
    assert "read 200 columns" in message and "block = 32" in message


def test_wrong_return_type_and_learner_errors_name_the_case():
    assert "should return a torch tensor" in failure("check_scaled_copy", lambda x, alpha: (alpha * x).tolist())

    def broken(x, b):
        raise IndexError("tuple index out of range")

    message = failure("check_add_row_vector", broken)
    assert "raised IndexError" in message and "case: x=(37, 50), layout=contiguous" in message


def test_learner_output_to_stderr_and_warnings_are_silenced(capfd):
    def noisy(x, alpha):
        print("debugging", file=sys.stderr)
        warnings.warn("careful")
        return scaled_copy(x, alpha)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lesson05.check_scaled_copy(noisy, sizes=(5, 130))
    caught = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert capfd.readouterr().err == "" and not caught


def test_hidden_variants_change_the_cases(capfd):
    lesson05.check_scaled_copy(scaled_copy, seed=5, sizes=(300, 3))
    assert "n in (300, 3)" in capfd.readouterr().out
    lesson05.check_long_reverse_cumsum(long_reverse_cumsum, seed=8, cases=((6, 300, 16),))
    assert "(6, 300, 16)" in capfd.readouterr().out
