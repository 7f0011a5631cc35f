"""sb_ref.distributed: one sequence split over 2, 3 and 4 CPU processes (gloo), against the single-process op.

One group of processes per world size runs every case of that size (spawning costs seconds, the cases
milliseconds); each rank reports what it measured, and each test asserts on every rank's report of its case."""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sb_ref
from sb_ref.distributed import context_parallel_attention, gather_sequence, shard_sequence

TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 3e-5), torch.bfloat16: (2.5e-3, 3e-3)}
REGIMES = ("random", "long", "saturated")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, case):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        report = _guarded(CASES[case], rank, world)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(report, f)


def _run(world, case, tmp_path, timeout=300):
    """Every rank's report of `case`; a group that does not finish within `timeout` seconds (a hang) fails."""
    context = mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), case), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks running {case!r} did not finish within {timeout} s")
    return [json.load(open(tmp_path / f"{r}.json")) for r in range(world)]


def _inputs(regime, T, dtype, seed, B=2, Hq=4, Hk=2, D=8, Dv=6):
    from test_kernels import make_inputs
    q, k, v, scale = make_inputs(regime, B, Hq, Hk, T, D, Dv, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, Hq, T, Dv, generator=g, dtype=torch.float64)
    drem = torch.randn(B, Hq, T, generator=g, dtype=torch.float64)
    return [x.detach().cpu() for x in (q, k, v)], scale, do, drem


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def _compare(layout, regime, T, dtype, attend_current, seed, block, backend="auto"):
    """Errors of the distributed op's o, rem and gradients against the single-process op in float64 on the same
    rounded inputs (the oracle is that op: 1e-12 from the float64 definition, tests/test_attention_torch.py)."""
    (q, k, v), scale, do, drem = _inputs(regime, T, dtype, seed)
    ref = [x.to(torch.float64, copy=True).requires_grad_() for x in (q, k, v)]
    o, rem = sb_ref.stick_breaking_attention(*ref, scale=scale, attend_current=attend_current,
                                             return_remainder=True, backend="torch")
    ((o * do).sum() + (rem * drem).sum()).backward()
    loc = [shard_sequence(x, layout=layout).requires_grad_() for x in (q, k, v)]
    o_l, rem_l = context_parallel_attention(*loc, layout=layout, scale=scale, attend_current=attend_current,
                                            return_remainder=True, block=block, backend=backend)
    assert o_l.dtype == q.dtype and rem_l.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ((o_l.double() * shard_sequence(do, layout=layout)).sum()
     + (rem_l.double() * shard_sequence(drem, layout=layout)).sum()).backward()
    errs = {"o": _rel(gather_sequence(o_l.detach(), layout=layout), o),
            "rem": _rel(gather_sequence(rem_l.detach(), layout=layout), rem)}
    for name, x, r in zip(("dq", "dk", "dv"), loc, ref):
        errs[name] = _rel(gather_sequence(x.grad, layout=layout), r.grad)
    return errs


def _case_exact(rank, world):
    """float64: both layouts, the three regimes, GQA, both attend_current settings, tiles smaller than a chunk."""
    out = []
    for layout in ("zigzag", "contiguous"):
        for i, regime in enumerate(REGIMES):
            T = 2 * world * (7 + i)  # chunks of 7 to 9 tokens: not multiples of the tile
            errs = _compare(layout, regime, T, torch.float64, (i + world) % 2 == 1, seed=10 * world + i, block=3)
            out.append({"layout": layout, "regime": regime, **errs})
    return out


def _case_low_precision(rank, world):
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("zigzag", "contiguous"):
            for i, regime in enumerate(REGIMES):
                errs = _compare(layout, regime, 2 * world * 24, dtype, i == 1, seed=i, block=16)
                out.append({"dtype": str(dtype), "layout": layout, "regime": regime, **errs})
    return out


