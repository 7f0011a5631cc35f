"""The Triton kernels compiled on a CUDA GPU: every regime against the float64 oracle at T up to 4096,
determinism, varlen with many short sequences, GQA, torch.compile, and no T*T allocation at T = 8192.

Every test is marked `gpu` (skipped without CUDA). Set SB_GPU_RESULTS=path.json to keep every measured error.
"""
import json
import os

import pytest
import torch

from reference import attention, rel_err
from test_kernels import TOL, _LargestAllocation, make_inputs, run_and_check
from sb_ref.kernels import stick_breaking_attention_triton

pytestmark = pytest.mark.gpu


class _Results(list):
    """Every measured error, written out after each entry when SB_GPU_RESULTS names a file (one file per worker
    under pytest-xdist: path_gw0.json, ...)."""

    def append(self, item):
        super().append(item)
        path = os.environ.get("SB_GPU_RESULTS")
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if path and worker:
            path = f"{os.path.splitext(path)[0]}_{worker}.json"
        if path:
            with open(path, "w") as f:
                json.dump(self, f, indent=1)


RESULTS = _Results()


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize("regime", ["random", "long", "saturated"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [1, 100, 1024, 4096])
def test_regimes_gpu(T, D, dtype, regime):
    attend_current = T in (100, 4096)  # both settings at both a short and a long length
    q, k, v, scale = make_inputs(regime, 1, 2, 1, T, D, D, DTYPES[dtype], seed=T + D)
    label = f"T={T} D={D} {dtype} {regime} attend_current={attend_current}"
    try:
        errs = run_and_check(q, k, v, scale, attend_current, label=label)
    except AssertionError as e:
        RESULTS.append({"test": "regimes", "T": T, "D": D, "dtype": dtype, "regime": regime, "failed": str(e)})
        raise
    RESULTS.append({"test": "regimes", "T": T, "D": D, "dtype": dtype, "regime": regime, **errs})


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_head_dim_padding_gpu(dtype):
    # non-powers of two, Dv != D, and the widest head
    for D, Dv in ((48, 80), (96, 96), (256, 256), (80, 32)):
        q, k, v, scale = make_inputs("random", 1, 2, 1, 333, D, Dv, DTYPES[dtype], seed=D)
        errs = run_and_check(q, k, v, scale, False, label=f"D={D} Dv={Dv} {dtype}")
        RESULTS.append({"test": "head_dims", "D": D, "Dv": Dv, "dtype": dtype, **errs})


def test_deterministic_gpu():
    q, k, v, scale = make_inputs("random", 2, 8, 2, 4096, 128, 128, torch.bfloat16, seed=1)
    outs = []
    for _ in range(3):
        q.grad = k.grad = v.grad = None
        o, rem = stick_breaking_attention_triton(q, k, v, scale, False)
        g = torch.Generator(device="cuda").manual_seed(2)
        go = torch.randn(o.shape, generator=g, device="cuda").to(o.dtype)
        ((o * go).sum() + rem.sum()).backward()
        outs.append([o.detach().clone(), rem.detach().clone()] + [x.grad.clone() for x in (q, k, v)])
    for run in outs[1:]:
        for a, b in zip(outs[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_varlen_many_short_gpu(dtype):
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 40, (300,), generator=g)
    lens[::37] = 0
    lens[5] = 1
    lens[7] = 700
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).cuda()
    T = int(lens.sum())
    q, k, v, scale = make_inputs("random", 1, 4, 2, T, 64, 64, DTYPES[dtype], seed=4)
    for attend_current in (False, True):
        errs = run_and_check(q, k, v, scale, attend_current, cu_seqlens=cu, label=f"varlen {dtype}")
        RESULTS.append({"test": "varlen", "T": T, "n_seq": 300, "dtype": dtype, **errs})


@pytest.mark.parametrize("regime,dtype,varlen", [("random", "bf16", False), ("random", "bf16", True),
                                                 ("long", "bf16", False), ("saturated", "fp32", False)])
def test_early_exit_is_exact_gpu(regime, dtype, varlen):
    """Compiled, with the GPU's segment lengths: o, rem, dq, dk, dv bit-identical with and without early exit."""
    from sb_ref.kernels import LaunchConfig
    from test_kernels import _outputs_and_grads

    T = 4096
    q, k, v, scale = make_inputs(regime, 1, 4, 2, T, 128, 128, DTYPES[dtype], seed=8)
    cu = torch.tensor([0, 1000, 1001, 3500, T], dtype=torch.int32, device="cuda") if varlen else None
    results = {}
    for on in (False, True):
        config = LaunchConfig(early_exit=on, early_exit_varlen=on)
        results[on] = _outputs_and_grads(q, k, v, scale, regime == "saturated", cu, config)
    for name, a, b in zip(("o", "rem", "dq", "dk", "dv"), results[False], results[True]):
        assert torch.equal(a, b), f"{name} changed with early exit: largest difference {(a - b).abs().max():.2e}"


def test_gqa_gpu():
    q, k, v, scale = make_inputs("long", 2, 8, 2, 1024, 128, 64, torch.bfloat16, seed=5)
    errs = run_and_check(q, k, v, scale, True, label="gqa")
    RESULTS.append({"test": "gqa", "T": 1024, "Hq": 8, "Hk": 2, "dtype": "bf16", **errs})


def test_nan_in_nan_out_gpu():
    # long enough that every later row's stick is used up far before key 100: NaN reaches them all the same
    q, k, v, scale = make_inputs("random", 1, 1, 1, 3000, 64, 64, torch.bfloat16, seed=6)
    with torch.no_grad():
        k[0, 0, 100, 5] = float("nan")
    o, rem = stick_breaking_attention_triton(q, k, v, scale, False)
    assert torch.isnan(o[0, 0, 101:]).all() and torch.isfinite(o[0, 0, :101]).all()


def test_public_api_on_cuda():
    import sb_ref

    q, k, v, scale = make_inputs("random", 1, 2, 1, 200, 64, 64, torch.bfloat16, seed=7)
    o, rem = sb_ref.stick_breaking_attention(q, k, v, return_remainder=True)
    ro, rr = attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu())
    assert rel_err(o.cpu(), ro) < TOL[torch.bfloat16][0] and rel_err(rem.cpu(), rr) < TOL[torch.bfloat16][0]


