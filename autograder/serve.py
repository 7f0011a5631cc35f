"""The learner kernel's side of the grader's calls: it runs inside the learner's kernel, never in the grader.

The grader (:mod:`autograder.remote`) imports :func:`serve_call`, :func:`serve_getattr` and :func:`serve_backward`
into the kernel when it starts, then sends code that calls them with the path of a request file and where the
answer goes (the grader's pipe and the call's number, :func:`autograder.wire.send_answer`). A call's target is a
name in the notebook, an object kept here (``[handle, attribute]``), or a helper of an installed module
(``"module:function"``, what a check's :func:`sb_ref.testing.remote.run_where_it_lives` asks for). Kept here,
between calls: the autograd graph of each call whose inputs need gradients (for :func:`serve_backward`), and the
objects that cannot travel (a module, a generator, ...), which go to the grader as handles.
"""
import importlib
import os

import torch

from .wire import REMOTE, load, send_answer, tensors_in

_graphs = {}  # call id -> (inputs that need gradients, differentiable outputs), kept for the backward
_objects = {}  # handle -> an object of the learner's that cannot travel (a module, a generator, ...)


def _interpreter_indexes_one_element_blocks():
    """Under TRITON_INTERPRET=1, make a one-element block usable as an index (``range(tl.cdiv(...))``), as the
    compiler and Triton >= 3.7's interpreter allow (the same ``__index__`` as 3.7's). Triton 3.6's interpreter
    calls ``int()`` on the block's one-dimensional array, which numpy >= 2.4 refuses; a GPU grader runs its outside
    memory measure in that interpreter, and a kernel the GPU compiles must not fail there."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


_interpreter_indexes_one_element_blocks()


def _error(exc):
    kind = type(exc)
    return {"error": [kind.__name__, f"{kind.__module__}.{kind.__qualname__}", str(exc)]}


def _respond(result, answer, call_id):
    """Write ``result``; what cannot travel stays here and goes back as a handle."""
    try:
        send_answer({"result": result}, answer)
    except TypeError:
        _objects[call_id] = result
        send_answer({"result": {REMOTE: call_id, "type": type(result).__name__,
                         "callable": callable(result)}}, answer)


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


def serve_call(namespace, target, request_path, answer, call_id):
    """Kernel side: call the target with the arguments of the request file, write the response."""
    try:
        request = load(request_path, namespace, _objects, imports=True)
        args, kwargs = request["args"], request["kwargs"]
        inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
        result = _target(namespace, target)(*args, **kwargs)
        if inputs:
            outputs = [t for t in tensors_in(result) if t.requires_grad]
            _graphs[call_id] = (inputs, outputs)
    except BaseException as exc:  # the learner's code may raise anything, SystemExit included
        send_answer(_error(exc), answer)
        return
    _respond(result, answer, call_id)


def serve_getattr(handle, attribute, answer, call_id):
    """Kernel side: an attribute of a kept object; methods come back as handles to call."""
    try:
        value = getattr(_objects[handle], attribute)
    except BaseException as exc:
        send_answer(_error(exc), answer)
        return
    if callable(value) and not isinstance(value, torch.Tensor):
        _objects[call_id] = value
        send_answer({"result": {REMOTE: call_id, "type": type(value).__name__, "callable": True}}, answer)
    else:
        _respond(value, answer, call_id)


def serve_backward(request_path, answer, call_id):
    """Kernel side: gradients of a recorded call's inputs for the output gradients in the request file."""
    try:
        inputs, outputs = _graphs.pop(call_id)
        grad_outputs = load(request_path, objects=_objects)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        response = {"result": list(grads)}
    except BaseException as exc:
        response = _error(exc)
    send_answer(response, answer)
