"""Counting a learner's Triton loads where no learner code runs: the record checked, the launches replayed.

The checks that read a kernel's loads under the interpreter (:mod:`sb_ref.testing.loads`) get, from the learner's
kernel, a record of the launches its function made: each ``@triton.jit`` function's source, the number constants it
names, and every launch's grid and arguments (tensors as bytes, with their views). :func:`kernel_cell` accepts a
record only if each source is one plain Triton function: statements and expressions of the kinds a kernel body is
made of, names that are its own locals, the record's kernels and constants, ``tl``/``triton.language`` or a few
builtins, and attributes that are public parts of ``triton.language`` or of its tensors (no imports, no closures,
no dunders, nothing that reaches Python itself). :class:`Replayer` then defines those functions, and nothing else
of the learner's, in a fresh sandboxed kernel, and runs the launches there with the loads watched
(:func:`sb_ref.testing.loads.replay_launches`). What that kernel reports is the grader's own measurement.
"""
import ast
import tempfile
import types

from .kernel import LearnerKernel
from .remote import LearnerCrash, LearnerError, LearnerTimeout, RemoteFunction, RemoteSession
from .sandbox import Sandbox

REPLAY = "sb_ref.testing.loads:replay_launches"
BUILTINS = frozenset({"range", "min", "max", "int", "float", "bool", "abs", "len"})
MODULES = frozenset({"tl", "triton"})
MAX_SOURCE_CHARS, MAX_KERNELS, MAX_LAUNCHES, MAX_ARGS, MAX_PROGRAMS = 40_000, 16, 16, 64, 1 << 14
MAX_TENSOR_BYTES = 256 << 20

_STATEMENTS = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.While, ast.If, ast.Return,
               ast.Pass, ast.Break, ast.Continue, ast.Assert)
_EXPRESSIONS = (ast.Name, ast.Constant, ast.Attribute, ast.Call, ast.keyword, ast.BinOp, ast.UnaryOp, ast.BoolOp,
                ast.Compare, ast.IfExp, ast.Subscript, ast.Slice, ast.Tuple, ast.List)
_PARTS = (ast.arguments, ast.arg, ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop)


class RecordRefused(ValueError):
    """A record of launches that the grader does not replay; the message says why, for the learner."""


def _tensor_attributes():
    import triton.language as tl
    return frozenset(n for n in dir(tl.tensor) if not n.startswith("_")) | {"dtype", "shape", "numel", "value", "element_ty"}


