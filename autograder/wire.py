"""How arguments and results travel between the grader and the learner's kernel: the codec, used on both sides.

Values are written with ``torch.save`` and read with ``torch.load(weights_only=True)``, which unpickles
tensors, numbers, strings and containers and nothing else: whatever the learner's code writes, the grader never
runs it. Requests go as files that only the grader can write (a new file each, never through a link); answers come
back as frames in a pipe that the grader owns and reads with a bound on every frame (:func:`send_answer`); a tensor
larger than a message may carry is refused before anything copies it; and only the kernel's side resolves a
function named for import (the grader sends installed functions by name; an answer that names one is refused).
numpy arrays and scalars travel as tagged tensors; tensors come back to the device they left from. What cannot
travel stays where it is and goes as a handle (tagged :data:`REMOTE`).

The grader's side of the calls is :mod:`autograder.remote`; the learner kernel's side is :mod:`autograder.serve`.
"""
import importlib
import io
import os
import stat
import struct

import numpy as np
import torch

_NUMPY, _NUMPY_SCALAR, _DEVICE = "__numpy__", "__numpy_scalar__", "__device__"
_FUNCTION, _LEARNER = "__function__", "__learner__"
REMOTE = "__remote__"  # {REMOTE: handle, ...}: an object of the learner's kernel, kept there

# Bounds on what one message may make its reader hold: the file, and any one tensor in it (a stride-0 view of a
# single number would otherwise become gigabytes the moment it is copied).
MAX_MESSAGE_BYTES = 1 << 30
MAX_TENSOR_BYTES = 1 << 30


# An answer's frame in the grader's pipe: magic, the call's number, the length of the message that follows.
FRAME, MAGIC = struct.Struct("<8sQQ"), b"SB-ANSWR"


class WireError(ValueError):
    """A message that its reader refuses: not a regular file, too large, or naming what this side never resolves."""


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


def decode(value, namespace=None, objects=None, *, imports=False):
    """Inverse of :func:`encode`. In the learner's kernel, ``namespace`` resolves learner functions sent by name,
    ``objects`` the handles of objects kept there, and ``imports=True`` the installed functions the grader sent by
    name. The grader decodes with none of them: a learner name or handle stays as it came, and an answer that names
    a function to import is refused (:class:`WireError`), since importing is running code the notebook chose."""
    if isinstance(value, (list, tuple)):
        items = [decode(v, namespace, objects, imports=imports) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if not isinstance(value, dict):
        return value
    if namespace is not None and _LEARNER in value:
        return namespace[value[_LEARNER]]
    if "__tensor__" in value:
        t = value["__tensor__"]
        if not isinstance(t, torch.Tensor):
            raise WireError(f"a tensor entry holds a {type(t).__name__}")
        if t.numel() * t.element_size() > MAX_TENSOR_BYTES:
            raise WireError(f"a tensor of shape {tuple(t.shape)} ({t.numel() * t.element_size() / 2**20:.0f} MiB) "
                            f"is larger than the {MAX_TENSOR_BYTES >> 20} MiB one message may carry")
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
        return {decode(k, namespace, objects, imports=imports): decode(v, namespace, objects, imports=imports)
                for k, v in value["__dict__"]}
    if _FUNCTION in value:
        if not imports:
            raise WireError(f"the answer names a function to import ({value[_FUNCTION]!r}); the grader imports "
                            "nothing that the notebook names")
        module, name = value[_FUNCTION]
        target = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target
    if objects is not None and REMOTE in value and value[REMOTE] in objects:
        return objects[value[REMOTE]]
    return value


def dumps(value):
    """The bytes of one message: ``value`` encoded (:func:`encode`) and written by ``torch.save``."""
    data = io.BytesIO()
    torch.save(encode(value), data)
    return data.getvalue()


def save(value, path):
    """Write ``value`` to a new file at ``path``: whatever is there already (a planted link, a FIFO) is an error
    (``FileExistsError``), never a file written through."""
    data = dumps(value)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def send_answer(value, answer):
    """Kernel side: write ``value`` as the answer to call number ``n`` into the grader's pipe, ``answer = (path,
    n)``: a frame of :data:`FRAME` (magic, n, length) and the message's bytes."""
    path, n = answer
    data = dumps(value)
    with open(path, "wb") as pipe:
        pipe.write(FRAME.pack(MAGIC, n, len(data)) + data)


def read_message(path, max_bytes=MAX_MESSAGE_BYTES):
    """The bytes of the regular file at ``path``, at most ``max_bytes``: a link, a FIFO or a device there is a
    :class:`WireError` (opened without following links or blocking), as is a larger file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise WireError(f"{os.path.basename(path)} cannot be opened as a plain file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise WireError(f"{os.path.basename(path)} is not a regular file")
        if info.st_size > max_bytes:
            raise WireError(f"{os.path.basename(path)} holds {info.st_size >> 20} MiB, more than the "
                            f"{max_bytes >> 20} MiB one message may")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise WireError(f"{os.path.basename(path)} grew past {max_bytes >> 20} MiB while it was read")
    return data


def loads(data, namespace=None, objects=None, *, imports=False, name="the message"):
    """:func:`decode` of the bytes of a message, unpickled with ``weights_only=True`` (tensors, numbers, strings and
    containers, nothing that runs)."""
    try:
        value = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # not a message of this codec: say so, whatever the unpickler raised
        raise WireError(f"{name} is not a message of the grader's codec ({type(exc).__name__})") from None
    return decode(value, namespace, objects, imports=imports)


def load(path, namespace=None, objects=None, *, imports=False, max_bytes=MAX_MESSAGE_BYTES):
    """:func:`loads` of a file written by :func:`save`, read by :func:`read_message`."""
    return loads(read_message(path, max_bytes), namespace, objects, imports=imports, name=os.path.basename(path))


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
