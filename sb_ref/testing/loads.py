"""What a Triton kernel loads under the interpreter, and how the course's grader counts it where no learner code ran.

Two of the course's checks read a kernel's loads (``TRITON_INTERPRET=1``): lesson 05's long reverse cumsum may load
at most ``block`` columns at a time, and lesson 08's causal kernel must load fewer key elements than a full sweep.

- In a notebook, :func:`watched_loads` runs the function with a watch on the interpreter's loads (:func:`watch_loads`).
- Under the grader, a count taken in the learner's process would be the learner's to forge. So the learner's
  kernel only records its launches there (:func:`record_launches`: each launched ``@triton.jit`` function's source,
  its grid and arguments, the tensors as they were before the launch); the grader checks the sources (plain Triton,
  nothing else: :mod:`autograder.replay`) and replays the launches in a fresh sandboxed process that runs nothing of
  the learner's but those kernels (:func:`replay_launches`). The replay's result must be the function's result, so
  the kernel that was counted is the kernel that computed it.

:func:`each_load` is the watch itself: the count here and the tile pictures of :mod:`sb_ref.testing.traffic` both
hook every interpreted ``tl.load`` through it.
"""
import ast
import inspect
import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .remote import run_where_it_lives

#: The dtypes a recorded tensor may have (by name, as a record carries them).
DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                    torch.bool)}


@dataclass
class LoadCount:
    """The loads that touched one watched tensor: ``elements`` in all, per row of its dimension -2 (``rows``), and
    ``widest``, the most columns (its last dimension) that a single ``tl.load`` read."""

    elements: int = 0
    widest: int = 0
    rows: dict = field(default_factory=dict)


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextmanager
def each_load():
    """Calls ``callback(builder, ptrs, mask)`` on every ``tl.load`` the Triton interpreter runs while the context is
    open (``builder.grid_idx`` is the loading program); yields the list of callbacks to add to. The loads
    themselves are unchanged."""
    from triton.runtime import interpreter

    callbacks = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def watched_load(self, ptrs, mask, *rest, **kwargs):
        for callback in callbacks:
            callback(self, ptrs, mask)
        return original(self, ptrs, mask, *rest, **kwargs)

    interpreter.InterpreterBuilder.create_masked_load = watched_load
    try:
        yield callbacks
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original


