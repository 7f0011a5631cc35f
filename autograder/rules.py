"""What each lesson's notebook may call of the library: an exercise answered with the library's own
implementation of what it asks for earns nothing.

Inside the learner's sandbox, the library files a lesson asks the learner to write again are shown as stubs
(:func:`hidden_files`): the same module, the same names, imports and constants, but every function body replaced by
an error that says which rule it broke (:class:`LibraryCallRefused`). The implementation's text is not in the
sandbox at all, so neither calling it, reloading it nor reading its source gets it back. The checks still compare
with the real library: they run in the grader, which sees the files as they are.

Every lesson's notebook may use numpy, torch, triton and, of ``sb_ref.testing``, ``make_inputs``, ``REGIMES``,
``rel_err`` and the checks; :data:`ALLOWED` says what else, lesson by lesson, and each lesson's introduction says
the same to the learner.
"""
import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shown:
    """How the sandbox shows one library file: ``hide`` names the functions and classes (or ``Class.method``) whose
    bodies are replaced ("*": all, but those in ``keep``); ``forward_only`` names functions that stay, but run
    without autograd (a forward the lesson gives, whose gradient is the exercise)."""

    hide: object = "*"
    keep: tuple = ()
    forward_only: tuple = ()


_ALL = Shown()
# The library's implementations of stick-breaking attention: weights, the op, its kernels, decoding, the layer.
_ATTENTION = {path: _ALL for path in (
    "sb_ref/naive.py", "sb_ref/weights.py", "sb_ref/blocked.py", "sb_ref/attention.py", "sb_ref/decode.py",
    "kernels/op.py", "kernels/forward.py", "kernels/backward.py", "kernels/tile_math.py", "kernels/decode.py")}
_LAYER = {"sb_ref/layer.py": _ALL}
# Never callable from a notebook: the float64 oracle and the checks' reference implementations (but for what a
# check hands the learner's code: lesson 02's gradcheck gets a softmax attention, right and wrong).
_ORACLES = {"sb_ref/testing/core.py": Shown(hide=("oracle_attention",)),
            "sb_ref/testing/lessons/references.py": Shown(keep=("softmax_attention", "BrokenBackward",
                                                                "broken_attention"))}
# Lesson 07 writes the backward: the forward of the weights and of the op is given, their gradients are not.
_BACKWARD = {"sb_ref/naive.py": _ALL, "sb_ref/decode.py": _ALL, "kernels/backward.py": _ALL,
             "kernels/decode.py": _ALL,
             "sb_ref/weights.py": Shown(hide=(), forward_only=("stick_breaking_weights",)),
             "sb_ref/attention.py": Shown(hide=(), forward_only=("stick_breaking_attention",)),
             "sb_ref/blocked.py": Shown(hide=("_log_weight_grads", "_backward", "StickBreakingFunction.backward")),
             "kernels/op.py": Shown(hide=("backward_dq", "backward_dkdv", "backward", "_bwd_op",
                                          "_autograd_backward"))}

#: lesson -> {file in the repository: how the sandbox shows it}
HIDDEN = {
    "00_setup": {"sb_ref/naive.py": Shown(hide=("sigmoid",)), **_ORACLES},
    "01_stick_breaking_numpy": {**_ATTENTION, **_LAYER, **_ORACLES},
    "02_log_space": {**_ATTENTION, **_LAYER, **_ORACLES},
    "03_attention_layer": {**_LAYER, **_ORACLES},
    "04_tiles": {**_ATTENTION, **_LAYER, **_ORACLES},
    "05_triton_primer": {**_ATTENTION, **_LAYER, **_ORACLES},
    "06_triton_forward": {**_ATTENTION, **_LAYER, **_ORACLES},
    "07_triton_backward": {**_BACKWARD, **_LAYER, **_ORACLES},
    "08_performance": {**_ATTENTION, **_LAYER, **_ORACLES},
    # The capstone trains on the learner's earlier work, or on the library's attention where that is not reachable
    # (always in this sandbox, which shows only the lesson's folder); its checks build their reference models in the
    # notebook's kernel, so references.py stays.
    "09_capstone": {"sb_ref/testing/core.py": Shown(hide=("oracle_attention",))},
}

#: lesson -> what its exercises may call of sb_ref beyond sb_ref.testing's make_inputs, REGIMES, rel_err and checks
ALLOWED = {
    "03_attention_layer": "`sb_ref.stick_breaking_attention` (the layer around it is the exercise)",
    "07_triton_backward": "the forward of `sb_ref.stick_breaking_weights` and `sb_ref.stick_breaking_attention` "
                          "(the gradients are the exercise)",
    "09_capstone": "the rest of `sb_ref`, `StickBreakingSelfAttention` included",
}

