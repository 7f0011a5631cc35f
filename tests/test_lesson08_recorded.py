"""Lesson 08's recorded speed table (sb_ref/testing/lessons/lesson08_recorded.py): it is what record_lesson08
reads from the benchmark file it names, the notebook takes its numbers from it, and on a GPU a fresh run's ratio
to flash lands within the recorder's tolerance (marked `gpu`)."""
import json
import os

import pytest
import torch

from sb_ref.testing.lessons import record_lesson08
from sb_ref.testing.lessons.lesson08_recorded import RECORDED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_record_is_what_the_recorder_reads_from_its_benchmark_file():
    read = record_lesson08.read_benchmark(os.path.join(ROOT, RECORDED["source"]))
    assert {"source": RECORDED["source"], **read} == RECORDED
    assert len(RECORDED["times"]) == 4 and all(len(t) == 4 and min(t) > 0 for t in RECORDED["times"].values())


def test_a_file_without_a_speed_table_is_refused(tmp_path):
    path = tmp_path / "bench.md"
    path.write_text("- device: X\n- torch 2, triton 3\n- date: today\n\n| nothing | here |\n")
    with pytest.raises(ValueError, match="no speed table"):
        record_lesson08.read_benchmark(path)
    path.write_text("| (4, 12, 4096, 128) | sb (triton) | 0.789 | 261.1 | 0.883x | 4.714 | 153.1 | 0.624x |\n")
    with pytest.raises(ValueError, match="header"):
        record_lesson08.read_benchmark(path)


def test_the_notebook_takes_its_numbers_from_the_record():
    for folder in ("solutions", "lessons"):
        path = os.path.join(ROOT, folder, "08_performance", "08_performance.ipynb")
        source = "".join("".join(cell["source"]) for cell in json.load(open(path))["cells"])
        assert "from sb_ref.testing.lessons.lesson08_recorded import RECORDED" in source
        for times in RECORDED["times"].values():  # no millisecond of the record typed in by hand
            assert not any(f"{t:.3f}" in source for t in times), (folder, times)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_fresh_run_lands_near_the_record():
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import sb_ref
    shape = (4, 12, 4096, 128)
    sb_ms, flash_ms = RECORDED["times"][shape][:2]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(*shape, device="cuda", generator=g) for _ in range(3))
    u = torch.nn.functional.normalize(torch.randn(shape[-1], device="cuda", generator=g), dim=0)
    a = (8.0 * shape[-1] ** 0.5) ** 0.5  # the long regime of the benchmark: logits near -8
    q, k, v = (x.to(torch.bfloat16) for x in (a * u + 0.02 * q, -a * u + 0.02 * k, v))

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    with torch.no_grad():
        t_sb = triton.testing.do_bench(lambda: sb_ref.stick_breaking_attention(q, k, v), return_mode="median")
        t_flash = triton.testing.do_bench(flash, return_mode="median")
    fresh, recorded = t_flash / t_sb, flash_ms / sb_ms
    assert abs(fresh / recorded - 1) <= record_lesson08.TOLERANCE, (fresh, recorded)