def _case_triton(rank, world):
    """backend="triton" (Triton's interpreter on the CPU): each pair runs through the segment kernels, forward and
    backward (counted by wrappers; the PyTorch segment functions never run), within the bounds of its dtype."""
    import sb_ref.distributed as cp
    import sb_ref.kernels.segment as segment
    calls = {}

    def counted(module, name, key):
        real = getattr(module, name)
        calls[key] = 0
        setattr(module, name, lambda *a, **k: calls.update({key: calls[key] + 1}) or real(*a, **k))
    counted(segment, "segment_forward_triton", "kernel_fwd")
    counted(segment, "segment_backward_triton", "kernel_bwd")
    counted(cp, "segment_forward", "torch_fwd")
    counted(cp, "segment_backward", "torch_bwd")
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for layout, regime, attend_current in (("zigzag", "long", False), ("contiguous", "random", True)):
            errs = _compare(layout, regime, 2 * world * 20, dtype, attend_current, seed=4, block=8, backend="triton")
            out.append({"dtype": str(dtype), "layout": layout, "regime": regime, **errs})
    return {"rows": out, **calls}


def _case_early_exit(rank, world):
    """float32 where sticks are used up within a chunk: the farther chunks are skipped (counted by a wrapper of the
    chunk-against-chunk forward), and the results stay within the bounds; where sticks last nothing is skipped."""
    import sb_ref.distributed as cp
    calls = []
    real = cp.segment_forward
    cp.segment_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    out = {}
    for regime in ("saturated", "long"):
        for layout in ("zigzag", "contiguous"):
            counts = []
            for dtype in (torch.float64, torch.float32):  # float64 never stops early
                calls.clear()
                errs = _compare(layout, regime, 2 * world * 24, dtype, False, seed=5, block=8)
                counts.append(len(calls))
            out[f"{regime} {layout}"] = {"visits": counts, **errs}
    return out


def _case_deterministic(rank, world):
    (q, k, v), scale, do, _ = _inputs("random", 4 * world * 5, torch.float32, seed=3)
    runs = []
    for _ in range(2):
        loc = [shard_sequence(x).requires_grad_() for x in (q, k, v)]
        o = context_parallel_attention(*loc, block=4)
        (o * shard_sequence(do).float()).sum().backward()
        runs.append([o.detach()] + [x.grad for x in loc])
    return {"equal": all(torch.equal(a, b) for a, b in zip(*runs))}


def _case_errors(rank, world):
    """Inputs that do not fit: every rank gets the same ValueError, and nobody hangs."""
    def message(fn):
        try:
            fn()
        except ValueError as exc:
            return str(exc)
        return None

    x = torch.randn(1, 2, 2 * world * 3 + 1, 4)
    odd = torch.randn(1, 2, 5, 4)
    mine = torch.randn(1, 2, 4 if rank == 0 else 6, 4)
    return {"shard": message(lambda: shard_sequence(x)),
            "odd_zigzag": message(lambda: context_parallel_attention(odd, odd, odd)),
            "shapes_differ": message(lambda: context_parallel_attention(mine, mine, mine, layout="contiguous")),
            "layout": message(lambda: context_parallel_attention(odd, odd, odd, layout="ring")),
            "after": bool(torch.isfinite(context_parallel_attention(
                *(shard_sequence(torch.ones(1, 1, 4 * world, 2)),) * 3)).all())}


def _case_layer(rank, world):
    """StickBreakingSelfAttention with cp_group: the gathered output and the parameters' gradients summed over the
    ranks are the single-process layer's."""
    torch.manual_seed(0)
    layer = sb_ref.StickBreakingSelfAttention(16, 4, num_kv_heads=2, remainder="self").double()
    x = torch.randn(2, 4 * world * 3, 16, dtype=torch.float64)
    y = layer(x)
    y.square().sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    y_loc = layer(shard_sequence(x, dim=1), cp_group=dist.group.WORLD)
    y_loc.square().sum().backward()
    for p in layer.parameters():
        dist.all_reduce(p.grad)
    return {"y": _rel(gather_sequence(y_loc.detach(), dim=1), y),
            "grads": max(_rel(p.grad, w) for p, w in zip(layer.parameters(), want))}


