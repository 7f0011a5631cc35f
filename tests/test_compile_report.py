"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU, and every kernel's products take
Hopper's tensor-core path (wgmma), unserialized, which the interpreter cannot tell: benchmarks/compile_report.py."""
import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="this triton ships no ptxas")
def test_kernels_compile_for_sm90_on_the_wgmma_path():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_report.py"), "--dims", "128"],
                         env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    tables = [_table(block) for block in out.split("\n\n") if "| kernel" in block]
    assert len(tables) == 2, out
    rows, loops = tables
    assert set(rows) == {"fwd", "dq", "dkdv"}, out
    for name, row in rows.items():
        assert int(row["HGMMA"]) > 0 and int(row["HMMA"]) == 0, f"{name} is off the wgmma path:\n{out}"
        assert int(row["registers"]) <= 255 and int(row["MUFU"]) > 0
        assert row["wgmma serialized"] == "no", f"ptxas serialized {name}'s tensor-core products (C7515):\n{out}"
    # the hot loop's budget: found for every kernel, products and exp2s in it, a part of the kernel's instructions
    assert set(loops) == {"fwd", "dq", "dkdv"}, out
    for name, loop in loops.items():
        issue = int(loop["instructions per warp = issue clocks"])
        assert 0 < float(loop["tensor-core clocks"]) and 0 < int(loop["MUFU per warp"]) < issue, out
        assert int(loop["MUFU per warp"]) < int(rows[name]["MUFU"]), out


def _table(block):
    """{first cell: {column: cell}} of a Markdown table within a block of text."""
    lines = [line for line in block.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].split("|")[1:-1]]
    return {cells[0].strip(): dict(zip(header, (c.strip() for c in cells)))
            for cells in (line.split("|")[1:-1] for line in lines[2:])}
