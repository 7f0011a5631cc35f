"""Lesson 08's speed table: milliseconds per (B, H, T, D) as (sb_ref forward, flash forward, sb_ref
forward+backward, flash forward+backward), bf16, causal, from a benchmark run on a GPU. Written by
`python -m sb_ref.testing.lessons.record_lesson08`, not by hand."""

RECORDED = {'source': 'benchmarks/results/h100_2026-11-24_long_regime/bench_long_default.md',
 'device': 'NVIDIA H100 80GB HBM3 (132 SMs)',
 'versions': 'torch 2.11.0+cu130, triton 3.6.0, python 3.12.3',
 'date': '2026-11-24 19:58 UTC',
 'times': {(4, 12, 4096, 128): (0.789, 0.697, 4.714, 2.944),
           (4, 12, 8192, 128): (3.046, 2.595, 17.905, 9.895),
           (2, 12, 16384, 128): (5.756, 4.933, 35.636, 18.348),
           (8, 16, 4096, 64): (1.638, 0.973, 8.973, 4.139)}}