# Lessons whose checks count a kernel's loads (sb_ref.testing.loads): on a CPU those kernels are run again on their own.
LOADS_COUNTED = ("05_triton_primer", "08_performance")


class LibraryCallRefused(RuntimeError):
    """Raised, in the learner's sandbox, by a library function that the lesson asks the learner to write."""


def _refusal(lesson, qualified):
    message = (f"{qualified} is the library's own implementation of what lesson {lesson} asks you to write; it is "
               "not available while grading, and an answer that calls it earns no points (the lesson's "
               "introduction lists what you may use)")
    return ast.parse(f"raise __import__('autograder.rules').rules.LibraryCallRefused({message!r})").body


_NO_GRAD = ast.parse("with __import__('torch').no_grad():\n    pass").body[0]


class _Stub(ast.NodeTransformer):
    def __init__(self, lesson, module, shown):
        self.lesson, self.module, self.shown, self.scope = lesson, module, shown, []

    def _hidden(self, local):
        top = local.split(".")[0]
        if self.shown.hide == "*":
            return top not in self.shown.keep
        return local in self.shown.hide or top in self.shown.hide

    def visit_FunctionDef(self, node):
        local = ".".join([*self.scope, node.name])
        doc = ast.get_docstring(node, clean=False)
        head = [node.body[0]] if doc else []
        if self._hidden(local):
            node.body = head + _refusal(self.lesson, f"{self.module}.{local}")
        elif local in self.shown.forward_only:
            block = ast.With(items=_NO_GRAD.items, body=node.body[len(head):])
            node.body = head + [block]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()
        return node


def library_file(path):
    """Where the library file ``path`` ("sb_ref/..." or "kernels/...", as in the repository) is installed."""
    import importlib.util

    package = "sb_ref.kernels" if path.startswith("kernels/") else "sb_ref"
    return Path(importlib.util.find_spec(package).origin).parent / path.split("/", 1)[1]


def stub_source(path, lesson, shown=_ALL):
    """The text of the library file at ``path`` (relative to the repository) as the sandbox shows it (a
    :class:`Shown`): hidden bodies replaced by a :class:`LibraryCallRefused`, given forwards without autograd."""
    module = path[:-len(".py")].replace("/", ".").replace("kernels.", "sb_ref.kernels.", 1)
    tree = _Stub(lesson, module, shown).visit(ast.parse(library_file(path).read_text()))
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def hidden_files(lesson):
    """{file in the repository: the stub the sandbox shows in its place} for ``lesson`` (a lesson folder's name;
    a notebook of no lesson hides nothing)."""
    return {path: stub_source(path, lesson, shown) for path, shown in HIDDEN.get(lesson, {}).items()}


def what_you_may_use(lesson):
    """The markdown cell each lesson shows after its introduction: which library calls its exercises may make."""
    hidden = HIDDEN.get(lesson, {})
    if lesson == "00_setup":
        refused = ["`sb_ref.naive.sigmoid`"]
    elif lesson == "07_triton_backward":
        refused = ["the gradients of `sb_ref.stick_breaking_weights` and `sb_ref.stick_breaking_attention` (both run "
                   "without autograd here)", "the library's backward kernels", "`StickBreakingSelfAttention`"]
    elif "sb_ref/attention.py" in hidden:
        refused = ["`sb_ref.naive`", "`sb_ref.stick_breaking_weights`", "`sb_ref.stick_breaking_attention`",
                   "`sb_ref.stick_breaking_decode`", "the library's Triton kernels", "`StickBreakingSelfAttention`"]
    elif "sb_ref/layer.py" in hidden:
        refused = ["`StickBreakingSelfAttention`"]
    else:
        refused = []
    refused.append("the float64 oracle `sb_ref.testing.oracle_attention`")
    if "sb_ref/testing/lessons/references.py" in hidden:
        refused.append("the checks' reference implementations")
    listed = refused[0] if len(refused) == 1 else ", ".join(refused[:-1]) + " and " + refused[-1]
    verb = "is a stub" if len(refused) == 1 else "are stubs"
    allowed = f" You may also call {ALLOWED[lesson]}." if lesson in ALLOWED else ""
    if lesson in LOADS_COUNTED:
        allowed += (" Your Triton kernels stay plain `@triton.jit` functions: on a CPU the grader counts their loads by "
                    "running them again on their own, which accepts `tl`, your other kernels and number constants, "
                    "nothing else of the notebook.")
    return (f"**What your code may use.** While graded, this notebook runs in a sandbox where {listed} {verb}: an "
            "exercise answered by calling them earns no points, and its message says so. Use numpy, PyTorch and "
            "Triton, your own functions from this and earlier lessons, and of `sb_ref.testing`: `make_inputs`, "
            f"`REGIMES`, `rel_err` and the checks.{allowed}")