# the cases each world size runs, in one spawn per world size
BY_WORLD = {2: ("exact", "low_precision", "errors", "layer", "triton"), 3: ("exact", "early_exit", "deterministic"),
            4: ("exact",)}


def _case_all(rank, world):
    return {case: _guarded(CASES[case], rank, world) for case in BY_WORLD[world]}


CASES = {name[len("_case_"):]: fn for name, fn in globals().items() if name.startswith("_case_")}


def _guarded(fn, rank, world):
    try:
        return fn(rank, world)
    except Exception as exc:  # reported, so that the test shows every rank's error
        return {"error": f"{type(exc).__name__}: {exc}"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{world: [each rank's {case: report}]} for 2, 3 and 4 ranks."""
    return {world: _run(world, "all", tmp_path_factory.mktemp(f"world{world}")) for world in BY_WORLD}


def _case_reports(reports, world, case):
    out = [by_case[case] for by_case in reports[world]]
    for rank, report in enumerate(out):
        assert not (isinstance(report, dict) and "error" in report), f"rank {rank}: {report['error']}"
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_float64_matches_the_single_process_op_forward_and_backward(reports, world):
    out_tol, grad_tol = TOL[torch.float64]
    for rank, report in enumerate(_case_reports(reports, world, "exact")):
        assert len(report) == 6
        for row in report:
            assert row["o"] <= out_tol and row["rem"] <= out_tol, (rank, row)
            assert max(row["dq"], row["dk"], row["dv"]) <= grad_tol, (rank, row)


def test_float32_and_bfloat16_stay_within_the_bounds(reports):
    for row in _case_reports(reports, 2, "low_precision")[0]:
        out_tol, grad_tol = TOL[getattr(torch, row["dtype"].split(".")[-1])]
        assert row["o"] <= out_tol and row["rem"] <= out_tol, row
        assert max(row["dq"], row["dk"], row["dv"]) <= grad_tol, row


def test_the_triton_path_runs_each_pair_through_the_segment_kernels(reports):
    for report in _case_reports(reports, 2, "triton"):
        assert report["kernel_fwd"] > 0 and report["kernel_bwd"] > 0, report
        assert report["torch_fwd"] == report["torch_bwd"] == 0, report
        assert len(report["rows"]) == 4
        for row in report["rows"]:
            out_tol, grad_tol = TOL[getattr(torch, row["dtype"].split(".")[-1])]
            assert row["o"] <= out_tol and row["rem"] <= out_tol, row
            assert max(row["dq"], row["dk"], row["dv"]) <= grad_tol, row


def test_used_up_sticks_stop_the_walk_over_earlier_chunks(reports):
    out_tol, grad_tol = TOL[torch.float32]
    skipped = 0
    for report in _case_reports(reports, 3, "early_exit"):
        for name, row in report.items():
            full, visited = row["visits"]
            assert row["o"] <= out_tol and row["rem"] <= out_tol, (name, row)
            assert max(row["dq"], row["dk"], row["dv"]) <= grad_tol, (name, row)
            if name.startswith("long"):
                assert visited == full, (name, row)
            skipped += full - visited
    assert skipped > 0


def test_the_distributed_backward_is_deterministic(reports):
    assert all(report["equal"] for report in _case_reports(reports, 3, "deterministic"))


def test_inputs_that_do_not_fit_raise_on_every_rank(reports):
    for report in _case_reports(reports, 2, "errors"):
        assert "split into 4 equal chunks" in report["shard"]
        assert "local length must be even" in report["odd_zigzag"]
        assert "same shapes" in report["shapes_differ"]
        assert "layout must be one of" in report["layout"]
        assert report["after"]  # the group still works after the errors


def test_the_layer_trains_with_its_sequence_split(reports):
    for report in _case_reports(reports, 2, "layer"):
        assert report["y"] <= 1e-12 and report["grads"] <= 1e-10, report


def test_without_a_process_group_the_error_says_what_to_do():
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    x = torch.randn(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(x, x, x)
