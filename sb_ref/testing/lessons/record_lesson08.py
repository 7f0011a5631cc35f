"""Records lesson 08's speed table from a benchmark run::

    python -m sb_ref.testing.lessons.record_lesson08 benchmarks/results/<run>/<bench>.md

reads the speed table that ``benchmarks/bench_attention.py`` wrote on a GPU (the rows of sb_ref's kernels and of
PyTorch's FLASH_ATTENTION backend: forward and forward+backward milliseconds per shape) and writes it, with the
device, versions, date and the file it came from, as :data:`~sb_ref.testing.lessons.lesson08_recorded.RECORDED`,
which lesson 08 prints and draws without a GPU. ``tests/test_lesson08_recorded.py`` checks that the record is what
this script reads from that file, and on a GPU that a fresh run's ratios to flash are within :data:`TOLERANCE`.
"""
import argparse
import pprint
import re
from pathlib import Path

#: How far a fresh run's throughput ratio to flash (sb_ref's over FLASH_ATTENTION's) may be from the recorded one:
#: another GPU of the same generation, clocks and drivers move it by some percent.
TOLERANCE = 0.15

RECORDED_FILE = Path(__file__).with_name("lesson08_recorded.py")
KERNELS = {"sb (triton)": "sb", "flash": "flash"}


def read_benchmark(path):
    """{"device", "versions", "date", "times": {(B, H, T, D): (sb fwd, flash fwd, sb fwd+bwd, flash fwd+bwd)}} from
    a bench_attention.py Markdown file; ValueError if it holds no such table."""
    text = Path(path).read_text()
    header = {key: re.search(rf"^- {key}: (.+)$", text, re.M) for key in ("device", "date")}
    versions = re.search(r"^- (torch .+)$", text, re.M)
    if not all(header.values()) or versions is None:
        raise ValueError(f"{path} has no bench_attention.py header (device, versions, date)")
    rows = {}
    for m in re.finditer(r"^\| \((\d+), (\d+), (\d+), (\d+)\) \| ([^|]+?) \| ([\d.]+) \| [\d.]+ \| [\d.]+x \| "
                         r"([\d.]+) \|", text, re.M):
        kernel = KERNELS.get(m.group(5))
        if kernel is not None:
            rows.setdefault(tuple(int(m.group(i)) for i in range(1, 5)), {})[kernel] = (float(m.group(6)),
                                                                                       float(m.group(7)))
    times = {shape: (r["sb"][0], r["flash"][0], r["sb"][1], r["flash"][1]) for shape, r in rows.items()
             if {"sb", "flash"} <= r.keys()}
    if not times:
        raise ValueError(f"{path} has no speed table with rows for sb (triton) and flash")
    return {"device": header["device"].group(1), "versions": versions.group(1), "date": header["date"].group(1),
            "times": times}


def write_record(path, source):
    record = {"source": source, **read_benchmark(path)}
    RECORDED_FILE.write_text(
        '"""Lesson 08\'s speed table: milliseconds per (B, H, T, D) as (sb_ref forward, flash forward, sb_ref\n'
        'forward+backward, flash forward+backward), bf16, causal, from a benchmark run on a GPU. Written by\n'
        '`python -m sb_ref.testing.lessons.record_lesson08`, not by hand."""\n\n'
        f"RECORDED = {pprint.pformat(record, width=116, sort_dicts=False)}\n")
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", type=Path, help="a bench_attention.py Markdown file")
    parser.add_argument("--source", default=None, help="how the record names the file (default: the path given)")
    args = parser.parse_args(argv)
    record = write_record(args.benchmark, args.source or args.benchmark.as_posix())
    print(f"wrote {RECORDED_FILE.name}: {len(record['times'])} shapes on {record['device']}")


if __name__ == "__main__":
    main()
