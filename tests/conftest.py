"""Test-session setup shared by every test file.

Without a CUDA GPU the Triton kernels run through Triton's interpreter, which must be switched on before any
kernel is defined, so it is set here, before anything imports ``sb_ref.kernels``. Subprocesses (notebook kernels,
nbgrader, the course's grader) inherit the environment set here.
"""
import os

import pytest

# Under pytest-xdist (make test runs one worker per core) every worker, and every notebook kernel or grader it
# starts, computes on one thread: two processes with two threads each on two cores run slower than one at a time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread count)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Lesson 09 trains two small models; the notebooks run several times in this suite (as solutions, releases, wrong
# submissions, through nbgrader and the course's grader), so they train for a few steps here: enough to run every
# cell and check, not to learn the task. Learners get the notebook's default.
os.environ.setdefault("SB_CAPSTONE_STEPS", "30")


# The files that take longest on a 2-core CPU, longest first: pytest-xdist hands each file to one worker in
# collection order (make test: --dist loadfile --no-loadscope-reorder), so these start first, not last.
LONGEST_FIRST = ("test_lessons.py", "test_autograder_cli.py", "test_kernels.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
