"""Registers, spills and instruction mix of each kernel compiled for an H100 (sm_90), on any machine.

    python benchmarks/compile_report.py [--dims 128,64] [--kernels fwd,dq,dkdv,hopper_fwd,hopper_dkdv] [--out DIR]

No GPU needed: the kernels of kernels/forward.py and kernels/backward.py (and the Gluon kernels when asked for:
hopper_fwd and hopper_fwd_ws of kernels/hopper_forward*.py, hopper_dkdv of kernels/hopper_backward.py) are
compiled with `triton.compile` for `GPUTarget("cuda", 90, 32)`, with the tiles of the default LaunchConfig for bfloat16 inputs (so the backward's operands are the
float16 copies it makes), and the ptxas and nvdisasm that ship with triton report on the result. Per kernel:
registers, spill bytes, and counts of the SASS instructions that decide speed here: HGMMA (Hopper's wgmma
tensor-core path) against HMMA (the older one), MUFU (the special-function unit: exp2), the float32 ALU
(FFMA, FADD, FMUL, FMNMX, FSEL, FSETP), bit logic (LOP3: also the sign flips the compiler could not fold into
an FMA), conversions and packs (F2F, F2FP), local memory (LDL, STL: spills), and whether ptxas serialized the
kernel's wgmma products (its warning C7515: each product then waits for the one before; a reduction in a loop's
condition did it once here), and how many of the kernel's waits for products leave one in flight (a
`wgmma.wait_group` of 1 or more in the PTX: the overlap the Gluon forward is built for).
Counts are static (the whole kernel, both the diagonal and the off-diagonal loop), to compare versions, not to
time them. The triton version here may differ from a GPU machine's; `--out` keeps PTX and SASS for reading.

A second table budgets one iteration of each kernel's hot loop (its innermost loop with tensor-core products, the
shortest such: off the diagonal), per tile: the instructions each warp issues (one scheduler issues one per clock,
so that many clocks at best), the MUFU instructions (the special-function unit takes 8 clocks per warp
instruction), and the clocks the tile's products need at the tensor cores' peak (4096 dense 16-bit flops per clock
per SM on an H100, from the HGMMA shapes). The largest of the three bounds the loop; a kernel slower than its
largest waits on latency.
"""
import argparse
import collections
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from sb_ref.kernels import LaunchConfig  # noqa: E402
from sb_ref.kernels.backward import dkdv_kernel, dq_kernel  # noqa: E402
from sb_ref.kernels.forward import forward_kernel  # noqa: E402
from sb_ref.kernels.hopper_forward import SLOTS, hopper_forward_kernel, shared_layouts  # noqa: E402
from sb_ref.kernels.hopper_forward_ws import hopper_forward_ws_kernel, tma_descriptors  # noqa: E402
from sb_ref.kernels import hopper_backward  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
OPS = ["HGMMA", "HMMA", "MUFU", "FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "LOP3", "F2F", "F2FP", "LDL", "STL"]
# pointer arguments by kernel, for bfloat16 inputs: the backward reads float16 copies (operands.backward_operands)
POINTERS = {
    "fwd": dict(Q="bf16", K="bf16", V="fp16", O="bf16", REM="fp32", LO="i32", CU="i32", SC="fp32"),
    "dq": dict(Q="fp16", K="fp16", V="fp16", DO="fp16", REM="fp32", DREM="fp32", DQ="bf16", DELTA="fp32",
               TW="fp32", TR="fp32", CU="i32", SC="fp32"),
    "dkdv": dict(Q="fp16", K="fp16", V="fp16", DO="fp16", DELTA="fp32", TW="fp32", TR="fp32", DK="bf16",
                 DV_="bf16", MB_STOP="i32", CU="i32", SC="fp32"),
}
KERNELS = {"fwd": forward_kernel, "dq": dq_kernel, "dkdv": dkdv_kernel, "hopper_fwd": hopper_forward_kernel,
           "hopper_fwd_ws": hopper_forward_ws_kernel, "hopper_dkdv": hopper_backward.hopper_dkdv_kernel}
POINTERS["hopper_fwd"] = dict(Q="bf16", K="bf16", V="fp16", O="bf16", REM="fp32", SC="fp32")
POINTERS["hopper_fwd_ws"] = dict(Q="bf16", O="bf16", REM="fp32", SC="fp32")
POINTERS["hopper_dkdv"] = {name: kind for name, kind in POINTERS["dkdv"].items() if name != "CU"}
HOPPER_TILE = (64, 32, 4)  # BLOCK_M, BLOCK_N, warps: hopper_forward's launch


def compile_hopper_forward(dim, block_n=HOPPER_TILE[1], maxnreg=None, a_in_registers=False, producer=False,
                           warpgroups=1):
    """A Gluon forward as hopper_forward launches it for bfloat16 inputs (kernels/hopper_forward.py), or with the
    producer warp as hopper_forward_ws does (kernels/hopper_forward_ws.py): its TMA descriptors' types come from
    descriptors of CPU tensors, as a launch would specialise them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.experimental.gluon._runtime import GluonASTSource
    block_m, _, warps = (64 * warpgroups, None, 4 * warpgroups)
    layouts = shared_layouts(torch.bfloat16, block_m, block_n, dim)
    values = dict(D=dim, ATTEND_CURRENT=False, BLOCK_M=block_m, BLOCK_N=block_n, OVERLAP=True,
                  A_IN_REGISTERS=a_in_registers, num_warps=warps, **layouts)
    name = "hopper_fwd_ws" if producer else "hopper_fwd"
    fn = KERNELS[name]
    kv = torch.zeros(1024, dim, dtype=torch.bfloat16), torch.zeros(1024, dim, dtype=torch.float16)
    descs = dict(zip(("k_desc", "v_desc"), (native_specialize_impl(CUDABackend, d, False, True, True)[0]
                                            for d in tma_descriptors(*kv, block_n, layouts))))
    signature, constexprs, attrs = {}, {}, {}
    for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[arg], constexprs[arg] = "constexpr", values[arg]
        elif arg in descs:
            signature[arg] = descs[arg]
        elif arg in POINTERS[name]:
            signature[arg] = "*" + POINTERS[name][arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "scale":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg.startswith("s_") or arg == "T":
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, **({} if maxnreg is None else dict(maxnreg=maxnreg))))
    return compiled, (block_m, block_n, warps, SLOTS.value, maxnreg)


def compile_hopper_dkdv(dim, early_exit=True):
    """The Gluon dk/dv kernel as hopper_backward.hopper_dkdv launches it for bfloat16 inputs (float16 operands)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    block_m, block_n = hopper_backward.TILE_M, hopper_backward.TILE_N
    values = dict(D=dim, ATTEND_CURRENT=False, EARLY_EXIT=early_exit, EARLY_NEXT=False, BLOCK_M=block_m,
                  BLOCK_N=block_n, num_warps=4, **hopper_backward.shared_layouts(block_m, block_n, dim))
    fn = KERNELS["hopper_dkdv"]
    signature, constexprs, attrs = {}, {}, {}
    for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[arg], constexprs[arg] = "constexpr", values[arg]
        elif arg in POINTERS["hopper_dkdv"]:
            signature[arg] = "*" + POINTERS["hopper_dkdv"][arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "scale":
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg.startswith("s_") or arg in ("T", "CHUNK"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4))
    return compiled, (block_m, block_n, 4, hopper_backward.SLOTS.value, None)


def compile_kernel(name, dim, config=LaunchConfig()):
    """triton.compile of one kernel as a launch with bfloat16 inputs of head dim `dim` would specialise it."""
    if name.startswith("hopper_fwd"):
        return compile_hopper_forward(dim, producer=name == "hopper_fwd_ws")
    if name == "hopper_dkdv":
        return compile_hopper_dkdv(dim, config.early_exit)
    fn = KERNELS[name]
    tile = getattr(config.gpu.tiles(dim, torch.bfloat16), name)
    values = dict(D=dim, DV=dim, BLOCK_D=dim, BLOCK_DV=dim, VARLEN=False, ATTEND_CURRENT=False, UPCAST=False,
                  DOT_DTYPE=tl.bfloat16 if name == "fwd" else tl.float16, OP_DTYPE=tl.float16, PRECISION="ieee",
                  SPLIT_A=False, SCAN_L=tile.scan_l, SCAN_DL=tile.scan_dl, EARLY_EXIT=config.early_exit,
                  REDO=False, EXIT_SEGMENT=config.gpu.exit_segment, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
    signature, constexprs, attrs = {}, {}, {}
    for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[arg], constexprs[arg] = "constexpr", values[arg]
        elif arg in POINTERS[name]:
            signature[arg] = "*" + POINTERS[name][arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "scale":
            signature[arg] = "fp32"
        elif arg.startswith("s_"):
            # (batch, head, time, dim) strides: the dim's unit stride is specialised to 1 at launch, the others
            # are multiples of 16
            signature[arg] = ("i32", "i32", "i32", "constexpr")
            constexprs[(i, 3)] = 1
            for j in range(3):
                attrs[(i, j)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "i32"
            if arg in ("T", "CHUNK"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(tile.launch_options())
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options), (tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, tile.maxnreg)


def report(compiled):
    """(registers, spill store bytes, wgmma serialized, waits that leave a product in flight, Counter of SASS
    opcodes, SASS text) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        maxnreg = getattr(compiled.metadata, "maxnreg", None)
        cap = ["--maxrregcount", str(maxnreg)] if maxnreg else []
        ptxas = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o",
                                os.path.join(tmp, "check.cubin")] + cap, capture_output=True, text=True,
                               check=True).stderr
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", ptxas).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", ptxas).group(1))
    serialized = "C7515" in ptxas
    in_flight = len(re.findall(r"wgmma\.wait_group\.sync\.aligned [1-9]", compiled.asm["ptx"]))
    ops = collections.Counter(m.group(1).split(".")[0] for m in
                              re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass, re.M))
    return registers, spills, serialized, in_flight, ops, sass


TENSOR_FLOPS_PER_CLOCK = 4096  # H100 SXM, dense float16 / bfloat16, per SM
MUFU_CLOCKS = 8  # per warp instruction: 16 results per clock per SM, 4 per scheduler


def hot_loop(sass):
    """(instructions, HGMMA flops, MUFU instructions) of one iteration of the shortest innermost loop that holds
    tensor-core products: the loop a kernel spends its time in."""
    lines = sass.splitlines()
    instr = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)")
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    innermost = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops if (c, d) != (a, b))]
    best = None
    for a, b in innermost:
        ops = [m.group(1) for line in lines[a:b + 1] if (m := instr.match(line))]
        flops = sum(2 * int(x) * int(y) * int(z) for op in ops
                    if (mm := re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)) for x, y, z in [mm.groups()])
        if flops and (best is None or len(ops) < best[0]):
            best = (len(ops), flops, sum(op.startswith("MUFU") for op in ops))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="128,64", help="padded head dims, comma-separated")
    ap.add_argument("--kernels", default="fwd,dq,dkdv")
    ap.add_argument("--out", default=None, help="folder for each kernel's PTX and SASS")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90, bfloat16 inputs; static instruction counts")
    loops = []
    print("| kernel | D | tiles (BLOCK_M, BLOCK_N, warps, stages, maxnreg) | registers | spill bytes | "
          "wgmma serialized | in-flight waits | " + " | ".join(OPS) + " |")
    print("|---" * (7 + len(OPS)) + "|")
    for dim in (int(d) for d in args.dims.split(",")):
        for name in args.kernels.split(","):
            compiled, tiles = compile_kernel(name, dim)
            registers, spills, serialized, in_flight, ops, sass = report(compiled)
            print(f"| {name} | {dim} | {tiles} | {registers} | {spills} | {'yes' if serialized else 'no'} | {in_flight} | "
                  + " | ".join(str(ops[o]) for o in OPS) + " |", flush=True)
            loops.append((name, dim, tiles, hot_loop(sass)))
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                for ext, text in (("ptx", compiled.asm["ptx"]), ("sass", sass)):
                    with open(os.path.join(args.out, f"{name}_{dim}.{ext}"), "w") as f:
                        f.write(text)
    print("\nOne iteration of the hot loop (one tile), clocks per SM at best:\n")
    print("| kernel | D | tile (BLOCK_M x BLOCK_N) | instructions per warp = issue clocks | MUFU per warp "
          "| MUFU clocks | tensor-core clocks | issue / tensor |")
    print("|---" * 8 + "|")
    for name, dim, tiles, loop in loops:
        if loop is None:
            continue
        n, flops, mufu = loop
        tensor = flops / TENSOR_FLOPS_PER_CLOCK
        print(f"| {name} | {dim} | {tiles[0]} x {tiles[1]} | {n} | {mufu} | {mufu * MUFU_CLOCKS} | {tensor:.0f} | "
              f"{n / tensor:.2f} |")


if __name__ == "__main__":
    main()