class _TinyModel(torch.nn.Module):
    def __init__(self, E=128, H=4, Hk=2):
        super().__init__()
        self.H, self.Hk, self.Dh = H, Hk, E // H
        self.q = torch.nn.Linear(E, E)
        self.kv = torch.nn.Linear(E, 2 * Hk * self.Dh)
        self.out = torch.nn.Linear(E, E)

    def forward(self, x):
        B, T, E = x.shape
        q = self.q(x).view(B, T, self.H, self.Dh).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.Hk, self.Dh).permute(2, 0, 3, 1, 4)
        o, rem = stick_breaking_attention_triton(q, k, v, self.Dh ** -0.5, False)
        o = o + rem.unsqueeze(-1).to(o.dtype) * v.repeat_interleave(self.H // self.Hk, 1)
        return self.out(o.transpose(1, 2).reshape(B, T, E))


def test_torch_compile_gpu():
    torch.manual_seed(8)
    model = _TinyModel().cuda().to(torch.bfloat16)
    x = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    eager = model(x)
    eager.float().square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.float().square().mean().backward()
    assert rel_err(y, eager) < 1e-2
    for p, g in zip(model.parameters(), grads):
        assert rel_err(p.grad, g) < 1e-2


def test_no_T_by_T_allocation_gpu():
    T = 8192
    q, k, v, scale = make_inputs("random", 1, 2, 1, T, 64, 64, torch.bfloat16, seed=9)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with _LargestAllocation() as probe:
        o, rem = stick_breaking_attention_triton(q, k, v, scale, False)
        ((o.float() * 1.5).sum() + rem.sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert probe.largest < T * T // 8, f"largest tensor has {probe.largest} elements (T*T = {T * T})"
    # every extra byte together stays far below one T*T float32 matrix per head
    assert peak < 2 * T * T, f"peak extra memory {peak} bytes"
    RESULTS.append({"test": "no_TxT", "T": T, "largest_elements": probe.largest, "peak_extra_bytes": peak})
