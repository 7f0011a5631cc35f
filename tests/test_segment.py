"""The segment kernels (kernels/segment.py): queries against every key of an earlier segment, (o, S) and their
gradients, against the float64 PyTorch segment functions (sb_ref.blocked.segment_forward / segment_backward) on the
same rounded inputs, in every regime; on the CPU through Triton's interpreter, on a GPU compiled (the same
tests)."""
import os
import subprocess
import sys

import pytest
import torch
import triton

from reference import rel_err
from test_kernels import TOL, make_inputs

from sb_ref.blocked import _grouped, segment_backward, segment_forward
from sb_ref.kernels.segment import segment_backward_triton, segment_forward_triton


def _check(B, Hq, Hk, Tq, Tk, D, Dv, dtype, regime, seed=0):
    q, _, _, scale = make_inputs(regime, B, Hq, Hk, Tq, D, Dv, dtype, seed=seed)
    _, k, v, _ = make_inputs(regime, B, Hq, Hk, Tk, D, Dv, dtype, seed=seed)  # the same regime's direction
    q, k, v = (x.detach() for x in (q, k, v))
    g = torch.Generator().manual_seed(seed)
    do, dS = torch.randn(B, Hq, Tq, Dv, generator=g), torch.randn(B, Hq, Tq, generator=g)
    o, S = segment_forward_triton(q, k, v, scale)
    grads = segment_backward_triton(q, k, v, do.to(q.device), dS.to(q.device), scale)
    assert o.shape == (B, Hq, Tq, Dv) and S.shape == (B, Hq, Tq) and o.dtype == S.dtype == torch.float32
    assert [x.shape for x in grads] == [q.shape, k.shape, v.shape] and all(x.dtype == torch.float32 for x in grads)
    q5, k5, v5 = _grouped(*(x.cpu() for x in (q, k, v)), torch.float64)
    ro, rS = segment_forward(q5, k5, v5, scale)
    G = Hq // Hk
    ref_grads = segment_backward(q5, k5, v5, do.double().reshape(B, Hk, G, Tq, Dv), dS.double().reshape(B, Hk, G, Tq),
                                 scale)
    tol_o, tol_g = TOL[dtype]
    errs = rel_err(o.cpu(), ro.reshape(o.shape)), rel_err(S.cpu(), rS.reshape(S.shape))
    assert max(errs) <= tol_o, f"{regime} {dtype} Tq={Tq} Tk={Tk}: (o, S) errors {errs} > {tol_o}"
    errs = [rel_err(x.cpu(), r.reshape(x.shape)) for x, r in zip(grads, ref_grads)]
    assert max(errs) <= tol_g, f"{regime} {dtype} Tq={Tq} Tk={Tk}: (dq, dk, dv) errors {errs} > {tol_g}"


@pytest.mark.parametrize("regime", ["random", "long", "saturated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_matches_the_float64_segment_forward(regime, dtype):
    # GQA, Dv != D, a head dim that is no power of two, lengths that are no multiple of a tile
    _check(1, 4, 2, 70, 45, 48, 32, dtype, regime)
    _check(2, 2, 2, 64, 200, 64, 64, dtype, regime, seed=1)  # several chunks of the carry table


@pytest.mark.parametrize("Tq, Tk", [(1, 1), (1, 33), (40, 1)])
def test_segment_of_one_query_or_one_key(Tq, Tk):
    _check(1, 2, 1, Tq, Tk, 16, 16, torch.float32, "random")


def test_an_empty_segment_leaves_the_stick_whole():
    q = torch.randn(1, 2, 5, 16)
    o, S = segment_forward_triton(q, q[:, :, :0], q[:, :, :0], 0.25)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(S, torch.zeros_like(S))
    dq, dk, dv = segment_backward_triton(q, q[:, :, :0], q[:, :, :0], q, q[..., 0], 0.25)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == dv.shape == (1, 2, 0, 16)



# pointer dtypes of a bfloat16 launch: the forward reads q, k and v's float16 copy, the backward float16 copies
POINTERS = {"segment_forward_kernel": dict(Q="bf16", K="bf16", V="fp16", O="fp32", S="fp32", SC="fp32"),
            "segment_dq_kernel": dict(Q="fp16", K="fp16", V="fp16", DO="fp16", DS="fp32", DQ="fp32", DELTA="fp32",
                                      TW="fp32", TR="fp32", SC="fp32"),
            "segment_dkdv_kernel": dict(Q="fp16", K="fp16", V="fp16", DO="fp16", DELTA="fp32", TW="fp32", TR="fp32",
                                        DK="fp32", DV_="fp32", SC="fp32")}


def compile_for_sm90():
    """Compiles each segment kernel for an H100 as a bfloat16 launch at D = 128 would specialise it and prints
    whether its products are wgmma (run without the interpreter)."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sb_ref.kernels import segment
    for name, pointers in POINTERS.items():
        fn = getattr(segment, name)
        values = dict(D=128, DV=128, BLOCK_D=128, BLOCK_DV=128, UPCAST=False, PRECISION="ieee", SPLIT_A=False,
                      SCAN_L=2, SCAN_DL=1, BLOCK_M=64, BLOCK_N=32, OP_DTYPE=tl.float16,
                      DOT_DTYPE=tl.bfloat16 if pointers["Q"] == "bf16" else tl.float16)
        signature, constexprs = {}, {}
        for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
            if param.is_constexpr:
                signature[arg], constexprs[arg] = "constexpr", values[arg]
            elif arg in pointers:
                signature[arg] = "*" + pointers[arg]
            elif arg == "scale":
                signature[arg] = "fp32"
            elif arg.startswith("s_"):  # (batch, head, time, dim) strides, the dim's specialised to 1
                signature[arg], constexprs[(i, 3)] = ("i32", "i32", "i32", "constexpr"), 1
            else:
                signature[arg] = "i32"
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=4, num_stages=2))
        print(name, "wgmma" in compiled.asm["ptx"])


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "ptxas")), reason="this triton ships no ptxas")
def test_the_segment_kernels_compile_for_sm90_on_tensor_cores():
    """The interpreter accepts things the GPU compiler rejects: compile each kernel for sm_90, in a fresh process
    without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", "from test_segment import compile_for_sm90; compile_for_sm90()"],
                         cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [word for name in POINTERS for word in (name, "True")], out.stdout
