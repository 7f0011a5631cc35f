"""How arguments and results travel between the grader and the learner's kernel: the codec, used on both sides.

Values go through files written with ``torch.save`` and read with ``torch.load(weights_only=True)``, which
unpickles tensors, numbers, strings and containers and nothing else: whatever the learner's code writes, the
grader never runs it. numpy arrays and scalars travel as tagged tensors; tensors come back to the device
they left from. What cannot travel stays where it is and goes as a handle (tagged :data:`REMOTE`).

The grader's side of the calls is :mod:`autograder.remote`; the learner kernel's side is :mod:`autograder.serve`.
"""
import importlib

import numpy as np
import torch

_NUMPY, _NUMPY_SCALAR, _DEVICE = "__numpy__", "__numpy_scalar__", "__device__"
_FUNCTION, _LEARNER = "__function__", "__learner__"
REMOTE = "__remote__"  # {REMOTE: handle, ...}: an object of the learner's kernel, kept there


def _importable(fn):
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in name or module == "__main__":
        return False
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part, None)
    return target is fn


def encode(value):
    """Make ``value`` loadable with ``weights_only=True``: numpy becomes tagged tensors, tensors move to CPU."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu(), "device": str(value.device), "grad": value.requires_grad}
    if isinstance(value, np.ndarray):
        return {_NUMPY: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return {_NUMPY_SCALAR: torch.from_numpy(np.asarray(value))}
    if isinstance(value, torch.device):
        return {_DEVICE: str(value)}
    if isinstance(value, (list, tuple)):
        items = [encode(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {"__dict__": [(encode(k), encode(v)) for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype)):
        return value
    if getattr(value, "remote_handle", None) is not None:  # a learner's object, sent back where it lives
        return {REMOTE: value.remote_handle}
    if getattr(value, "learner_name", None) is not None:  # a learner's function, by its name in the notebook
        return {_LEARNER: value.learner_name}
    if callable(value) and _importable(value):  # a function of an installed module travels by its name
        return {_FUNCTION: [value.__module__, value.__qualname__]}
    raise TypeError(f"cannot pass a {type(value).__name__} between the grader and the notebook: use tensors, "
                    "numpy arrays, numbers, strings, or lists/tuples/dicts of them")


def decode(value, namespace=None, objects=None):
    """Inverse of :func:`encode`. In the learner's kernel, ``namespace`` resolves learner functions sent by name and
    ``objects`` the handles of objects kept there; elsewhere both stay as they came."""
    if isinstance(value, (list, tuple)):
        items = [decode(v, namespace, objects) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if not isinstance(value, dict):
        return value
    if namespace is not None and _LEARNER in value:
        return namespace[value[_LEARNER]]
    if "__tensor__" in value:
        t = value["__tensor__"]
        if value["device"] != "cpu" and torch.cuda.is_available():
            t = t.to(value["device"])
        return t.requires_grad_(value["grad"]) if value["grad"] and t.is_floating_point() else t
    if _NUMPY in value:
        return value[_NUMPY].numpy()
    if _NUMPY_SCALAR in value:
        return value[_NUMPY_SCALAR].numpy()[()]
    if _DEVICE in value:
        return torch.device(value[_DEVICE])
    if "__dict__" in value:
        return {decode(k, namespace, objects): decode(v, namespace, objects) for k, v in value["__dict__"]}
    if _FUNCTION in value:
        module, name = value[_FUNCTION]
        target = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target
    if objects is not None and REMOTE in value and value[REMOTE] in objects:
        return objects[value[REMOTE]]
    return value


def save(value, path):
    torch.save(encode(value), path)


def load(path, namespace=None, objects=None):
    """:func:`decode` of a file written by :func:`save` (read with ``weights_only=True``)."""
    return decode(torch.load(path, weights_only=True), namespace, objects)


def tensors_in(value):
    """The tensors inside nested lists, tuples and dicts, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def replace_tensors(value, new):
    """``value`` with its tensors replaced, in :func:`tensors_in` order, by the items of iterator ``new``."""
    if isinstance(value, torch.Tensor):
        return next(new)
    if isinstance(value, (list, tuple)):
        items = [replace_tensors(v, new) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: replace_tensors(v, new) for k, v in value.items()}
    return value
