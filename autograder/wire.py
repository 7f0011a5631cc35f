"""How arguments and results travel between the grader and the learner's kernel.

Values go through files written with ``torch.save`` and read with ``torch.load(weights_only=True)``, which
unpickles tensors, numbers, strings and containers and nothing else: whatever the learner's code writes, the
grader never runs it. numpy arrays and scalars travel as tagged tensors; tensors come back to the device
they left from.

The kernel side (:func:`serve_call`, :func:`serve_backward`) runs inside the learner's kernel.
"""
import traceback

import numpy as np
import torch

_NUMPY, _NUMPY_SCALAR, _DEVICE = "__numpy__", "__numpy_scalar__", "__device__"


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
    raise TypeError(f"cannot pass a {type(value).__name__} between the grader and the notebook: use tensors, "
                    "numpy arrays, numbers, strings, or lists/tuples/dicts of them")


def decode(value, keep_device=True):
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
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode(v) for v in value)
    return value


def save(value, path):
    torch.save(encode(value), path)


def load(path):
    return decode(torch.load(path, weights_only=True))


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


def _error(exc):
    return {"error": [type(exc).__name__, str(exc), "".join(traceback.format_exception(exc)[-3:])]}


def serve_call(namespace, name, request_path, response_path, call_id):
    """Kernel side: call ``namespace[name](*args, **kwargs)`` from the request file, write the response."""
    try:
        request = load(request_path)
        args, kwargs = request["args"], request["kwargs"]
        inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
        with torch.enable_grad() if inputs else torch.no_grad():
            result = namespace[name](*args, **kwargs)
        if inputs:
            outputs = [t for t in tensors_in(result) if t.requires_grad]
            _graphs[call_id] = (inputs, outputs)
        response = {"result": result}
    except BaseException as exc:  # the learner's code may raise anything, SystemExit included
        response = _error(exc)
    try:
        save(response, response_path)
    except TypeError as exc:
        save(_error(exc), response_path)


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
