"""Speed and accuracy of the Triton stick-breaking kernels (sb_ref.kernels) against PyTorch attention.

    python benchmarks/bench_attention.py [--out results.md] [--flex] [--sweep]

Speed: causal, bf16, forward and forward+backward, median of triton.testing.do_bench, against
scaled_dot_product_attention with the FLASH_ATTENTION backend (the baseline), cuDNN, and FlexAttention (--flex).
TFLOP/s counts 2*B*H*T^2*D flops for a causal forward and 2.5x that for the backward (fwd+bwd = 3.5x).
Accuracy: relative Frobenius error against the float64 oracle (tests/reference.py) on the same rounded inputs.
--sweep times a few tile configurations of each kernel first and keeps the fastest (printed, not saved).
--regime long times inputs whose sticks last for thousands of keys (the default, random, uses them up within tens).
--early-exit on|off sets the launch configuration's early_exit for the whole run; both times the op each way (two rows),
twice, in the order off, on, baselines, on, off, and reports the mean of each.
--varlen adds a table: 65536 tokens packed as sequences of mixed length (cu_seqlens), with max_seqlen given and
read from cu_seqlens, against an equal-length batch with the same work per token, and that batch packed too.
"""
import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from reference import attention as oracle, rel_err  # noqa: E402

from sb_ref.kernels import LaunchConfig, Tile, op, operands, stick_breaking_attention_triton  # noqa: E402
from sb_ref.kernels.config import KERNELS, Problem  # noqa: E402

SHAPES = [(4, 12, 4096, 128), (4, 12, 8192, 128), (2, 12, 16384, 128), (8, 16, 4096, 64)]


def ms(fn):
    return triton.testing.do_bench(fn, warmup=100, rep=400, return_mode="median")


def inputs(B, H, T, D, dtype=torch.bfloat16, seed=0, regime="random"):
    """q, k, v ~ N(0, 1) ("random": logits of unit spread, sticks used up within tens of keys), or with logits near
    -8 ("long": beta ~ 3e-4, a stick lasts for thousands of keys), as tests/test_kernels.py's regimes."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", generator=g) for _ in range(3))
    if regime == "long":
        u = torch.nn.functional.normalize(torch.randn(D, device="cuda", generator=g), dim=0)
        a = (8.0 * D ** 0.5) ** 0.5
        q, k = a * u + 0.02 * q, -a * u + 0.02 * k
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def warm_up_gpu(seconds=1.0):
    """Busy matmuls before the first timing, so that no shape is timed while the GPU's clocks are still rising."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def time_pair(fwd):
    """(forward ms, forward+backward ms) of fwd() -> tensor, with a fixed output gradient."""
    out = fwd()
    go = torch.randn_like(out)

    def fb():
        fwd().backward(go)

    with torch.no_grad():
        t_f = ms(fwd)
    return t_f, ms(fb)


def sb_fwd(q, k, v, config=LaunchConfig()):
    """The op's forward as a closure, launched with config."""
    return lambda: stick_breaking_attention_triton(q, k, v, q.shape[-1] ** -0.5, False, config=config)[0]


def sb_varlen_fwd(q, k, v, cu, max_seqlen=None, config=LaunchConfig()):
    """Without max_seqlen the op reads it from cu_seqlens: one wait for the GPU in the forward."""
    return lambda: stick_breaking_attention_triton(q, k, v, q.shape[-1] ** -0.5, False, cu, max_seqlen,
                                                   config=config)[0]


def sdpa_fwd(q, k, v, backend):
    from torch.nn.attention import sdpa_kernel

    def f():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return f


def flex_fwd(q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T = q.shape[2]
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, block_mask=mask)


CANDIDATES = {
    # (BLOCK_M, BLOCK_N, num_warps, num_stages, scan of log(1-beta), scan of dl[, maxnreg]): the fields of a Tile,
    # the scans as tile_math.exclusive_cumsum's PARTS. Every tile is [queries, keys]; the tensor cores' wgmma path needs 64
    # query rows per 4 warps. Earlier sweeps (results/, benchmarks/README.md) found larger tiles spilling, 16-key
    # tiles and 8 warps on 64 rows slower, and num_stages=1 on the 64 x 32 key-major tile failing (illegal
    # address).
    128: {
        "fwd": [(64, 32, 4, 3, 2, 1, 168), (64, 32, 4, 4, 2, 1, 168)],
        "dq": [(128, 32, 8, 3, 2, 1), (64, 32, 4, 3, 2, 1), (64, 32, 4, 2, 2, 1), (64, 32, 4, 4, 2, 1)],
        "dkdv": [(64, 32, 4, 2, 2, 1), (64, 32, 4, 3, 2, 1)],
    },
    64: {
        "fwd": [(64, 32, 4, 4, 2, 1, 168), (64, 32, 4, 3, 2, 1, 168)],
        "dq": [(64, 32, 4, 3, 2, 1), (64, 32, 4, 2, 2, 1)],
        "dkdv": [(64, 32, 4, 3, 2, 1), (64, 32, 4, 2, 2, 1)],
    },
}