def _language_path(node):
    """The attribute names of ``tl.a.b`` / ``triton.language.a.b`` below triton.language, or None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in MODULES:
        return None
    names.reverse()
    if node.id == "triton":
        if not names or names[0] != "language":
            raise RecordRefused("a kernel may use triton.language (tl) only, not other parts of triton")
        names = names[1:]
    return names


def _check_language(names, where):
    import triton.language as tl

    obj = tl
    for name in names:
        if name.startswith("_"):
            raise RecordRefused(f"{where}: tl.{'.'.join(names)} is not a public part of triton.language")
        obj = getattr(obj, name, None)
        if obj is None:
            raise RecordRefused(f"{where}: triton.language has no {'.'.join(names)}")
        if isinstance(obj, types.ModuleType):
            module = obj.__name__
        elif isinstance(getattr(obj, "fn", None), types.FunctionType):  # tl's own @triton.jit functions
            module = obj.fn.__module__
        else:
            module = getattr(obj, "__module__", None) or type(obj).__module__
        if not str(module).startswith("triton.language"):
            raise RecordRefused(f"{where}: tl.{'.'.join(names)} is not part of triton.language")


def _locals(fn):
    bound = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    return bound


def check_kernel_source(name, source, kernels, constants):
    """The parsed function ``name`` if ``source`` is a plain Triton function, else :class:`RecordRefused`."""
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        raise RecordRefused(f"the source of {name} is not a kernel's")
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise RecordRefused(f"the source of {name} does not parse: {exc}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef) or tree.body[0].name != name:
        raise RecordRefused(f"the source recorded for {name} is not one function of that name")
    fn = tree.body[0]
    fn.decorator_list = []  # the replay's own @triton.jit takes their place
    where = f"kernel {name}"
    if fn.args.vararg or fn.args.kwarg:
        raise RecordRefused(f"{where}: a Triton kernel takes no *args or **kwargs")
    local = _locals(fn)
    reserved = (local & (MODULES | BUILTINS | set(kernels))) - {a.arg for a in fn.args.args}
    if reserved or any(a.arg in MODULES for a in fn.args.args):
        raise RecordRefused(f"{where}: it rebinds {sorted(reserved or MODULES)[0]}")
    allowed_attributes = _tensor_attributes()
    for node in ast.walk(fn):
        if node is fn:
            continue
        if isinstance(node, ast.FunctionDef) or not isinstance(node, (*_STATEMENTS, *_EXPRESSIONS, *_PARTS)):
            raise RecordRefused(f"{where}: line {getattr(node, 'lineno', '?')} uses {type(node).__name__}, which a "
                                "Triton kernel body does not need (the grader replays plain Triton only)")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, bool, str, type(None))):
            raise RecordRefused(f"{where}: a constant of type {type(node.value).__name__}")
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local | MODULES | \
                BUILTINS | set(kernels) | set(constants):
            raise RecordRefused(f"{where}: it uses `{node.id}`, which is none of its own names, tl, another "
                                "@triton.jit function or a number constant")
        if isinstance(node, ast.Attribute):
            path = _language_path(node)
            if path is not None:
                _check_language(path, where)
            elif node.attr not in allowed_attributes:
                raise RecordRefused(f"{where}: `.{node.attr}` is not an attribute of a Triton tensor")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in local:
            raise RecordRefused(f"{where}: it calls its own variable `{node.func.id}`")
    fn.decorator_list = [ast.parse("triton.jit", mode="eval").body]
    return fn


def _check_value(item, n_tensors, where):
    if not isinstance(item, dict) or len(item) != 1:
        raise RecordRefused(f"{where}: not an argument of a record")
    if "value" in item:
        value = item["value"]
        if not (value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 64)):
            raise RecordRefused(f"{where}: an argument of type {type(value).__name__}")
        return
    entry = item.get("tensor")
    from sb_ref.testing.loads import DTYPES
    if not (isinstance(entry, dict) and set(entry) == {"storage", "dtype", "offset", "size", "stride"}
            and entry["dtype"] in DTYPES and isinstance(entry["storage"], int) and 0 <= entry["storage"] < n_tensors
            and isinstance(entry["offset"], int) and entry["offset"] >= 0
            and isinstance(entry["size"], list) and isinstance(entry["stride"], list)
            and len(entry["size"]) == len(entry["stride"]) <= 8
            and all(isinstance(s, int) and s >= 0 for s in entry["size"] + entry["stride"])):
        raise RecordRefused(f"{where}: not a tensor of a record")


def kernel_cell(record):
    """The code that defines the record's kernels in the replay kernel (checked: see the module's notes)."""
    if not (isinstance(record, dict) and set(record) == {"tensors", "kernels", "constants", "launches"}):
        raise RecordRefused("not a record of launches")
    tensors, kernels, constants, launches = (record[k] for k in ("tensors", "kernels", "constants", "launches"))
    import torch
    if not (isinstance(tensors, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                                              for t in tensors)
            and sum(t.numel() for t in tensors) <= MAX_TENSOR_BYTES):
        raise RecordRefused("the record's tensors are not byte buffers of a bounded size")
    if not isinstance(kernels, dict) or len(kernels) > MAX_KERNELS:
        raise RecordRefused(f"a record holds at most {MAX_KERNELS} kernels")
    if not (isinstance(constants, dict) and len(constants) <= 256
            and all(isinstance(v, (bool, int, float)) for v in constants.values())):
        raise RecordRefused("a kernel's constants must be numbers")
    names = [*kernels, *constants]
    if not all(isinstance(n, str) and n.isidentifier() and not n.startswith("__") and n not in MODULES | BUILTINS
               for n in names) or len(set(names)) != len(names):
        raise RecordRefused("the record's names are not plain names")
    if not (isinstance(launches, list) and len(launches) <= MAX_LAUNCHES):
        raise RecordRefused(f"at most {MAX_LAUNCHES} launches are replayed")
    for i, launch in enumerate(launches):
        where = f"launch {i}"
        if not (isinstance(launch, dict) and set(launch) == {"kernel", "grid", "args", "kwargs"}
                and launch["kernel"] in kernels and isinstance(launch["grid"], list) and 1 <= len(launch["grid"]) <= 3
                and all(isinstance(g, int) and g >= 0 for g in launch["grid"])
                and isinstance(launch["args"], list) and isinstance(launch["kwargs"], dict)
                and len(launch["args"]) + len(launch["kwargs"]) <= MAX_ARGS
                and all(isinstance(k, str) and k.isidentifier() for k in launch["kwargs"])):
            raise RecordRefused(f"{where} is not a launch of a record")
        programs = 1
        for g in launch["grid"]:
            programs *= g
        if programs > MAX_PROGRAMS:
            raise RecordRefused(f"{where} has {programs} programs, more than the replay's {MAX_PROGRAMS}")
        for item in [*launch["args"], *launch["kwargs"].values()]:
            _check_value(item, len(tensors), where)
    module = ast.Module(body=[*ast.parse("import triton\nimport triton.language as tl").body,
                              *[ast.Assign([ast.Name(n, ast.Store())], ast.Constant(v)) for n, v in constants.items()],
                              *[check_kernel_source(n, s, kernels, constants) for n, s in kernels.items()]],
                        type_ignores=[])
    return ast.unparse(ast.fix_missing_locations(module))


class Replayer:
    """A fresh sandboxed kernel (no lesson folder, the interpreter on, no GPU) for one notebook's replays."""

    def __init__(self, limits, sandboxed, timeout):
        self._folder = tempfile.TemporaryDirectory(prefix="autograder-replay-")
        self.sandbox = Sandbox(self._folder.name, limits, enabled=sandboxed)
        self.timeout = timeout
        self.kernel = self.session = None

    def replay(self, record, watched, result):
        """``{"elements", "widest", "error"}`` for the record's launches (see :mod:`sb_ref.testing.loads`)."""
        try:
            cell = kernel_cell(record)
        except RecordRefused as exc:
            return {"error": f"your kernel's loads could not be counted: {exc}"}
        try:
            if self.kernel is None:
                self.kernel = LearnerKernel(self.sandbox, env={"TRITON_INTERPRET": "1", "MPLBACKEND": "Agg"})
                self.kernel.start()
                self.session = RemoteSession(self.kernel, self.timeout)
                self.session.bootstrap()
            outcome = self.kernel.run(cell, timeout=self.timeout)
            if outcome.status != "ok":
                return {"error": f"your kernel's loads could not be counted: defining it again failed "
                                 f"({outcome.message})"}
            return RemoteFunction(self.session, REPLAY, "the replay of your kernel")(record, watched, result)
        except (LearnerTimeout, LearnerCrash, LearnerError) as exc:
            self._stop()
            return {"error": f"your kernel's loads could not be counted: its replay failed ({exc})"}

    def _stop(self):
        if self.session is not None:
            self.session.close()
        if self.kernel is not None:
            self.kernel.shutdown()
        self.kernel = self.session = None

    def close(self):
        self._stop()
        self.sandbox.close()
        self._folder.cleanup()
