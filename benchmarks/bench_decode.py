"""Speed of stick-breaking decoding (sb_ref.stick_breaking_decode) against SDPA on the same single-query problem,
and against the GPU's copy bandwidth.

    python benchmarks/bench_decode.py [--out results.md] [--shapes "8,32,8,128;1,32,8,128"] [--lengths 4096,32768]
    python benchmarks/bench_decode.py --sweep [--shapes ...] [--lengths ...]

bf16, one new query per sequence (Tn = 1) against a full cache of T positions (cache_seqlens = T), for T in
{4096, 32768, 131072} and (B, Hq, Hk, D) in {(8, 32, 8, 128), (1, 32, 8, 128)}. Times are medians of
triton.testing.do_bench:

- ``sb kernel``: sb_ref.kernels.stick_breaking_decode_triton with the cache length given (no host sync);
- ``sb op``: the public sb_ref.stick_breaking_decode, whose input checks read cache_seqlens (one sync per call);
- ``sdpa``: scaled_dot_product_attention on the single query against the whole (valid) cache, not causal (a lone
  last query sees every key), FLASH_ATTENTION backend, else EFFICIENT_ATTENTION, with ``enable_gqa=True`` where
  that backend takes it and otherwise k and v repeated to Hq heads beforehand (outside the timing; the table
  says which).

GB/s counts the bytes a decode must move: k and v of the valid cache, q and o (the split workspace, a few KB, is
not counted), over the time; "of copy" divides that by the bandwidth of a large device-to-device copy
(``y.copy_(x)``, read + write) measured in the same process. Decoding reads each key and value once and does
O(rows) flops per byte, so it is memory-bound: the copy bandwidth is its roofline.

``--sweep`` times the split kernel and its combine (the cache length given) over tile shapes (BLOCK_N, num_warps,
num_stages: DecodeConfig.tiles) and split counts (about 1 to 8 programs per SM over the (batch, kv-head) work
items) per (shape, T), best first, to choose DecodeConfig.tiles and the split rule (decode.split_count).
"""
import argparse
import datetime
import os
import platform

import torch

SHAPES = [(8, 32, 8, 128), (1, 32, 8, 128)]
LENGTHS = [4096, 32768, 131072]
ELEMENT = 2  # bytes of a bf16 value


def decode_bytes(B, Hq, Hk, T, D, Dv=None, tn=1, element=ELEMENT):
    """Bytes a decode step must move: k and v of the valid cache, q read and o written."""
    Dv = D if Dv is None else Dv
    return element * (B * Hk * T * (D + Dv) + B * Hq * tn * (D + Dv))


def markdown(meta, rows):
    """The report: a header of (label, value) pairs, then one table row per (shape, T)."""
    md = ["# Stick-breaking decoding vs SDPA (bf16, one query per sequence)", ""]
    md += [f"- {label}: {value}" for label, value in meta]
    md += ["", "| (B, Hq, Hk, D) | T | sb kernel ms | sb op ms | sb GB/s | of copy | sdpa ms | sdpa GB/s | sdpa path "
           "| sb / sdpa time | splits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['T']} | {r['sb_ms']:.4f} | {r['op_ms']:.4f} | {r['sb_gbs']:.0f} | "
                  f"{r['frac']:.2f} | {r['sdpa_ms']:.4f} | {r['sdpa_gbs']:.0f} | {r['sdpa_path']} | "
                  f"{r['sb_ms'] / r['sdpa_ms']:.2f}x | {r['splits']} |")
    return "\n".join(md) + "\n"