@contextmanager
def watch_loads(tensor):
    """Counts the elements of ``tensor`` (its whole storage) that the Triton interpreter loads, in a
    :class:`LoadCount`."""
    count = LoadCount()
    base, end = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().data_ptr() + tensor.untyped_storage().nbytes()
    start, itemsize = tensor.data_ptr(), tensor.element_size()
    columns = tensor.shape[-1] if tensor.dim() else 1
    row_bytes = (tensor.stride(-2) if tensor.dim() > 1 else max(columns, 1)) * itemsize
    T = tensor.shape[-2] if tensor.dim() > 1 else 1

    def count_load(builder, ptrs, mask):
        addresses = ptrs.data.reshape(-1).astype("int64")
        if mask is not None:
            addresses = addresses[mask.data.reshape(-1).astype(bool)]
        inside = addresses[(addresses >= base) & (addresses < end)]
        if inside.size:
            count.elements += int(inside.size)
            count.widest = max(count.widest, len(set((((inside - start) // itemsize) % max(columns, 1)).tolist())))
            for row in ((inside - start) // row_bytes % max(T, 1)).tolist():
                count.rows[row] = count.rows.get(row, 0) + 1

    with each_load() as callbacks:
        callbacks.append(count_load)
        yield count


def watched_loads(fn, args, watched=0):
    """``(fn(*args), LoadCount of args[watched])`` under the interpreter, ``(fn(*args), None)`` without it.

    For a grader's proxy the count comes from the replay of the launches ``fn`` made (see the module's notes); an
    ``AssertionError`` says why a function's loads could not be counted (no Triton kernel launched, a kernel that
    is not plain Triton, a replay that does not give the function's result)."""
    replay = getattr(fn, "replay_launches", None)
    if replay is None:
        if not interpreting():
            return fn(*args), None
        with watch_loads(args[watched]) as count:
            result = fn(*args)
        return result, count
    result, record = run_where_it_lives(fn, record_launches, args)
    if record is None:
        return result, None
    report = replay(record, args[watched], result)
    if report is None:
        return result, None
    if report.get("error"):
        raise AssertionError(report["error"])
    return result, LoadCount(int(report["elements"]), int(report["widest"]))


def key_elements_loaded(fn, args, key_index=1):
    """Total number of key elements a Triton kernel loads while ``fn(*args)`` runs under the interpreter
    (``args[key_index]`` is k). Divide by a full sweep's count to see how much a causal kernel skips. Needs
    TRITON_INTERPRET=1."""
    _, count = watched_loads(fn, args, key_index)
    if count is None:
        raise RuntimeError("key_elements_loaded counts the loads of Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    return count.elements


# --------------------------------------------------------------------------------------------------------------
# where the learner's function runs: its launches, recorded

def _tensor_entry(tensor, storages, snapshots):
    storage = tensor.untyped_storage()
    key = storage.data_ptr()
    if key not in storages:
        storages[key] = len(snapshots)
        snapshots.append(torch.empty(0, dtype=torch.uint8).set_(storage).clone())
    return {"storage": storages[key], "dtype": str(tensor.dtype).replace("torch.", ""),
            "offset": tensor.storage_offset(), "size": list(tensor.shape), "stride": list(tensor.stride())}


def _free_names(fn):
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def _collect(jit_fn, kernels, constants):
    """The source of ``jit_fn`` and of the ``@triton.jit`` functions and number constants it names, by name."""
    import triton.language as tl
    from triton.runtime import interpreter

    fn = jit_fn.fn
    if fn.__name__ in kernels:
        return
    kernels[fn.__name__] = textwrap.dedent(inspect.getsource(fn))
    for name in _free_names(fn):
        value = fn.__globals__.get(name)
        if isinstance(value, interpreter.InterpretedFunction):
            _collect(value, kernels, constants)
        elif isinstance(value, tl.constexpr) and isinstance(value.value, (int, float, bool)):
            constants[name] = value.value
        elif isinstance(value, (int, float, bool)):
            constants[name] = value


def record_launches(fn, args):
    """``(fn(*args), record)``: every ``@triton.jit`` kernel the call launched, as data the grader can check and
    replay (None without the interpreter). Runs where ``fn`` lives."""
    if not interpreting():
        return fn(*args), None
    from triton.runtime import interpreter

    storages, snapshots, kernels, constants, launches = {}, [], {}, {}, []

    def encode(value):
        if isinstance(value, torch.Tensor):
            return {"tensor": _tensor_entry(value, storages, snapshots)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        value = getattr(value, "value", value)  # a tl.constexpr
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"a kernel argument of type {type(value).__name__} cannot be recorded for the grader's "
                        "replay: pass tensors, numbers and strings")

    original = interpreter.InterpretedFunction.run

    def recording_run(self, *launch_args, grid, warmup, **kwargs):
        if not warmup:
            names = self.arg_names
            kwargs_used = {k: v for k, v in kwargs.items() if k in names}
            meta = {**dict(zip(names, launch_args)), **kwargs_used}
            shape = grid(meta) if callable(grid) else grid
            _collect(self, kernels, constants)
            launches.append({"kernel": self.fn.__name__, "grid": [int(g) for g in tuple(shape)],
                             "args": [encode(a) for a in launch_args],
                             "kwargs": {k: encode(v) for k, v in kwargs_used.items()}})
        return original(self, *launch_args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    try:
        result = fn(*args)
    finally:
        interpreter.InterpretedFunction.run = original
    return result, {"tensors": snapshots, "kernels": kernels, "constants": constants, "launches": launches}


# --------------------------------------------------------------------------------------------------------------
# in the grader's replay process: only the checked kernels were defined here

def _view(entry, storages):
    t = torch.empty(0, dtype=DTYPES[entry["dtype"]])
    return t.set_(storages[entry["storage"]].untyped_storage(), entry["offset"], entry["size"], entry["stride"])


def _argument(item, storages):
    return _view(item["tensor"], storages) if "tensor" in item else item["value"]


def replay_launches(record, watched, result, namespace="__main__"):
    """Runs the record's launches again, the kernels being those of ``namespace`` (the replay process's, where the
    grader defined the checked sources), and counts the loads of the argument equal to ``watched``. Returns
    ``{"elements", "widest", "error"}``; ``error`` says what did not hold."""
    import importlib

    kernels = importlib.import_module(namespace)
    storages = [t.clone() for t in record["tensors"]]
    if not record["launches"]:
        return {"error": "your function launched no Triton kernel: the exercise is a Triton kernel and its launcher"}
    views = [(item["tensor"], _view(item["tensor"], storages)) for launch in record["launches"]
             for item in [*launch["args"], *launch["kwargs"].values()] if "tensor" in item]
    found = [v for _, v in views if v.shape == watched.shape and v.dtype == watched.dtype and torch.equal(v, watched)]
    if not found:
        return {"error": "none of the tensors your kernel was launched with is the input the check gave: launch "
                         "the kernel on the function's argument itself (a contiguous tensor needs no copy)"}
    with watch_loads(found[0]) as count:
        for launch in record["launches"]:
            kernel = getattr(kernels, launch["kernel"])
            kernel[tuple(launch["grid"])](*[_argument(a, storages) for a in launch["args"]],
                                          **{k: _argument(a, storages) for k, a in launch["kwargs"].items()})
    outputs = [_view(entry, storages) for entry, _ in views]
    if not isinstance(result, torch.Tensor) or not any(
            o.shape == result.shape and torch.allclose(o.double(), result.double(), rtol=1e-5, atol=1e-6)
            for o in outputs if o.dtype == result.dtype):
        return {"error": "replaying your kernel's launches did not give your function's result: the result must be "
                         "what the kernel wrote, not computed another way"}
    return {"elements": count.elements, "widest": count.widest, "error": ""}