KERNEL_T = 4096  # sequence length of the per-kernel timings (--kernel-t)


def _problem(D, config):
    """Each kernel of the op at (4, 12, KERNEL_T, 128) or (8, 16, KERNEL_T, 64) on its own, launched with config,
    as closures; record receives each launch's compiled kernel."""
    B, H = (4, 12) if D == 128 else (8, 16)
    q, k, v = inputs(B, H, KERNEL_T, D)
    scale = D ** -0.5
    p = Problem.of(q, k, v, None, KERNEL_T, config)
    record = {}
    o, rem, lo = op.forward(p, q, k, v, scale, False)
    do = torch.randn_like(o)
    drem = torch.zeros_like(rem)
    kept_lo = lo if p.walks_can_stop(lo) else None
    ops = operands.backward_operands(scale, p.DV, do, drem * rem, q, k, v)
    dq, delta_g, tw, tr, chunk = op.backward_dq(p, ops, drem, rem, scale, False)
    # the dk/dv timings advance the carry table in place each call: the same work, the values do not matter
    run = {"fwd": lambda: op.forward(p, q, k, v, scale, False, record),
           "dq": lambda: op.backward_dq(p, ops, drem, rem, scale, False, record),
           "dkdv": lambda: op.backward_dkdv(p, ops, kept_lo, delta_g, tw, tr, chunk, scale, False, record),
           "op": sb_fwd(q, k, v, config)}
    return run, record


def _time_kernel(label, kernel, problem):
    """(median ms or None, a printed line with the compiled kernel's registers, spills and shared memory)."""
    run, record = problem
    try:
        t = ms(run[kernel])
    except Exception as e:  # out of resources for these tiles
        t, line = None, f"{label} {kernel}: failed ({type(e).__name__}: {str(e)[:80]})"
    else:
        ck = record[kernel]
        line = (f"{label} {kernel}: {t:.3f} ms  ({ck.n_regs} registers, {ck.n_spills} spills, "
                f"{ck.metadata.shared} B shared)")
    print(line, flush=True)
    return t, line


def sweep(D, config):
    """Times the candidate tiles of each kernel on its own at (4, 12, T, D); returns (lines, config with the
    fastest tiles)."""
    lines = []
    for kernel, options in CANDIDATES[D].items():
        best = None
        for cfg in options:
            tried = config.with_tile(D, kernel, Tile(*cfg))
            t, line = _time_kernel(f"D={D} {cfg}", kernel, _problem(D, tried))
            lines.append(line)
            if t is not None and (best is None or t < best[0]):
                best = (t, cfg)
        config = config.with_tile(D, kernel, Tile(*best[1]))
        lines.append(f"D={D} {kernel}: best {best[1]}")
        print(lines[-1], flush=True)
    return lines, config


def ablations(config, D=128):
    """What pieces of the kernels cost: the chosen tiles timed with one piece swapped, for measurement only."""
    lines = []

    def timed(label, config):
        problem = _problem(D, config)
        times = []
        for kernel in KERNELS:
            t, line = _time_kernel(f"D={D} {label:28s}", kernel, problem)
            times.append(t)
            lines.append(line)
        return problem[0], times

    run, times = timed("as chosen", config)
    if None not in times:
        # what the op costs beyond its three kernels: operand copies, scales, tables, launches, autograd
        full = time_pair(run["op"])[1]
        lines.append(f"D={D} forward+backward of the op {full:.3f} ms, of which outside the kernels "
                     f"{full - sum(times):.3f} ms")
        print(lines[-1], flush=True)
    timed("A v as bfloat16 hi/lo pair", dataclasses.replace(config, f16_products=False))
    exact = config
    for kernel in KERNELS:
        tile = getattr(config.gpu.tiles(D, torch.bfloat16), kernel)
        exact = exact.with_tile(D, kernel, tile.exact_scans())
    timed("scans by tl.cumsum", exact)
    return lines


