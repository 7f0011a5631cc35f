"""Test-session setup shared by every test file.

Without a CUDA GPU the Triton kernels run through Triton's interpreter, which must be switched on before any
kernel is defined, so it is set here, before anything imports ``sb_ref.kernels``. Subprocesses (notebook kernels,
nbgrader, the course's grader) inherit the environment set here.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Lesson 09 trains two small models; the notebooks run several times in this suite (as solutions, releases, wrong
# submissions, through nbgrader and the course's grader), so they train for a few steps here: enough to run every
# cell and check, not to learn the task. Learners get the notebook's default.
os.environ.setdefault("SB_CAPSTONE_STEPS", "30")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
