"""The capstone's reference results against a fresh run of its solution notebook.

``sb_ref/testing/lessons/capstone_recorded.py`` (which lesson 09 prints beside the learner's table) was written by
``python -m sb_ref.testing.lessons.record_capstone`` from a real run; run again here with the notebook's default
settings for this device, the accuracies must come out within ``record_capstone.TOLERANCE``. The same run shows
that the stick-breaking model trained on the learner's own attention (the lesson 04 or lesson 07 solution beside
it), that it learned what the lesson says it learns, and that the notebook runs top to bottom within its budget.
"""
import copy
from pathlib import Path

import pytest
import torch

from sb_ref.testing.lessons import record_capstone
from sb_ref.testing.lessons.capstone_recorded import RECORDED

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "solutions" / "09_capstone" / "09_capstone.ipynb"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BUDGET_S = 180  # the capstone, top to bottom, on a 2-core CPU (DESIGN.md: every lesson well under five minutes)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    if DEVICE not in RECORDED:
        pytest.skip(f"no recorded capstone run for {DEVICE}: python -m sb_ref.testing.lessons.record_capstone")
    with pytest.MonkeyPatch.context() as patch:  # matplotlib keeps its cache here
        patch.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        return record_capstone.run(NOTEBOOK)


def test_a_fresh_run_gives_the_recorded_accuracies(fresh):
    recorded = RECORDED[DEVICE]
    assert fresh["settings"] == recorded["settings"], "the notebook's settings changed: record it again"
    assert record_capstone.differences(fresh, recorded) == [], (fresh["accuracy"], recorded["accuracy"])


def test_the_stick_breaking_model_runs_on_the_learners_attention_and_generalises(fresh):
    assert fresh["attention"] == {"cpu": "04_tiles", "cuda": "07_triton_backward"}[DEVICE]
    sb, softmax = fresh["accuracy"]["stick_breaking"], fresh["accuracy"]["softmax_rope"]
    assert min(sb) >= 0.95 and softmax[0] >= 0.95, "both models should learn the task at the training length"
    assert softmax[-1] <= sb[-1] - 0.1, "softmax + RoPE should fall behind at 8x the training length"


@pytest.mark.skipif(DEVICE == "cuda", reason="the budget is the 2-core CPU's")
def test_the_capstone_runs_top_to_bottom_within_its_budget(fresh):
    assert fresh["seconds"] < BUDGET_S, f"the capstone took {fresh['seconds']:.0f} s (load {fresh['load']})"


def test_differences_name_every_accuracy_that_moved():
    recorded = {"lengths": [64, 128], "accuracy": {"a": [1.0, 0.9], "b": [1.0, 0.6]}}
    fresh = copy.deepcopy(recorded)
    fresh["accuracy"]["b"][1] += record_capstone.TOLERANCE * 0.9
    assert record_capstone.differences(fresh, recorded) == []
    fresh["accuracy"]["b"][1] = 0.6 + record_capstone.TOLERANCE * 1.1
    assert record_capstone.differences(fresh, recorded) == [("b", 128, fresh["accuracy"]["b"][1], 0.6)]
    with pytest.raises(ValueError, match="different things: lengths"):
        record_capstone.differences({**fresh, "lengths": [64, 256]}, recorded)
