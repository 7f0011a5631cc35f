"""Backward speed of the Hopper key-major kernel (kernels/hopper_backward.py, Gluon, asynchronous wgmma) against the
`tl` one and PyTorch's attention, in one process.

    python benchmarks/bench_hopper_backward.py [--out results.md] [--shapes 4,12,4096,128;...] [--regimes long,random]

Causal, bf16, median of triton.testing.do_bench. Two tables per shape and regime:
- the dk/dv kernel alone (the `tl` dkdv_kernel and the Gluon kernel's launches), on the same operands, table and
  early-exit stops as the op would hand it; the carry table advances in place between calls (the same work);
- forward+backward of the op with the `tl` backward and with the Gluon dk/dv kernel (LaunchConfig(hopper_dkdv=
  True)), against SDPA's FLASH_ATTENTION backend (FA2): TFLOP/s counts 3.5 * 2*B*H*T^2*D flops (forward and a
  2.5x backward), ratio = FA2's time / this time.
"""
import argparse
import datetime
import os
import platform
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import SHAPES, inputs, ms, sb_fwd, sdpa_fwd, time_pair, warm_up_gpu  # noqa: E402

from sb_ref.kernels import LaunchConfig, op, operands  # noqa: E402
from sb_ref.kernels.config import Problem  # noqa: E402
from sb_ref.kernels.hopper_backward import hopper_dkdv  # noqa: E402

# the Gluon launches timed: (label, hopper_dkdv's keyword arguments)
GLUON = [("gluon", {}), ("gluon, next products early", {"early_next": True}),
         ("gluon, maxnreg 232", {"maxnreg": 232})]


def kernel_rows(q, k, v, config):
    """(label, ms, largest relative difference of dk, dv to the tl kernel's) of each dk/dv kernel alone."""
    scale = q.shape[-1] ** -0.5
    p = Problem.of(q, k, v, None, q.shape[2], config)
    o, rem, lo = op.forward(p, q, k, v, scale, False)
    do = torch.randn_like(o)
    drem = torch.zeros_like(rem)
    ops = operands.backward_operands(scale, p.DV, do, drem * rem, q, k, v)
    kept_lo = lo if p.walks_can_stop(lo) else None
    tile = p.tile("dkdv")
    mb_stop = None if kept_lo is None else op.exit_bounds(kept_lo, p.cu, 1, False, tile.block_m, tile.block_n)
    _, delta_g, tw, tr, chunk = op.backward_dq(p, ops, drem, rem, scale, False)

    def fresh():  # the table as the dq kernel left it
        return tw.clone(), tr.clone()

    reference = op.backward_dkdv(p, ops, kept_lo, delta_g, *fresh(), chunk, scale, False)
    rows = [("tl dkdv_kernel", ms(lambda: op.backward_dkdv(p, ops, kept_lo, delta_g, tw, tr, chunk, scale, False)),
             0.0)]
    for label, launch in GLUON:
        got = hopper_dkdv(p, ops, mb_stop, delta_g, *fresh(), chunk, scale, False, **launch)
        diff = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, reference))
        rows.append((label, ms(lambda: hopper_dkdv(p, ops, mb_stop, delta_g, tw, tr, chunk, scale, False,
                                                   **launch)), diff))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="Markdown file to write")
    ap.add_argument("--shapes", default=None, help="e.g. 4,12,4096,128;8,16,4096,64")
    ap.add_argument("--regimes", default="long,random")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    warm_up_gpu()
    lines = [f"# Hopper backward: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{triton.__version__}, python {platform.python_version()}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "Causal, bf16. dk/dv kernel alone: ms, and dk, dv's largest relative difference to the tl kernel's. "
             "Forward+backward: ratio = FA2's time / this time.", "",
             "| regime | B, H, T, D | what | ms | TFLOP/s | x FA2 (fwd+bwd) | difference to tl |",
             "|---|---|---|---|---|---|---|"]
    default, gluon = LaunchConfig(), LaunchConfig(hopper_dkdv=True)
    for regime in args.regimes.split(","):
        for B, H, T, D in shapes:
            q, k, v = inputs(B, H, T, D, regime=regime)
            flops = 3.5 * 2 * B * H * T * T * D
            with torch.no_grad():
                for label, t, diff in kernel_rows(q.detach(), k.detach(), v.detach(), default):
                    lines.append(f"| {regime} | {B}, {H}, {T}, {D} | dk/dv alone: {label} | {t:.3f} | | | "
                                 f"{diff:.1e} |")
                    print(lines[-1], flush=True)
            times = {"flash (FA2)": time_pair(sdpa_fwd(q, k, v, SDPBackend.FLASH_ATTENTION))[1],
                     "sb, tl backward": time_pair(sb_fwd(q, k, v, default))[1],
                     "sb, Gluon dk/dv": time_pair(sb_fwd(q, k, v, gluon))[1]}
            for label, t in times.items():
                lines.append(f"| {regime} | {B}, {H}, {T}, {D} | fwd+bwd: {label} | {t:.3f} | "
                             f"{flops / t * 1e-9:.1f} | {times['flash (FA2)'] / t:.3f} | |")
                print(lines[-1], flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
