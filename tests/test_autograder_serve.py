"""autograder.serve, the learner kernel's side of the grader's calls: what it sets up in the kernel before any learner
code runs."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# A kernel that the GPU compiles: its loop count is a one-element block.
PROGRAM = textwrap.dedent('''
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import sys
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    if sys.argv[1] == "old":  # the interpreter as Triton 3.6 has it: int() of the block's 1-d array
        newer = interpreter._patch_lang_tensor

        def patch_lang_tensor(tensor, scope):
            newer(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(1)))

        interpreter._patch_lang_tensor = patch_lang_tensor
    if sys.argv[2] == "served":
        import autograder.serve  # noqa: F401

    @triton.jit
    def count_blocks(out, n, BLOCK: tl.constexpr):
        total = 0.0
        for i in range(tl.cdiv(tl.minimum(n, 1000), BLOCK)):
            total += 1.0
        tl.store(out, total)

    out = torch.zeros(1)
    try:
        count_blocks[(1,)](out, 100, BLOCK=16)
        print("ran", int(out.item()))
    except Exception as exc:
        print("failed", repr(exc))
''')


def _run(interpreter, setup):
    done = subprocess.run([sys.executable, "-c", PROGRAM, interpreter, setup], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(tuple(map(int, np.__version__.split(".")[:2])) < (2, 4),
                    reason="numpy < 2.4 still converts a one-element array to int")
def test_a_one_element_block_indexes_in_the_graders_interpreter_kernels():
    assert _run("old", "plain").startswith("failed"), "the stand-in for Triton 3.6's interpreter should fail here"
    assert _run("old", "served") == "ran 7"
    assert _run("current", "served") == "ran 7"
    assert _run("current", "plain") == "ran 7"
