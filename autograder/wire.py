"""How arguments and results travel between the grader and the learner's kernel.

Values go through files written with ``torch.save`` and read with ``torch.load(weights_only=True)``, which
unpickles tensors, numbers, strings and containers and nothing else: whatever the learner's code writes, the
grader never runs it. numpy arrays and scalars travel as tagged tensors; tensors come back to the device
they left from.

The kernel side (:func:`serve_call`, :func:`serve_backward`) runs inside the learner's kernel.
"""
import importlib

import numpy as np
import torch

_NUMPY, _NUMPY_SCALAR, _DEVICE = "__numpy__", "__numpy_scalar__", "__device__"
_REMOTE, _FUNCTION, _LEARNER = "__remote__", "__function__", "__learner__"


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
        return {_REMOTE: value.remote_handle}
    if getattr(value, "learner_name", None) is not None:  # a learner's function, by its name in the notebook
        return {_LEARNER: value.learner_name}
    if callable(value) and _importable(value):  # a function of an installed module travels by its name
        return {_FUNCTION: [value.__module__, value.__qualname__]}
    raise TypeError(f"cannot pass a {type(value).__name__} between the grader and the notebook: use tensors, "
                    "numpy arrays, numbers, strings, or lists/tuples/dicts of them")


def decode(value, keep_device=True, namespace=None):
    """Inverse of :func:`encode`; in the kernel, ``namespace`` resolves learner functions sent by name."""
    if isinstance(value, dict) and namespace is not None and _LEARNER in value:
        return namespace[value[_LEARNER]]
    if isinstance(value, (list, tuple)) and namespace is not None:
        items = [decode(v, keep_device, namespace) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict) and namespace is not None and "__dict__" in value:
        return {decode(k, keep_device, namespace): decode(v, keep_device, namespace) for k, v in value["__dict__"]}
    if isinstance(value, dict):
        if "__tensor__" in value:
            t = value["__tensor__"]
            if keep_device and value["device"] != "cpu" and torch.cuda.is_available():
                t = t.to(value["device"])
            return t.requires_grad_(value["grad"]) if value["grad"] and t.is_floating_point() else t
        if _NUMPY in value:
            return value[_NUMPY].numpy()
        if _NUMPY_SCALAR in value:
            return value[_NUMPY_SCALAR].numpy()[()]
        if _DEVICE in value:
            return torch.device(value[_DEVICE])
        if "__dict__" in value:
            return {decode(k): decode(v) for k, v in value["__dict__"]}
        if _FUNCTION in value:
            module, name = value[_FUNCTION]
            target = importlib.import_module(module)
            for part in name.split("."):
                target = getattr(target, part)
            return target
        if _REMOTE in value and value[_REMOTE] in _objects:  # kernel side: the object itself
            return _objects[value[_REMOTE]]
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode(v) for v in value)
    return value


def save(value, path):
    torch.save(encode(value), path)


def load(path, namespace=None):
    return decode(torch.load(path, weights_only=True), namespace=namespace)


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


_graphs = {}  # call id -> (inputs that need gradients, differentiable outputs), kept for the backward
_objects = {}  # handle -> an object of the learner's that cannot travel (a module, a generator, ...)


def _error(exc):
    kind = type(exc)
    return {"error": [kind.__name__, f"{kind.__module__}.{kind.__qualname__}", str(exc)]}


def _respond(result, response_path, call_id):
    """Write ``result``; what cannot travel stays here and goes back as a handle."""
    try:
        save({"result": result}, response_path)
    except TypeError:
        _objects[call_id] = result
        save({"result": {_REMOTE: call_id, "type": type(result).__name__,
                         "callable": callable(result)}}, response_path)


def _target(namespace, target):
    """A name in the notebook, or ``[handle, attribute or None]`` of an object kept here."""
    if isinstance(target, str) and ":" in target:  # a helper of an installed module, e.g. a speed probe
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)
    if isinstance(target, str):
        return namespace[target]
    handle, attribute = target
    obj = _objects[handle]
    return obj if attribute is None else getattr(obj, attribute)


def serve_call(namespace, target, request_path, response_path, call_id):
    """Kernel side: call the target with the arguments of the request file, write the response."""
    try:
        request = load(request_path, namespace)
        args, kwargs = request["args"], request["kwargs"]
        inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
        result = _target(namespace, target)(*args, **kwargs)
        if inputs:
            outputs = [t for t in tensors_in(result) if t.requires_grad]
            _graphs[call_id] = (inputs, outputs)
    except BaseException as exc:  # the learner's code may raise anything, SystemExit included
        save(_error(exc), response_path)
        return
    _respond(result, response_path, call_id)


def serve_getattr(handle, attribute, response_path, call_id):
    """Kernel side: an attribute of a kept object; methods come back as handles to call."""
    try:
        value = getattr(_objects[handle], attribute)
    except BaseException as exc:
        save(_error(exc), response_path)
        return
    if callable(value) and not isinstance(value, torch.Tensor):
        _objects[call_id] = value
        save({"result": {_REMOTE: call_id, "type": type(value).__name__, "callable": True}}, response_path)
    else:
        _respond(value, response_path, call_id)


def serve_backward(request_path, response_path, call_id):
    """Kernel side: gradients of a recorded call's inputs for the output gradients in the request file."""
    try:
        inputs, outputs = _graphs.pop(call_id)
        grad_outputs = load(request_path)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        response = {"result": list(grads)}
    except BaseException as exc:
        response = _error(exc)
    save(response, response_path)
