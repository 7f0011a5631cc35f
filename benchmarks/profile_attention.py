"""Where one forward+backward of the op spends its GPU time: every CUDA kernel it launches, from torch.profiler.

    python benchmarks/profile_attention.py [--shape 4,12,4096,128] [--regime random|long]
                                           [--early-exit on|off|both] [--out tables.txt]

Prints, per kernel, the GPU time summed over --steps calls (after warm-up), and the host wall time of a call: the
kernels of kernels/ (forward, backward, operands) and the PyTorch work around them (operand copies, scale tables, early-exit bounds).
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_attention import inputs, sb_fwd
from sb_ref.kernels import LaunchConfig


def profile_op(fwd, go, steps):
    """(host wall ms per call, profiler) of `steps` forward+backward calls, after three untimed ones."""
    def step():
        fwd().backward(go)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return wall, prof


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,12,4096,128", help="B,H,T,D")
    ap.add_argument("--regime", default="random", choices=("random", "long"))
    ap.add_argument("--early-exit", default=None, choices=("on", "off", "both"),
                    help="set the launch configuration's early_exit, or profile off, on, off, on in one process")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the tables to this file")
    args = ap.parse_args()
    settings = {None: [LaunchConfig().early_exit], "on": [True], "off": [False], "both": [False, True, False, True]}
    B, H, T, D = (int(x) for x in args.shape.split(","))
    q, k, v = inputs(B, H, T, D, regime=args.regime)
    go = torch.randn_like(sb_fwd(q, k, v)())
    text = []
    for early_exit in settings[args.early_exit]:
        wall, prof = profile_op(sb_fwd(q, k, v, LaunchConfig(early_exit=early_exit)), go, args.steps)
        text.append(f"{(B, H, T, D)} {args.regime} regime, early exit {'on' if early_exit else 'off'}: {wall:.3f} ms "
                    f"per forward+backward (host wall, {args.steps} calls), {torch.cuda.get_device_name()}, torch "
                    f"{torch.__version__}\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                                         max_name_column_width=60))
        print(text[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
