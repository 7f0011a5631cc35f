"""The Hopper dk/dv kernel (kernels/hopper_backward.py, Gluon): it compiles for sm_90 on any machine and keeps its
products asynchronous (the CPU suite), and on a Hopper GPU the op's backward with it (LaunchConfig(hopper_dkdv=True))
matches the float64 oracle in every regime within the `tl` kernels' bounds, deterministically (marked `gpu`)."""
import os
import subprocess
import sys

import pytest
import torch
import triton

from test_kernels import make_inputs, rel_err, run_and_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
gpu = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="this triton ships no ptxas")
def test_the_hopper_dkdv_kernel_compiles_for_sm90_with_asynchronous_products():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_report.py"), "--dims", "128,64",
                          "--kernels", "hopper_dkdv"], env=env, capture_output=True, text=True, timeout=600,
                         check=True).stdout
    header = next(line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| kernel"))
    rows = [dict(zip((h.strip() for h in header), (c.strip() for c in line.split("|")[1:-1])))
            for line in out.splitlines() if line.startswith("| hopper_dkdv")]
    rows = rows[:2]  # the first table's (the second budgets the hot loop)
    assert [row["D"] for row in rows] == ["128", "64"], out
    for row in rows:
        assert int(row["HGMMA"]) > 0 and int(row["HMMA"]) == 0 and row["wgmma serialized"] == "no", out
        # products stay in flight while the warpgroup works (wgmma.wait_group 1 or more)
        assert int(row["in-flight waits"]) > 0, out


def _config(**options):
    from sb_ref.kernels import LaunchConfig
    return LaunchConfig(hopper_dkdv=True, **options)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("regime", ["random", "long", "saturated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_dkdv_regimes(D, dtype, regime):
    for T, attend_current in ((1, True), (100, False), (1024, True), (2048, False)):
        q, k, v, scale = make_inputs(regime, 1, 2, 2, T, D, D, dtype, seed=T + D)
        run_and_check(q, k, v, scale, attend_current, label=f"T={T} D={D} {dtype} {regime}", config=_config())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("early_exit", [True, False])
@pytest.mark.parametrize("attend_current", [False, True])
def test_hopper_dkdv_gqa_odd_lengths_and_strides(attend_current, early_exit):
    config = _config(early_exit=early_exit)
    for T in (63, 65, 333, 2049):
        for regime in ("random", "long"):
            q, k, v, scale = make_inputs(regime, 2, 4, 2, T, 128, 128, torch.bfloat16, seed=T)
            run_and_check(q, k, v, scale, attend_current, label=f"GQA T={T} {regime}", config=config)
    # (B, T, H, D) storage seen as (B, H, T, D): strides that are not contiguous
    q, k, v, scale = make_inputs("long", 2, 4, 4, 777, 64, 64, torch.bfloat16, seed=7)
    q, k, v = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    run_and_check(q, k, v, scale, attend_current, label="strided", config=config)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("launch", [{}, {"early_next": True}, {"maxnreg": 232}])
def test_hopper_dkdv_is_deterministic_and_agrees_with_the_tl_kernel(launch):
    from sb_ref.kernels import LaunchConfig, op, operands
    from sb_ref.kernels.config import Problem
    from sb_ref.kernels.hopper_backward import hopper_dkdv
    for regime in ("random", "long"):
        q, k, v, scale = make_inputs(regime, 2, 4, 2, 2048, 128, 128, torch.bfloat16, seed=3)
        q, k, v = (x.detach() for x in (q, k, v))
        p = Problem.of(q, k, v, None, q.shape[2], LaunchConfig())
        o, rem, lo = op.forward(p, q, k, v, scale, False)
        do, drem = torch.randn_like(o), torch.randn_like(rem)
        ops = operands.backward_operands(scale, p.DV, do, drem * rem, q, k, v)
        _, delta_g, tw, tr, chunk = op.backward_dq(p, ops, drem, rem, scale, False)
        tile = p.tile("dkdv")
        mb_stop = op.exit_bounds(lo, p.cu, 1, False, tile.block_m, tile.block_n) if p.walks_can_stop(lo) else None
        tl_dk, tl_dv = op.backward_dkdv(p, ops, lo if mb_stop is not None else None, delta_g, tw.clone(), tr.clone(),
                                        chunk, scale, False)
        first, again = (hopper_dkdv(p, ops, mb_stop, delta_g, tw.clone(), tr.clone(), chunk, scale, False, **launch)
                        for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(first, again)), f"{regime} {launch}: not deterministic"
        assert rel_err(first[0].float(), tl_dk.float()) < 2e-3 and rel_err(first[1].float(), tl_dv.float()) < 2e-3