def ms(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(nbytes=4 << 30):
    """GB/s of a device-to-device copy of nbytes (counted twice: read and write)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / t * 1e-6


def sdpa_call(q, k, v):
    """A function timing SDPA on the problem and a word on how it runs (backend, GQA handling), or (None, why)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    group = q.shape[1] // k.shape[1]
    errors = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        name = backend.name.replace("_ATTENTION", "").lower()
        for gqa in ((True, False) if group > 1 else (False,)):
            kk, vv = (k, v) if gqa or group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
            kw = {"enable_gqa": True} if gqa else {}

            def f(kk=kk, vv=vv, kw=kw, backend=backend):
                with sdpa_kernel(backend):
                    return sdpa(q, kk, vv, **kw)
            try:
                f()
                torch.cuda.synchronize()
            except Exception as e:  # backend or enable_gqa not available for this build / shape
                errors.append(f"{name}{' gqa' if gqa else ''}: {type(e).__name__}")
                continue
            how = name + (" (enable_gqa)" if gqa else (f" (k, v repeated x{group})" if group > 1 else ""))
            return f, how
    return None, "; ".join(errors)


def problem(B, Hq, Hk, D, T):
    """One new bf16 query per sequence against a full cache of T positions: q, k_cache, v_cache, cache_seqlens."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hk, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hk, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v, torch.full((B,), T, dtype=torch.int32, device="cuda")


def run(shapes, lengths):
    import sb_ref
    from sb_ref.kernels import DecodeConfig
    from sb_ref.kernels import decode as KD
    from sb_ref.kernels import stick_breaking_decode_triton

    bw = copy_bandwidth()
    rows = []
    for B, Hq, Hk, D in shapes:
        for T in lengths:
            q, k, v, lens = problem(B, Hq, Hk, D, T)
            scale = D ** -0.5
            t_sb = ms(lambda: stick_breaking_decode_triton(q, k, v, lens, scale, True, max_seqlen=T))
            t_op = ms(lambda: sb_ref.stick_breaking_decode(q, k, v, lens))
            f, how = sdpa_call(q, k, v)
            t_sdpa = ms(f) if f is not None else float("nan")
            nbytes = decode_bytes(B, Hq, Hk, T, D)
            splits = KD.plan(DecodeConfig(), B, Hq, Hk, 1, T, q.device)[2]
            row = dict(shape=(B, Hq, Hk, D), T=T, sb_ms=t_sb, op_ms=t_op, sb_gbs=nbytes / t_sb * 1e-6,
                       frac=nbytes / t_sb * 1e-6 / bw, sdpa_ms=t_sdpa, sdpa_gbs=nbytes / t_sdpa * 1e-6,
                       sdpa_path=how if f is not None else f"unavailable ({how})", splits=splits)
            rows.append(row)
            print(row, flush=True)
            del q, k, v, f
            torch.cuda.empty_cache()
    return bw, rows


def sweep(shapes, lengths, top=8):
    """Markdown lines: for each (shape, T), the fastest (BLOCK_N, warps, stages, splits) and the committed choice."""
    import dataclasses
    import itertools

    import triton
    from sb_ref.kernels import DecodeConfig
    from sb_ref.kernels import decode as KD
    from sb_ref.kernels import stick_breaking_decode_triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    lines = [f"copy bandwidth {bw:.0f} GB/s", ""]
    config = DecodeConfig()
    committed = config.tile(128, False)
    for B, Hq, Hk, D in shapes:
        for T in lengths:
            q, k, v, lens = problem(B, Hq, Hk, D, T)
            nbytes = decode_bytes(B, Hq, Hk, T, D)
            _, n_rb, planned = KD.plan(config, B, Hq, Hk, 1, T, q.device)
            items = B * Hk * n_rb
            splits = sorted({planned} | {max(1, min(T // 128, triton.cdiv(p * sms, items)))
                                         for p in (1, 2, 3, 4, 6, 8)})
            rows = []
            for (bn, warps, stages), n_split in itertools.product(
                    itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)), splits):
                tried = dataclasses.replace(config.with_tile(128, (bn, warps, stages)), splits=n_split)
                try:
                    t = triton.testing.do_bench(
                        lambda: stick_breaking_decode_triton(q, k, v, lens, D ** -0.5, True, max_seqlen=T,
                                                             config=tried), warmup=10, rep=40,
                        return_mode="median")
                except Exception as e:  # a tile that does not fit (shared memory, registers)
                    print(f"({bn}, {warps}, {stages}) x {n_split}: {type(e).__name__}", flush=True)
                    continue
                rows.append((t, bn, warps, stages, n_split))
            rows.sort()
            now = next(r for r in rows if r[1:4] == committed and r[4] == planned)
            lines += [f"### (B, Hq, Hk, D) = {(B, Hq, Hk, D)}, T = {T} ({items} work items)", "",
                      "| BLOCK_N | warps | stages | splits | ms | of copy |", "|---|---|---|---|---|---|"]
            for t, bn, warps, stages, n_split in rows[:top] + [now]:
                mark = " (committed)" if (bn, warps, stages, n_split) == now[1:] else ""
                lines.append(f"| {bn} | {warps} | {stages} | {n_split}{mark} | {t:.4f} | "
                             f"{nbytes / t * 1e-6 / bw:.2f} |")
            lines.append("")
            print("\n".join(lines[-top - 5:]), flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="Markdown file to write (default benchmarks/results/decode_<date>.md)")
    ap.add_argument("--shapes", default=None, help="(B, Hq, Hk, D) list, e.g. '8,32,8,128;1,32,8,128'")
    ap.add_argument("--lengths", default=None, help="cache lengths, e.g. 4096,32768,131072")
    ap.add_argument("--sweep", action="store_true", help="time tile shapes and split counts instead")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    lengths = LENGTHS if args.lengths is None else [int(x) for x in args.lengths.split(",")]
    import triton
    if args.sweep:
        text = "\n".join(["# Decode sweep (bf16, one query per sequence, D = 128)", ""] + sweep(shapes, lengths))
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return
    bw, rows = run(shapes, lengths)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    props = torch.cuda.get_device_properties(0)
    meta = [("device", f"{props.name} ({props.multi_processor_count} SMs)"),
            ("versions", f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"),
            ("date", now),
            ("copy bandwidth", f"{bw:.0f} GB/s (device-to-device copy of 4 GiB, read + write, same process)"),
            ("bytes counted", "k and v of the valid cache + q + o, bf16; GB/s = bytes / time")]
    text = markdown(meta, rows)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"decode_{now[:10]}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
