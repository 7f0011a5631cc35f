"""sb_ref.testing.traffic: the tiles a Triton kernel loads, read off the interpreter's loads, and their picture.

Small kernels of the lessons' shapes: a causal forward that starts at the diagonal (or sweeps every key block, or
forgets the diagonal block), with its program axes either way round; a key-major walk; lesson 05's column walk and a
kernel that loads whole rows. The tile grids they give are compared with what each kernel does by construction."""
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sb_ref.testing import make_inputs  # noqa: E402
from sb_ref.testing.traffic import (draw_tile_traffic, expected_tiles, summary, tile_traffic,  # noqa: E402
                                    traffic_figure)

INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="watches the interpreter's loads")

FAST, SWEEP, NO_DIAGONAL = 0, 1, 2


@triton.jit
def _walk_keys(Q, K, O, T, D, WALK: tl.constexpr, HEAD_FIRST: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = the sum of the key rows the program visits (so the result says which it visited, too)."""
    if HEAD_FIRST:
        bh, pid_m = tl.program_id(0), tl.program_id(1)
    else:
        pid_m, bh = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + bh * T * D + rows[:, None] * D + d[None, :], mask=(rows[:, None] < T) & (d[None, :] < D),
                other=0.0)
    acc = q * 0.0
    if WALK == 0:
        n_blocks = tl.cdiv(tl.minimum((pid_m + 1) * BLOCK_M, T), BLOCK_N)
    elif WALK == 1:
        n_blocks = tl.cdiv(T, BLOCK_N)
    else:
        n_blocks = (pid_m * BLOCK_M) // BLOCK_N   # stops before the diagonal block
    for i in range(n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(K + bh * T * D + cols[:, None] * D + d[None, :], mask=(cols[:, None] < T) & (d[None, :] < D),
                    other=0.0)
        acc += tl.sum(k, axis=0)[None, :]
    tl.store(O + bh * T * D + rows[:, None] * D + d[None, :], acc, mask=(rows[:, None] < T) & (d[None, :] < D))


def forward(walk=FAST, head_first=False, block_m=16, block_n=16):
    def fn(q, k):
        B, H, T, D = q.shape
        o = torch.empty_like(q)
        n = triton.cdiv(T, block_m)
        grid = (B * H, n) if head_first else (n, B * H)
        _walk_keys[grid](q, k, o, T, D, WALK=walk, HEAD_FIRST=head_first, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_D=triton.next_power_of_2(D))
        return o
    return fn


@triton.jit
def _walk_queries(Q, K, O, T, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Key-major, as lesson 07's dk/dv kernel: per key block, the query blocks from the diagonal to the end."""
    bh = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    n_key_blocks = tl.cdiv(T, BLOCK_N)
    for step in range(n_key_blocks):
        kb = n_key_blocks - 1 - step
        cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(K + bh * T * D + cols[:, None] * D + d[None, :], mask=(cols[:, None] < T) & (d[None, :] < D),
                    other=0.0)
        acc = k * 0.0
        for mb in range(kb * BLOCK_N // BLOCK_M, tl.cdiv(T, BLOCK_M)):
            rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            q = tl.load(Q + bh * T * D + rows[:, None] * D + d[None, :],
                        mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0)
            acc += tl.sum(q, axis=0)[None, :]
        tl.store(O + bh * T * D + cols[:, None] * D + d[None, :], acc, mask=(cols[:, None] < T) & (d[None, :] < D))


def key_major(q, k):
    B, H, T, D = q.shape
    o = torch.empty_like(k)
    _walk_queries[(B * H,)](q, k, o, T, D, BLOCK_M=16, BLOCK_N=16, BLOCK_D=triton.next_power_of_2(D))
    return o


@triton.jit
def _columns(X, OUT, R, n, s_r, s_n, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Lesson 05's walk: row sums of x, column blocks right to left."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    n_blocks = tl.cdiv(n, BLOCK_N)
    for step in range(n_blocks):
        cols = (n_blocks - 1 - step) * BLOCK_N + tl.arange(0, BLOCK_N)
        x = tl.load(X + rows[:, None] * s_r + cols[None, :] * s_n, mask=(rows < R)[:, None] & (cols < n)[None, :],
                    other=0.0)
        acc += tl.sum(x, axis=1)
    tl.store(OUT + rows, acc, mask=rows < R)


def row_sums(x, block=32, whole_rows=False):
    R, n = x.shape
    out = torch.empty(R)
    width = triton.next_power_of_2(n) if whole_rows else block
    _columns[(triton.cdiv(R, 16),)](x, out, R, n, x.stride(0), x.stride(1), BLOCK_R=16, BLOCK_N=width)
    return out


def inputs(T=61, D=24, H=2):
    return make_inputs("random", B=1, Hq=H, T=T, D=D, seed=3)[:2]


# ------------------------------------------------------------------------------------------------ expected tiles

def test_expected_tiles_causal_anticausal_and_all():
    # T = 44, 16 x 8 tiles: query block 0 (queries 0-15) needs key tiles 0-1, block 1 (16-31) 0-3, block 2 (32-43) 0-5
    assert expected_tiles("causal", 44, 44, 16, 8).sum(1).tolist() == [2, 4, 6]
    # T = 45 in 16 x 16 tiles, key-major: key block r needs the query blocks r, r + 1, ..., 2
    assert expected_tiles("anticausal", 45, 45, 16, 16).tolist() == [[True, True, True], [False, True, True],
                                                                      [False, False, True]]
    assert expected_tiles("all", 40, 200, 16, 32).shape == (3, 7) and expected_tiles("all", 40, 200, 16, 32).all()
    # a last query block holding only query 48 still walks its diagonal tile (the one holding key 48)
    assert expected_tiles("causal", 49, 49, 16, 16)[3].tolist() == [True, True, True, True]


@pytest.mark.parametrize("bad, error", [(dict(pattern="diagonal"), "pattern must be one of"),
                                        (dict(row_block=0), "row_block must be a positive int"),
                                        (dict(col_block=2.0), "col_block must be a positive int"),
                                        (dict(n_rows=-1), "n_rows must be an int >= 0")])
def test_expected_tiles_refuses_bad_arguments(bad, error):
    kwargs = dict(pattern="causal", n_rows=10, n_cols=10, row_block=4, col_block=4) | bad
    with pytest.raises(ValueError, match=error):
        expected_tiles(**kwargs)


# ------------------------------------------------------------------------------------------------ recorded tiles

@INTERPRETED
def test_a_diagonal_start_loads_the_causal_tiles_once_from_the_diagonal():
    q, k = inputs()
    o, traffic = tile_traffic(forward(FAST), (q, k))
    assert (traffic.row_block, traffic.col_block) == (16, 16)  # read off the loads
    needed = expected_tiles("causal", 61, 61, 16, 16)
    assert np.array_equal(traffic.visits, needed.astype(int))  # head 0 only: one visit per tile, not two
    assert traffic.order[(3, 3)] == [1] and traffic.order[(3, 0)] == [4]  # right to left
    # each key tile of 16 rows x 24 columns, the last one 13 rows; D = 24 padded to 32 masks a quarter of the lanes
    assert traffic.elements[3].tolist() == [16 * 24] * 3 + [13 * 24]
    assert traffic.masked_share()[3, 0] == pytest.approx(0.25)
    assert traffic.masked_share()[3, 3] == pytest.approx(1 - 13 * 24 / (16 * 32))
    assert torch.allclose(o, forward(FAST)(q, k))  # the watched run is the run
    line = summary("fast", traffic)
    assert "10 of 16 tiles loaded, 6 skipped, 0 wasted" in line and "0 needed but never loaded" in line


@INTERPRETED
def test_a_sweep_shows_the_tiles_above_the_diagonal_as_wasted_and_a_short_walk_as_missed():
    q, k = inputs()
    _, sweep = tile_traffic(forward(SWEEP), (q, k))
    assert sweep.visits.min() == 1 and "6 wasted (nothing needed there)" in summary("sweep", sweep)
    _, short = tile_traffic(forward(NO_DIAGONAL), (q, k))
    assert short.visits.trace() == 0 and "4 needed but never loaded" in summary("short", short)


@INTERPRETED
def test_the_rows_follow_the_query_tile_whichever_grid_axis_holds_it():
    q, k = inputs(T=44, D=16)
    _, m_first = tile_traffic(forward(FAST), (q, k))
    _, h_first = tile_traffic(forward(FAST, head_first=True, block_n=8), (q, k))
    assert h_first.col_block == 8 and np.array_equal(h_first.visits, expected_tiles("causal", 44, 44, 16, 8))
    _, h_first16 = tile_traffic(forward(FAST, head_first=True), (q, k))
    assert np.array_equal(m_first.visits, h_first16.visits) and m_first.order == h_first16.order


@INTERPRETED
def test_a_key_major_walk_fills_the_anticausal_tiles():
    q, k = inputs(T=45, D=16)
    _, traffic = tile_traffic(key_major, (q, k), walks=0, holds=1)
    assert np.array_equal(traffic.visits, expected_tiles("anticausal", 45, 45, 16, 16))
    assert traffic.order[(0, 0)] == [1] and traffic.order[(0, 2)] == [3]  # from the diagonal outward
    assert traffic.unplaced == 0


@INTERPRETED
def test_a_column_walk_against_a_whole_row_load():
    x = torch.randn(40, 200)
    _, walk = tile_traffic(row_sums, (x, 32), walks=0, holds=None)
    assert walk.shape == (3, 7) and (walk.visits == 1).all() and walk.widest == 32
    assert [walk.order[(0, c)] for c in range(7)] == [[7], [6], [5], [4], [3], [2], [1]]
    _, whole = tile_traffic(lambda x, block: row_sums(x, block, whole_rows=True), (x, 32), walks=0, holds=None,
                            col_block=32)
    assert whole.widest == 200 and all(o == [1] for o in whole.order.values())  # one load read the whole row
    _, strided = tile_traffic(row_sums, (x.T.contiguous().T, 32), walks=0, holds=None)  # any strides
    assert np.array_equal(strided.visits, walk.visits) and np.array_equal(strided.elements, walk.elements)


def test_bad_arguments_are_named():
    q, k = inputs(T=16, D=16)
    with pytest.raises(ValueError, match="walks must be the index of one of the 2 arguments"):
        tile_traffic(forward(), (q, k), walks=2) if os.environ.get("TRITON_INTERPRET") == "1" else \
            draw_tile_traffic(forward(), (q, k), walks=2)
    with pytest.raises(TypeError, match="must be a tensor"):
        draw_tile_traffic(forward(), (q, 3), walks=1)
    with pytest.raises(TypeError, match="args must be a tuple"):
        draw_tile_traffic(forward(), q)
    with pytest.raises(TypeError, match="kernels must be a function or a dict"):
        draw_tile_traffic({"x": 3}, (q, k))
    with pytest.raises(ValueError, match="expected must be one of"):
        draw_tile_traffic(forward(), (q, k), expected="upper")


def test_without_the_interpreter_it_says_so_and_draws_what_right_looks_like(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k = inputs(T=16, D=16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tile_traffic(forward(), (q, k))
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))
    draw_tile_traffic(forward(), (q, k), row_block=16, col_block=16)
    assert "interpreter, which is off here" in capsys.readouterr().out
    assert len(shown[0].axes) == 1 and shown[0].axes[0].get_title().startswith("what right looks like")
    plt.close("all")


# ----------------------------------------------------------------------------------------------------- pictures

@INTERPRETED
def test_the_picture_has_a_panel_per_kernel_and_one_for_what_right_looks_like(monkeypatch, capsys):
    q, k = inputs()
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))

    def stub(q, k):
        raise NotImplementedError("fast_forward: not attempted yet")

    draw_tile_traffic({"sweep": forward(SWEEP), "yours": stub, "fast": forward(FAST)}, (q, k))
    out = capsys.readouterr().out
    assert "sweep: 16 of 16 tiles loaded" in out and "yours: not written yet" in out and "fast: 10 of 16" in out
    titles = [ax.get_title() for ax in shown[0].axes]
    assert titles[:3] == ["sweep\n(16 x 16 tiles)", "yours", "fast\n(16 x 16 tiles)"]
    assert titles[3].startswith("what right looks like:\nthe tiles at or below the diagonal")
    words = [t.get_text() for t in shown[0].axes[0].texts]
    assert sum("wasted" in w for w in words) == 6 and "4\n25%" in words  # query block 0's 4th visit: key block 0
    assert sum("skipped" in t.get_text() for t in shown[0].axes[2].texts) == 6
    plt.close("all")


@INTERPRETED
def test_traffic_figure_refuses_grids_that_do_not_match():
    q, k = inputs()
    _, a = tile_traffic(forward(FAST), (q, k))
    _, b = tile_traffic(forward(FAST, block_n=8), (q, k))
    with pytest.raises(ValueError, match="give every kernel the same inputs and tile sizes"):
        traffic_figure({"a": a, "b": b})
    with pytest.raises(ValueError, match="give grid="):
        traffic_figure({"stub": None})
    plt.close("all")
