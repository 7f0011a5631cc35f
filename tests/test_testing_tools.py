"""sb_ref.testing: the oracle, the input regimes, the error measure and the allocation probe; the docstrings'
examples, which must run as written; and what importing sb_ref and sb_ref.testing loads (the library only, the course's
checks only on demand)."""
import doctest
import importlib
import subprocess
import sys

import pytest
import torch

import sb_ref
from reference import attention as reference_attention
from sb_ref.testing import LargestAllocation, make_inputs, oracle_attention, rel_err


@pytest.mark.parametrize("regime", sb_ref.testing.REGIMES)
def test_oracle_matches_the_reference(regime):
    q, k, v = make_inputs(regime, Hq=4, Hk=2, T=70, D=16, Dv=8)
    cu = torch.tensor([0, 1, 30, 70])
    for kw in ({}, {"attend_current": True}, {"cu_seqlens": cu, "scale": 0.3}):
        o, rem = oracle_attention(q, k, v, **kw)
        o_ref, rem_ref = reference_attention(q, k, v, **kw)
        assert rel_err(o, o_ref) < 1e-13 and rel_err(rem, rem_ref) < 1e-13


def test_regimes_have_the_advertised_logits():
    T, D = 512, 64
    logits = {}
    for regime in sb_ref.testing.REGIMES:
        q, k, v = make_inputs(regime, T=T, D=D, dtype=torch.float64)
        logits[regime] = (q @ k.transpose(-1, -2)) * D ** -0.5
    assert abs(float(logits["random"].std()) - 1) < 0.1
    assert -8.5 < float(logits["long"].mean()) < -7.5 and float(logits["long"].std()) < 1
    assert 40 < float(logits["saturated"].abs().max()) < 80
    # in the long regime the last query still holds most of its stick after hundreds of keys
    q, k, v = make_inputs("long", T=T, D=D, dtype=torch.float64)
    _, rem = oracle_attention(q, k, v)
    assert float(rem[..., -1].min()) > 0.5


def test_make_inputs_options():
    q, k, v = make_inputs("random", B=2, Hq=4, Hk=1, T=5, D=3, Dv=7, dtype=torch.bfloat16, requires_grad=True)
    assert q.shape == (2, 4, 5, 3) and k.shape == (2, 1, 5, 3) and v.shape == (2, 1, 5, 7)
    assert q.dtype == torch.bfloat16 and q.requires_grad and q.is_leaf
    a, b = make_inputs("random", seed=3)[0], make_inputs("random", seed=3)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="regime"):
        make_inputs("uniform")


def test_rel_err():
    ref = torch.tensor([3.0, 4.0])
    assert rel_err(ref, ref) == 0
    assert rel_err(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_err(torch.zeros(0), torch.zeros(0)) == 0


def test_largest_allocation_ignores_views_and_counts_new_storage():
    x = torch.zeros(100, 100)
    with LargestAllocation() as probe:
        x.view(10, 1000).t()
        y = x[:2].clone()
    assert probe.numel == y.numel() == 200


@pytest.mark.parametrize("module", ["sb_ref.naive", "sb_ref.weights", "sb_ref.attention", "sb_ref.layer",
                                    "sb_ref.testing.core", "sb_ref.testing.speed"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def _loaded_after(code):
    """The sb_ref modules a fresh interpreter has loaded after running ``code``."""
    probe = code + "\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if m.startswith('sb_ref'))))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_import_sb_ref_loads_the_library_only():
    loaded = _loaded_after("import sb_ref")
    assert "sb_ref.attention" in loaded
    assert not any(m.startswith("sb_ref.testing") for m in loaded), sorted(loaded)


def test_sb_ref_testing_is_imported_on_first_use_and_without_the_lessons():
    loaded = _loaded_after("import sb_ref\nassert sb_ref.testing.make_inputs is sb_ref.testing.core.make_inputs")
    assert "sb_ref.testing" in loaded
    assert not any(m.startswith("sb_ref.testing.lessons") for m in loaded), sorted(loaded)
    assert "sb_ref.testing.speed" not in loaded
