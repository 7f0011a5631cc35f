"""Context parallelism (sb_ref.distributed) on GPUs: strong and weak scaling against the single-GPU op, with NCCL.

    torchrun --nproc-per-node W benchmarks/bench_context_parallel.py [--out FILE] [--strong 65536,131072]
        [--weak 16384] [--heads 12] [--dim 128] [--regimes long,random] [--layouts zigzag,contiguous]

One process per GPU. Causal, bf16, forward and forward+backward, median of CUDA-event timings after warm-up; every
rank's time is taken and the slowest counts. Strong scaling: a fixed total length T split over the W ranks;
weak: a fixed length per rank (T = W x that). For each, the single-GPU op (`stick_breaking_attention`, the Triton
path) on the whole sequence, run on rank 0 while the others wait, where it fits; efficiency = single-GPU time /
(W x the distributed time), and the load balance of the layout = the mean rank time / the slowest rank's. Before
timing, the gathered output is compared with the single-GPU op's (relative Frobenius difference, in the table).
Device, versions and date go in the header.
"""
import argparse
import datetime
import os
import platform
import statistics

import torch
import torch.distributed as dist
import triton

import sb_ref
from sb_ref.distributed import context_parallel_attention, gather_sequence, shard_sequence


def inputs(T, H, D, regime, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", generator=g) for _ in range(3))
    if regime == "long":  # logits near -8: sticks last for thousands of keys
        u = torch.nn.functional.normalize(torch.randn(D, device="cuda", generator=g), dim=0)
        a = (8.0 * D ** 0.5) ** 0.5
        q, k = a * u + 0.02 * q, -a * u + 0.02 * k
    return [x.to(torch.bfloat16) for x in (q, k, v)]


def timed(fn, reps=5, warmup=2):
    """Median ms of fn() over reps, CUDA events, after warm-up; every rank enters each rep together."""
    times = []
    for i in range(warmup + reps):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def slowest_and_mean(ms):
    t = torch.tensor([ms], device="cuda")
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t)
    values = [x.item() for x in every]
    return max(values), statistics.mean(values)


def run_case(T, H, D, regime, layout):
    """(check, {"fwd": ..., "fwd+bwd": ...}) of one configuration, times in ms (slowest rank, mean rank)."""
    q, k, v = inputs(T, H, D, regime)
    q_l, k_l, v_l = (shard_sequence(x, layout=layout).requires_grad_() for x in (q, k, v))
    o_l = context_parallel_attention(q_l, k_l, v_l, layout=layout)
    o = gather_sequence(o_l.detach(), layout=layout)
    if dist.get_rank() == 0:
        ref = sb_ref.stick_breaking_attention(q, k, v).float()
        check = ((o.float() - ref).norm() / ref.norm()).item()
    else:
        check = float("nan")
    go = torch.randn_like(o_l)

    def fwd():
        with torch.no_grad():
            context_parallel_attention(q_l, k_l, v_l, layout=layout)

    def fwd_bwd():
        context_parallel_attention(q_l, k_l, v_l, layout=layout).backward(go)

    return check, {"fwd": slowest_and_mean(timed(fwd)), "fwd+bwd": slowest_and_mean(timed(fwd_bwd))}


def single_gpu(T, H, D, regime):
    """The single-GPU op on the whole sequence, on rank 0 (None where it does not fit)."""
    out = {}
    if dist.get_rank() == 0:
        try:
            q, k, v = (x.requires_grad_() for x in inputs(T, H, D, regime))
            go = torch.randn_like(q)
            fwd = lambda: sb_ref.stick_breaking_attention(q, k, v)  # noqa: E731
            out["fwd"] = triton.testing.do_bench(lambda: fwd().detach(), warmup=5, rep=50, return_mode="median")
            out["fwd+bwd"] = triton.testing.do_bench(lambda: fwd().backward(go), warmup=5, rep=50,
                                                     return_mode="median")
        except torch.OutOfMemoryError:
            out = {}
        torch.cuda.empty_cache()
    box = [out]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--strong", default="65536,131072", help="total lengths of the strong-scaling rows")
    ap.add_argument("--weak", default="16384", help="lengths per rank of the weak-scaling rows")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--regimes", default="long,random")
    ap.add_argument("--layouts", default="zigzag,contiguous")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    cases = [("strong", int(T)) for T in args.strong.split(",") if T] + \
            [("weak", int(t) * world) for t in args.weak.split(",") if t]
    for regime in args.regimes.split(","):
        for kind, T in cases:
            base = single_gpu(T, args.heads, args.dim, regime)
            for layout in args.layouts.split(","):
                check, times = run_case(T, args.heads, args.dim, regime, layout)
                for what, (slowest, mean) in times.items():
                    eff = base[what] / (world * slowest) if what in base else float("nan")
                    rows.append(f"| {regime} | {kind} | {T} | {layout} | {what} | {slowest:.2f} | "
                                f"{base.get(what, float('nan')):.2f} | {eff:.2f} | {mean / slowest:.2f} | "
                                f"{check:.1e} |")
                    if rank == 0:
                        print(rows[-1], flush=True)
    if rank == 0:
        head = [f"# Context parallelism: {world} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                f"triton {triton.__version__}, python {platform.python_version()}, "
                f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
                f"B = 1, H = {args.heads}, D = {args.dim}, bf16, causal; ms of the slowest rank; efficiency = single-GPU "
                "ms / (W x distributed ms); balance = mean rank ms / slowest; check = relative difference of the "
                "gathered o to the single-GPU op's.", "",
                "| regime | scaling | T | layout | pass | ms (W ranks) | ms (1 GPU) | efficiency | balance | check |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        text = "\n".join(head + rows) + "\n"
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
