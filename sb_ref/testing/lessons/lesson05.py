"""The checks of lesson 05 (Triton primer): one per graded exercise.

Every exercise is a ``@triton.jit`` kernel and a small Python launcher that takes and returns torch tensors; a
check takes the LAUNCHER, runs it on the cases that fit the exercise (lengths that are not block multiples, 0 and 1,
transposed and sliced views where the exercise is about strides) on the GPU when there is one and on the CPU
(Triton's interpreter) otherwise, and compares each result with a float64 torch reference. They follow
:mod:`sb_ref.testing.lessons.harness`: one verdict line, None returned, stderr quiet, ``AssertionError`` naming the
case, the worst error, where it is, and a hint (masks, strides, the triangle's direction, the carry). A launcher
that still raises ``NotImplementedError``, or whose kernel does, is "not attempted yet".
"""

import torch
import torch.nn.functional as F

from ..core import rel_err
from ..loads import watched_loads
from . import references
from .harness import TOLERANCE, call, compare, default_device, fmt_case, fmt_index, name_of, quietly, verdict

__all__ = ["check_scaled_copy", "check_add_row_vector", "check_tile_matmul", "check_tile_reverse_cumsum",
           "check_long_reverse_cumsum"]

_TOL = TOLERANCE.output[torch.float32]  # every exercise computes in float32


def _as_result(check, got, fn, case):
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{check}: `{name_of(fn)}` should return a torch tensor, got {type(got).__name__}\n"
                             f"  case: {case}\n  hint: allocate the output in the launcher (torch.empty(...)), "
                             "launch the kernel, then return the output.")
    return got


def _first_wrong(got, ref, tol=_TOL):
    """Index of the first entry (row-major) that is off by more than tol * (|ref| + 1), or None."""
    got = got.detach().to("cpu", torch.float64)
    if got.shape != ref.shape or ref.numel() == 0:
        return None
    bad = ~((got - ref).abs() <= tol * (ref.abs() + 1))
    if not bool(bad.any()):
        return None
    flat = int(bad.flatten().nonzero()[0])
    index, rest = [], flat
    for size in reversed(ref.shape):
        index.append(rest % size)
        rest //= size
    return tuple(reversed(index))


