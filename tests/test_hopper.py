"""The Hopper forward (kernels/hopper_forward.py, Gluon): it compiles for sm_90 on any machine and keeps its products
asynchronous (the CPU suite, as test_compile_report does for the `tl` kernels), and on a Hopper GPU it matches the
float64 oracle in every regime within the `tl` kernels' bounds (marked `gpu`)."""
import os
import subprocess
import sys

import pytest
import torch
import triton

from reference import attention
from test_kernels import TOL, make_inputs, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="this triton ships no ptxas")
def test_the_hopper_forward_compiles_for_sm90_with_asynchronous_products():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_report.py"), "--dims", "128,64",
                          "--kernels", "hopper_fwd,hopper_fwd_ws"], env=env, capture_output=True, text=True, timeout=600,
                         check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| hopper_fwd")]
    header = next(line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| kernel"))
    rows = [dict(zip((h.strip() for h in header), (c.strip() for c in row))) for row in rows]
    rows = [row for row in rows if "D" in row][:4]
    assert [(row["kernel"], row["D"]) for row in rows] == [("hopper_fwd", "128"), ("hopper_fwd_ws", "128"),
                                                            ("hopper_fwd", "64"), ("hopper_fwd_ws", "64")], out
    for row in rows:
        assert int(row["HGMMA"]) > 0 and int(row["HMMA"]) == 0, out
        assert row["spill bytes"] == "0" and row["wgmma serialized"] == "no", out
        # some product is still in flight when the warpgroup waits (wgmma.wait_group 1): the overlap is kept
        assert int(row["in-flight waits"]) > 0, out


def _forward(q, k, v, scale, attend_current, producer=False, **launch):
    from sb_ref.kernels.hopper_forward import hopper_forward
    from sb_ref.kernels.hopper_forward_ws import hopper_forward_ws
    forward = hopper_forward_ws if producer else hopper_forward
    return forward(q.detach(), k.detach(), v.detach(), scale, attend_current, **launch)


def _check(q, k, v, scale, attend_current, label, **launch):
    o, rem = _forward(q, k, v, scale, attend_current, **launch)
    ro, rr = attention(*(x.detach().cpu().double() for x in (q, k, v)), scale, attend_current, None)
    errs = {"o": rel_err(o.cpu(), ro), "rem": rel_err(rem.cpu(), rr)}
    tol = TOL[q.dtype][0]
    assert o.dtype == q.dtype and rem.dtype == torch.float32, label
    assert all(err <= tol for err in errs.values()), f"{label}: {errs} > {tol}"
    return errs


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("regime", ["random", "long", "saturated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [1, 100, 1024, 4096])
def test_hopper_forward_regimes(T, D, dtype, regime):
    q, k, v, scale = make_inputs(regime, 1, 2, 2, T, D, D, dtype, seed=T + D)
    _check(q, k, v, scale, T in (100, 4096), f"T={T} D={D} {dtype} {regime}")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("launch", [{}, {"a_in_registers": True, "maxnreg": 168}, {"overlap": False}])
@pytest.mark.parametrize("attend_current", [False, True])
def test_hopper_forward_gqa_strides_and_odd_lengths(attend_current, launch):
    for T in (63, 65, 333, 2049):
        for regime in ("random", "long"):
            q, k, v, scale = make_inputs(regime, 2, 4, 2, T, 128, 128, torch.bfloat16, seed=T)
            _check(q, k, v, scale, attend_current, f"GQA T={T} {regime} {launch}", **launch)
    # (B, T, H, D) storage seen as (B, H, T, D): strides that are not contiguous
    q, k, v, scale = make_inputs("long", 2, 4, 4, 777, 64, 64, torch.bfloat16, seed=7)
    q, k, v = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    _check(q, k, v, scale, attend_current, f"strided {launch}", **launch)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_hopper_forward_is_deterministic_and_agrees_with_the_tl_forward():
    from sb_ref.kernels import LaunchConfig, stick_breaking_attention_triton
    q, k, v, scale = make_inputs("long", 2, 4, 4, 2048, 128, 128, torch.bfloat16, seed=3)
    first = _forward(q, k, v, scale, False)
    again = _forward(q, k, v, scale, False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    o, rem = stick_breaking_attention_triton(q.detach(), k.detach(), v.detach(), scale, False,
                                             config=LaunchConfig(early_exit=False))
    assert rel_err(first[0].float(), o.float()) < 2e-3 and rel_err(first[1], rem) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("maxnreg", [None, 168])
@pytest.mark.parametrize("regime", ["random", "long", "saturated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_hopper_forward_with_a_producer_warp(D, dtype, regime, maxnreg):
    for T, attend_current in ((32, False), (1024, True), (4096, False)):
        q, k, v, scale = make_inputs(regime, 1, 2, 2, T, D, D, dtype, seed=T + D)
        _check(q, k, v, scale, attend_current, f"producer T={T} D={D} {dtype} {regime}", producer=True,
               maxnreg=maxnreg)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_hopper_forward_with_a_producer_warp_gqa_strides_determinism():
    for attend_current in (False, True):
        q, k, v, scale = make_inputs("long", 2, 4, 2, 2048, 128, 128, torch.bfloat16, seed=5)
        _check(q, k, v, scale, attend_current, "producer GQA", producer=True)
    q, k, v, scale = make_inputs("random", 2, 4, 4, 768, 64, 64, torch.bfloat16, seed=7)
    q, k, v = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    _check(q, k, v, scale, False, "producer strided", producer=True)
    first, again = (_forward(q, k, v, scale, False, producer=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
