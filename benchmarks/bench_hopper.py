"""Forward speed of the Hopper path (kernels/hopper_forward.py, Gluon, asynchronous wgmma) against the `tl` forward
and PyTorch's attention, in one process.

    python benchmarks/bench_hopper.py [--out results.md] [--shapes 4,12,4096,128;...] [--regimes long,random]

Causal, bf16, forward only, median of triton.testing.do_bench; TFLOP/s counts 2*B*H*T^2*D flops. Rows: SDPA's
FLASH_ATTENTION backend (FA2, the baseline of every ratio) and CUDNN_ATTENTION (softmax), the op's `tl` forward
with its default launch (early exit on) and with early exit off (the same walk as the Hopper forward), and the
Hopper forwards: with a cp.async ring, and with a producer warp feeding the ring by TMA. In the long regime sticks
last for thousands of keys and nothing can be skipped; in the random one (N(0, 1) inputs) early exit skips most
keys, which the Hopper forwards do not do yet.
"""
import argparse
import datetime
import os
import platform
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import SHAPES, inputs, ms, sdpa_fwd, warm_up_gpu  # noqa: E402

from sb_ref.kernels import LaunchConfig, stick_breaking_attention_triton  # noqa: E402
from sb_ref.kernels.hopper_forward import hopper_forward  # noqa: E402
from sb_ref.kernels.hopper_forward_ws import hopper_forward_ws  # noqa: E402


def implementations(q, k, v, variants):
    from torch.nn.attention import SDPBackend
    scale = q.shape[-1] ** -0.5
    off = LaunchConfig(early_exit=False)
    return [("flash (FA2)", sdpa_fwd(q, k, v, SDPBackend.FLASH_ATTENTION)),
            ("cudnn", sdpa_fwd(q, k, v, SDPBackend.CUDNN_ATTENTION)),
            ("sb tl, exit on", lambda: stick_breaking_attention_triton(q, k, v, scale, False)[0]),
            ("sb tl, exit off", lambda: stick_breaking_attention_triton(q, k, v, scale, False, config=off)[0]),
            ("sb hopper", lambda: hopper_forward(q, k, v, scale, False)[0]),
            ("sb hopper, producer warp", lambda: hopper_forward_ws(q, k, v, scale, False)[0]),
            ("sb hopper, producer warp, 2 consumer warpgroups, maxnreg 168",
             lambda: hopper_forward_ws(q, k, v, scale, False, 32, 168, 2)[0]),
            ("sb hopper, 2 warpgroups, A in registers",
             lambda: hopper_forward(q, k, v, scale, False, 32, None, True, True, 2)[0])] + \
        [(f"sb hopper, block_n {n}, maxnreg {r}{'' if o else ', synchronous'}{', A in registers' if a else ''}",
          lambda n=n, r=r, o=o, a=a: hopper_forward(q, k, v, scale, False, n, r, o, a)[0]) for n, r, o, a in variants]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="Markdown file to write")
    ap.add_argument("--shapes", default=None, help="e.g. 4,12,4096,128;8,16,4096,64")
    ap.add_argument("--regimes", default="long,random")
    ap.add_argument("--variants", default="", help="more Hopper launches to time, e.g. 32:168,32:none:sync,32:168:reg "
                                                    "(block_n:maxnreg[:sync][:reg]; sync: without the overlap, reg: A "
                                                    "from registers)")
    args = ap.parse_args()
    variants = [(int(v[0]), None if v[1] == "none" else int(v[1]), "sync" not in v[2:], "reg" in v[2:]) for v in
                (x.split(":") for x in args.variants.split(",") if x)]
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    warm_up_gpu()
    lines = [f"# Hopper forward: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"python {platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", "Causal, bf16, forward only; ratio = FA2's time / this time.", "",
             "| regime | B, H, T, D | implementation | ms | TFLOP/s | x FA2 | o's relative difference to the tl forward's |",
             "|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for regime in args.regimes.split(","):
            for B, H, T, D in shapes:
                q, k, v = (x.detach() for x in inputs(B, H, T, D, regime=regime))
                flops = 2 * B * H * T * T * D
                times, diffs = {}, {}
                reference = stick_breaking_attention_triton(q, k, v, D ** -0.5, False,
                                                            config=LaunchConfig(early_exit=False))[0].float()
                for name, fn in implementations(q, k, v, variants):
                    try:
                        if name.startswith("sb"):
                            diffs[name] = ((fn().float() - reference).norm() / reference.norm()).item()
                        times[name] = ms(fn)
                    except Exception as e:  # a backend this build lacks
                        print(f"{name} at {(B, H, T, D)}: unavailable ({type(e).__name__}: {str(e)[:200]})", flush=True)
                for name, t in times.items():
                    ratio = times["flash (FA2)"] / t if "flash (FA2)" in times else float("nan")
                    diff = f"{diffs[name]:.1e}" if name in diffs else ""
                    lines.append(f"| {regime} | {B}, {H}, {T}, {D} | {name} | {t:.3f} | {flops / t * 1e-9:.1f} | "
                                 f"{ratio:.3f} | {diff} |")
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