def _randn(shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _view(base_shape, layout, seed):
    """A float64 (CPU) tensor of shape ``base_shape`` in one of three layouts: its values and the float32 view on
    the device that the launcher gets (``contiguous``; ``transposed``: the .T of a contiguous tensor;
    ``sliced``: every other row and every third column of a larger one)."""
    M, N = base_shape
    device = default_device()
    if layout == "contiguous":
        x = _randn((M, N), seed).to(device, torch.float32)
    elif layout == "transposed":
        x = _randn((N, M), seed).to(device, torch.float32).T
    elif layout == "sliced":
        x = _randn((2 * M, 3 * N + 1), seed).to(device, torch.float32)[::2, 1::3]
    else:
        raise ValueError(layout)
    return x.detach().to("cpu", torch.float64), x


# --------------------------------------------------------------------------------------------------------------
# exercise 1: masked loads and stores

@quietly
def check_scaled_copy(scaled_copy, *, seed=0, sizes=(1000, 1, 0, 2, 127, 128, 129, 4099)):
    """``scaled_copy(x, alpha)`` -> ``alpha * x`` for a contiguous 1-D float32 tensor of any length."""
    check = "check_scaled_copy"
    for i, n in enumerate(sizes):
        alpha = float(_randn((1,), seed + 1000 + i)[0]) * 3
        x = _randn((n,), seed + n).to(default_device(), torch.float32)
        case = fmt_case(n=n, alpha=f"{alpha:.3f}", dtype=torch.float32)
        got = _as_result(check, call(check, scaled_copy, (x.clone(), alpha), {}, case), scaled_copy, case)
        ref = alpha * x.cpu().double()
        wrong = _first_wrong(got, ref)
        where = f"the first wrong entry is {fmt_index(wrong)} of n = {n}. " if wrong else ""
        hint = (where + "Launch triton.cdiv(n, BLOCK) programs (n // BLOCK drops the last, short block), give "
                "program pid the offsets pid * BLOCK + tl.arange(0, BLOCK), and mask the load and the store with "
                "offsets < n.")
        compare(check, got, ref, _TOL, case, hint)
    verdict(check, len(sizes), f"float32; n in {tuple(sizes)}")


# --------------------------------------------------------------------------------------------------------------
# exercise 2: 2-D tiles and strides

_ROW_VECTOR_SHAPES = ((37, 50), (1, 1), (70, 3), (3, 70), (64, 32), (0, 4))


@quietly
def check_add_row_vector(add_row_vector, *, seed=0, shapes=_ROW_VECTOR_SHAPES,
                         layouts=("contiguous", "transposed", "sliced")):
    """``add_row_vector(x, b)`` -> ``x + b[None, :]`` for a 2-D float32 ``x`` of any strides, ``b`` of shape (N,)."""
    check = "check_add_row_vector"
    n = 0
    for M, N in shapes:
        for layout in layouts:
            x_ref, x = _view((M, N), layout, seed + 7 * M + N)
            b_ref = _randn((N,), seed + 3 * N + 1)
            b = b_ref.to(default_device(), torch.float32)
            x_ref, b_ref = x_ref, b_ref.float().double()
            case = fmt_case(x=(M, N), layout=layout, strides=tuple(x.stride()))
            got = _as_result(check, call(check, add_row_vector, (x, b.clone()), {}, case), add_row_vector, case)
            ref = x_ref + b_ref[None, :]
            wrong = _first_wrong(got, ref)
            where = f"the first wrong entry is {fmt_index(wrong)}. " if wrong else ""
            if layout != "contiguous":
                hint = (where + f"x is a {layout} view with strides {tuple(x.stride())}: entry [i, j] lives at "
                        "x_ptr + i * x.stride(0) + j * x.stride(1). Pass both strides to the kernel; never assume "
                        "a row is N elements long.")
            else:
                hint = (where + "one program per (row block, column block): program_id(0) and program_id(1); "
                        "rows[:, None] and cols[None, :] make the tile's offsets; mask with "
                        "(rows < M)[:, None] & (cols < N)[None, :] when M or N is not a multiple of the block.")
            compare(check, got, ref, _TOL, case, hint)
            n += 1
    verdict(check, n, f"float32; shapes {tuple(shapes)}; layouts {', '.join(layouts)}")


# --------------------------------------------------------------------------------------------------------------
# exercise 3: tl.dot

_MATMUL_SHAPES = ((20, 24, 36), (1, 1, 1), (33, 16, 17), (16, 80, 48), (40, 7, 5))


@quietly
def check_tile_matmul(tile_matmul, *, seed=0, shapes=_MATMUL_SHAPES, layouts=("contiguous", "transposed", "sliced")):
    """``tile_matmul(a, b)`` -> ``a @ b`` in float32 for a (M, K), b (K, N), K small (one tile), any strides.

    ``shapes`` lists (M, K, N); each shape runs with a and b in each layout (a sliced a with a transposed b, and so
    on, in turn), to within 1e-5 of the float64 product.
    """
    check = "check_tile_matmul"
    n = 0
    for i, (M, K, N) in enumerate(shapes):
        for j, layout in enumerate(layouts):
            layout_b = layouts[(j + i + 1) % len(layouts)]
            a_ref, a = _view((M, K), layout, seed + M + 11 * K)
            b_ref, b = _view((K, N), layout_b, seed + 5 * N + K + 1)
            case = fmt_case(a=(M, K), b=(K, N), layouts=f"a {layout}, b {layout_b}")
            got = _as_result(check, call(check, tile_matmul, (a, b), {}, case), tile_matmul, case)
            ref = a_ref @ b_ref
            hint = ("one program per (BLOCK_M, BLOCK_N) tile of the output; load a [BLOCK_M, BLOCK_K] tile of a and "
                    "a [BLOCK_K, BLOCK_N] tile of b with each tensor's own strides and masks, other=0.0 (the padding "
                    "of K must add nothing), BLOCK_K = max(16, triton.next_power_of_2(K)); "
                    "tl.dot(a_tile, b_tile, input_precision=\"ieee\") (the default on a GPU is TF32, about 1e-3).")
            if tuple(got.shape) == tuple(ref.shape) and bool(torch.isfinite(got).all()) \
                    and 2e-5 < rel_err(got, ref) < 1e-2:
                hint = ("errors around 1e-3 are TF32's: pass input_precision=\"ieee\" to tl.dot for float32 "
                        "products exact to float32 rounding.")
            compare(check, got, ref, _TOL, case, hint)
            n += 1
    verdict(check, n, f"float32; (M, K, N) in {tuple(shapes)}; contiguous, transposed and sliced operands")


# --------------------------------------------------------------------------------------------------------------
# exercises 4 and 5: reverse exclusive cumsums

def _cumsum_inputs(kind, R, n, seed):
    """(R, n) float64 values: ``normal`` ~ N(0, 1), or ``log_keep``: log(1 - beta) = -softplus(z) of logits of
    magnitude up to ~50 (what the stick-breaking kernel sums: negative, from -50 to almost 0)."""
    z = _randn((R, n), seed)
    return z if kind == "normal" else -F.softplus(12 * z)


def _cumsum_hint(got, x, ref, method=None):
    """Names the likely mistake of a reverse exclusive cumsum."""
    got = got.detach().to("cpu", torch.float64)
    if got.shape != ref.shape or ref.numel() == 0:
        return "return a tensor of x's shape."
    inclusive = ref + x
    forward = torch.zeros_like(x)
    forward[..., 1:] = x.cumsum(-1)[..., :-1]
    close = lambda other: bool(torch.allclose(got, other, rtol=1e-4, atol=1e-4))  # noqa: E731
    if close(inclusive):
        return ("out[:, j] must leave x[:, j] out (exclusive): "
                + ("subtract x from the inclusive scan." if method == "scan" else
                   "the triangle holds 1 where k > j, not k >= j." if method == "matmul" else
                   "subtract the block's own x from its inclusive scan."))
    if close(forward) or close(forward + x):
        return ("you summed the keys to the LEFT (k < j); stick-breaking needs the nearer keys, to the right "
                "(k > j): " + ("tl.cumsum(x, axis=1, reverse=True)." if method == "scan" else
                               "TRI[k, j] = 1 where k > j, i.e. (o[:, None] > o[None, :]), and out = x @ TRI."
                               if method == "matmul" else "walk right to left."))
    if method == "matmul":
        return ("out = tl.dot(x, TRI, input_precision=\"ieee\") with TRI[k, j] = 1.0 where k > j (a [BLOCK_N, BLOCK_N] "
                "float32 tile built from tl.arange); load x with other=0.0 so the padding adds nothing.")
    if method == "scan":
        return ("out = tl.cumsum(x, axis=1, reverse=True) - x; load x with other=0.0 so the padding adds nothing, "
                "and mask rows and columns on the store.")
    return None


_TILE_SHAPES = ((5, 20), (1, 1), (37, 64), (16, 16), (3, 33), (20, 128))


@quietly
def check_tile_reverse_cumsum(tile_reverse_cumsum, *, method="scan", seed=0, shapes=_TILE_SHAPES):
    """``tile_reverse_cumsum(x, method)`` -> ``out[:, j] = sum_{k > j} x[:, k]`` for x (R, n), n <= 128 (one tile
    holds a row), with ``method`` "scan" (tl.cumsum) or "matmul" (tl.dot with a triangular 0/1 matrix)."""
    check = "check_tile_reverse_cumsum"
    if method not in ("scan", "matmul"):
        raise ValueError(f"method must be 'scan' or 'matmul', got {method!r}")
    n_cases = 0
    for R, n in shapes:
        for kind in ("normal", "log_keep"):
            x_ref = _cumsum_inputs(kind, R, n, seed + R * 131 + n).float().double()
            x = x_ref.to(default_device(), torch.float32)
            case = fmt_case(method=repr(method), x=(R, n), values=kind)
            got = _as_result(check, call(check, tile_reverse_cumsum, (x.clone(), method), {}, case),
                             tile_reverse_cumsum, case)
            ref = references.reverse_exclusive(x_ref)
            compare(check, got, ref, _TOL, case, _cumsum_hint(got, x_ref, ref, method))
            n_cases += 1
    verdict(check, n_cases, f"method={method!r}; float32; (rows, n) in {tuple(shapes)}")


_LONG_CASES = ((3, 100, 32), (1, 1, 16), (20, 64, 16), (5, 257, 64), (4, 33, 32), (2, 0, 16), (17, 1000, 128))


@quietly
def check_long_reverse_cumsum(long_reverse_cumsum, *, seed=0, cases=_LONG_CASES):
    """``long_reverse_cumsum(x, block)`` -> ``out[:, j] = sum_{k > j} x[:, k]`` for x (R, n) of any length n, walking
    blocks of ``block`` columns right to left with a carry. ``cases`` lists (R, n, block).

    Under the interpreter it also watches the loads: no single load may read more than ``block`` columns.
    """
    check = "check_long_reverse_cumsum"
    walk_hint = ("a program owns a block of rows and walks the column blocks from the last one back to 0: "
                 "out = (reverse exclusive scan inside the block) + carry, then carry += the block's row sums "
                 "(a [BLOCK_R, 1] column: tl.sum(x, axis=1, keep_dims=True)). "
                 "Mask the short last block (columns >= n) with other=0.0.")
    compile_hint = ("if the GPU compiler fails (\"PassManager::run failed\"), keep the carry as a [BLOCK_R, 1] "
                    "column: carry += tl.sum(x, axis=1, keep_dims=True).")
    n_cases = 0
    for i, (R, n, block) in enumerate(cases):
        for kind, layout in (("log_keep", "contiguous"), ("normal", "transposed" if i % 2 else "sliced")):
            x_ref, x = _view((R, n), layout, seed + 17 * R + n)
            if kind == "log_keep":
                x_ref = -F.softplus(12 * x_ref).float().double()
                x = x_ref.to(default_device(), torch.float32)
            case = fmt_case(x=(R, n), block=block, layout=layout, values=kind)
            got = _as_result(check, call(check, long_reverse_cumsum, (x, block), {}, case, compile_hint),
                             long_reverse_cumsum, case)
            ref = references.reverse_exclusive(x_ref)
            hint = _cumsum_hint(got, x_ref, ref) or walk_hint
            if layout != "contiguous":
                hint += f" Here x is a {layout} view (strides {tuple(x.stride())}): pass its strides."
            elif n % block:
                hint += f" Here n = {n} is not a multiple of block = {block}."
            compare(check, got, ref, _TOL, case, hint)
            n_cases += 1
    # the walk itself: a kernel that loads whole rows at once is not the exercise
    R, n, block = 4, 200, 32
    x = _cumsum_inputs("normal", R, n, seed).to(default_device(), torch.float32)
    case = fmt_case(x=(R, n), block=block, layout="contiguous", values="normal")
    got, count = call(check, watched_loads, (long_reverse_cumsum, (x, block)), {}, case,
                      label=name_of(long_reverse_cumsum))
    compare(check, got, references.reverse_exclusive(x.cpu().double()), _TOL, case, walk_hint)
    widest = None if count is None else count.widest
    if widest is not None and widest > block:
        raise AssertionError(
            f"{check}: one tl.load read {widest} columns of x for {case}; the walk loads at most block = {block} "
            f"columns at a time.\n  hint: the kernel must work for rows far longer than a tile: loop over column "
            "blocks from the last one back to 0 and carry the running sum, as lesson 06's key loop will.")
    note = "" if widest is None else f"; at most {widest} columns per load"
    verdict(check, n_cases + 1, f"float32; (rows, n, block) in {tuple(cases)}; contiguous, transposed and sliced"
            + note)