def varlen_rows(regime, config, H=12, D=128, tokens=65536, seed=0):
    """Throughput of a packed batch of mixed lengths (uniform in [128, 8192], summing to `tokens`) against an
    equal-length batch whose length L = sum(len^2) / sum(len) gives the same causal work per token (the last row),
    and of that equal-length batch packed as sequences (cu_seqlens) and run through the varlen kernels unpacked,
    which separate the costs of mixing lengths, of the packed layout and of the varlen kernels' code."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(int(torch.randint(128, 8193, (1,), generator=g)), tokens - sum(lengths)))
    work = sum(n * n for n in lengths)
    L = max(64, round(work / tokens / 64) * 64)
    B = max(1, tokens // L)
    rows = []
    name = f"{len(lengths)} sequences, {min(lengths)}..{max(lengths)} tokens"
    packed = [(name, lengths, max(lengths), "max_seqlen given"),
              (name, lengths, None, "max_seqlen read from cu_seqlens"),
              (f"{B} sequences of {L}", [L] * B, L, "packed")]
    for label, lens, max_seqlen, how in packed:
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        q, k, v = inputs(1, H, sum(lens), D, regime=regime)
        t_f, t_fb = time_pair(sb_varlen_fwd(q, k, v, cu, max_seqlen, config))
        rows.append((f"{label} ({how})", (1, H, sum(lens), D), t_f, t_fb, 2 * H * sum(n * n for n in lens) * D))
        del q, k, v
    q, k, v = inputs(B, H, L, D, regime=regime)
    # the batch through the varlen kernels: cu_seqlens [0, L] holds for every batch entry (a call sb_ref refuses,
    # B > 1, that the kernels run as B separate packed batches)
    cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
    t_f, t_fb = time_pair(sb_varlen_fwd(q, k, v, cu, L, config))
    rows.append((f"equal length {L} (varlen kernels, cu_seqlens [0, {L}])", (B, H, L, D), t_f, t_fb,
                 2 * B * H * L * L * D))
    t_f, t_fb = time_pair(sb_fwd(q, k, v, config))
    rows.append((f"equal length {L}", (B, H, L, D), t_f, t_fb, 2 * B * H * L * L * D))
    for name, shape, t_f, t_fb, flops in rows:
        print(f"varlen {name} {shape}: fwd {t_f:.3f} ms {flops / t_f * 1e-9:.1f} TF/s, fwd+bwd {t_fb:.3f} ms "
              f"{3.5 * flops / t_fb * 1e-9:.1f} TF/s", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def accuracy_rows():
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for regime in ("random", "long", "saturated"):
            from test_kernels import make_inputs, run_and_check

            q, k, v, scale = make_inputs(regime, 1, 2, 1, 2048, 128, 128, dtype, seed=1)
            errs = run_and_check(q, k, v, scale, False, label=regime)
            rows.append((str(dtype).replace("torch.", ""), regime, errs))
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="Markdown file to write (default benchmarks/results/<date>.md)")
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles once per shape)")
    ap.add_argument("--sweep", action="store_true", help="tune tile configurations first")
    ap.add_argument("--sweep-dims", default=[128, 64], type=lambda x: [int(d) for d in x.split(",")],
                    help="head dims to sweep, e.g. 128")
    ap.add_argument("--ablate", action="store_true", help="time the kernels with cheaper pieces swapped in")
    ap.add_argument("--shapes", default=None, help="e.g. 4,12,4096,128;8,16,4096,64")
    ap.add_argument("--kernel-t", type=int, default=4096, help="sequence length of --sweep and --ablate")
    ap.add_argument("--regime", default="random", choices=("random", "long"), help="input regime of the speed table")
    ap.add_argument("--early-exit", default=None, choices=("on", "off", "both"),
                    help="set the launch configuration's early_exit, or time both")
    ap.add_argument("--varlen", action="store_true", help="also time a packed batch of mixed lengths")
    args = ap.parse_args()
    config = LaunchConfig()
    if args.early_exit in ("on", "off"):
        config = dataclasses.replace(config, early_exit=args.early_exit == "on")
    global KERNEL_T
    KERNEL_T = args.kernel_t
    from torch.nn.attention import SDPBackend

    warm_up_gpu()
    sweep_lines = []
    for D in args.sweep_dims if args.sweep else []:
        lines, config = sweep(D, config)
        sweep_lines += lines
    sweep_lines += ablations(config) if args.ablate else []
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    rows = []
    for B, H, T, D in shapes:
        q, k, v = inputs(B, H, T, D, regime=args.regime)
        flops = 2 * B * H * T * T * D
        if args.early_exit == "both":
            sb = [(f"sb, exit {'on' if on else 'off'}", lambda on=on: sb_fwd(q, k, v, dataclasses.replace(
                config, early_exit=on))) for on in (False, True)]
        else:
            sb = [("sb (triton)", lambda: sb_fwd(q, k, v, config))]
        impls = sb + [("flash", lambda: sdpa_fwd(q, k, v, SDPBackend.FLASH_ATTENTION)),
                      ("cudnn", lambda: sdpa_fwd(q, k, v, SDPBackend.CUDNN_ATTENTION))]
        if args.flex:
            impls.append(("flex", lambda: flex_fwd(q, k, v)))
        if args.early_exit == "both":
            # off, on, the baselines, on, off: the mean of each pair cancels a drift of the GPU's speed over the
            # seconds between them (clocks, heat)
            impls += sb[::-1]
        times = {}
        for name, make in impls:
            try:
                times.setdefault(name, []).append(time_pair(make()))
            except Exception as e:
                print(f"{name} at {(B, H, T, D)}: unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)
            q.grad = k.grad = v.grad = None
        res = {name: tuple(sum(t) / len(ts) for t in zip(*ts)) for name, ts in times.items()}
        for name, (t_f, t_fb) in res.items():
            base = res.get("flash")
            rf = base[0] / t_f if base else float("nan")
            rfb = base[1] / t_fb if base else float("nan")
            rows.append(((B, H, T, D), name, t_f, flops / t_f * 1e-9, t_fb, 3.5 * flops / t_fb * 1e-9, rf, rfb))
            print(f"{(B, H, T, D)} {name:12s} fwd {t_f:7.3f} ms {rows[-1][3]:6.1f} TF/s ({rf:.3f}x flash)  "
                  f"fwd+bwd {t_fb:7.3f} ms {rows[-1][5]:6.1f} TF/s ({rfb:.3f}x flash)", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    var = varlen_rows(args.regime, config) if args.varlen else []
    acc = accuracy_rows()

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    exit_setting = ("both ways (each timed twice: off, on, baselines, on, off; the means)"
                    if args.early_exit == "both" else "on" if config.early_exit else "off")
    md = [f"# Stick-breaking attention (Triton) vs PyTorch attention", "",
          f"- device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)",
          f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}",
          f"- date: {now}",
          f"- tiles (D=128): {config.gpu.tiles(128, torch.bfloat16)}",
          f"- tiles (D=64): {config.gpu.tiles(64, torch.bfloat16)}",
          f"- input regime of the speed table: {args.regime}; early exit {exit_setting}", "",
          "## Speed (causal, bf16, median of do_bench)", "",
          "TFLOP/s: 2*B*H*T^2*D forward, 3.5x that forward+backward. Ratios are throughput over FLASH_ATTENTION's.", "",
          "| (B, H, T, D) | kernel | fwd ms | fwd TFLOP/s | fwd vs flash | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| fwd+bwd vs flash |",
          "|---|---|---|---|---|---|---|---|"]
    for shape, name, t_f, tf_f, t_fb, tf_fb, rf, rfb in rows:
        md.append(f"| {shape} | {name} | {t_f:.3f} | {tf_f:.1f} | {rf:.3f}x | {t_fb:.3f} | {tf_fb:.1f} | {rfb:.3f}x |")
    if var:
        md += ["", f"## Variable length (bf16, causal, {args.regime} regime)", "",
               "The same work per token in every row; the ratios are each batch's throughput over the "
               "equal-length one's (the last row).", "",
               "| batch | (B, H, T, D) | fwd ms | fwd TFLOP/s | fwd vs equal | fwd+bwd ms | fwd+bwd TFLOP/s "
               "| fwd+bwd vs equal |",
               "|---|---|---|---|---|---|---|---|"]
        *_, (_, _, ef, efb, efl) = var
        for name, shape, t_f, t_fb, flops in var:
            md.append(f"| {name} | {shape} | {t_f:.3f} | {flops / t_f * 1e-9:.1f} | {flops / t_f / (efl / ef):.3f}x "
                      f"| {t_fb:.3f} | {3.5 * flops / t_fb * 1e-9:.1f} | {flops / t_fb / (efl / efb):.3f}x |")
    md += ["", "## Accuracy vs the float64 oracle (B=1, Hq=2, Hk=1, T=2048, D=128, attend_current=False)", "",
           "Relative Frobenius error on the same rounded inputs; loss = (o*dO).sum() + (rem*dRem).sum().", "",
           "| dtype | regime | o | rem | dq | dk | dv |", "|---|---|---|---|---|---|---|"]
    for dt, regime, e in acc:
        md.append(f"| {dt} | {regime} | " + " | ".join(f"{e[n]:.2e}" for n in ("o", "rem", "dq", "dk", "dv")) + " |")
    if sweep_lines:
        md += ["", f"## Tile sweep and ablations at (4, 12, {KERNEL_T}, 128) and (8, 16, {KERNEL_T}, 64)", "", "```"]
        md += sweep_lines + ["```"]
    text = "\n".join(md) + "\n"
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"bench_{now[:10]}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
