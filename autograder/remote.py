"""The learner's functions, seen from the grader: proxies that run them in the learner's kernel.

A test cell such as ``check_weight_matrix(stick_breaking_matrix)`` runs in the grader's own process, with
the real check from ``sb_ref.testing.lessons``; only the name ``stick_breaking_matrix`` resolves to a
:class:`RemoteFunction`, which sends its arguments to the kernel, calls the learner's function there and brings
the result back. So the learner's code can compute whatever it likes, but cannot touch the check, the
reference it compares against, or the verdict. Gradients flow through a proxy too: the backward pass is
computed in the kernel, on the graph that the call left there.

This module is the grader's side of the protocol; :mod:`autograder.serve` is the kernel's, :mod:`autograder.wire`
the codec between them. The checks reach it only through :meth:`RemoteFunction.run_in_kernel`, which
:func:`sb_ref.testing.remote.run_where_it_lives` calls.
"""
import builtins
import contextlib
import itertools
import os
import select
import threading
from pathlib import Path

import torch

from . import wire


class LearnerTimeout(BaseException):
    """The learner's code ran past its time limit. A BaseException, so no check's ``except Exception`` hides it."""


class LearnerCrash(BaseException):
    """The learner's kernel died during a call (os._exit, a native crash, the memory limit)."""


class LearnerError(Exception):
    """The learner's function raised an exception in the kernel; the message names it."""


class RemoteFunction:
    """Calls a function (or callable object) of the learner's kernel: ``target`` is its name there, or
    ``[handle, attribute]`` of an object kept there. Raises what the learner's code raised (see
    :meth:`RemoteSession.call`), or :class:`LearnerTimeout` / :class:`LearnerCrash`."""

    def __init__(self, session, target, name):
        self.session, self.target, self.name = session, target, name
        self.__name__ = self.__qualname__ = name
        self.learner_name = target if isinstance(target, str) else None

    def notebook_function(self, name):
        """Another function of the learner's notebook, by its name there (a check whose exercise builds on an
        earlier one checks that one too when it fails: :func:`sb_ref.testing.lessons.harness.builds_on`)."""
        return RemoteFunction(self.session, name, name)

    def run_in_kernel(self, helper, *args):
        """Runs ``helper`` ("module:function", e.g. a speed probe) in the learner's kernel, with this function as
        its first argument: measurements of the learner's code are taken where that code runs."""
        return RemoteFunction(self.session, helper, helper)(self, *args)

    def measure_memory(self, warmup_args, args):
        """``(fn(*warmup_args), peak bytes of fn(*args), bytes held before)``, measured by the grader from outside a
        fresh sandboxed process that ran only the notebook's exercise cells (None where no cgroup can measure). The
        arguments are CPU tensors: on a GPU grader that process has no GPU and runs Triton in its interpreter."""
        return self.session.measure_memory(self.target, warmup_args, args)

    def replay_launches(self, record, watched, result):
        """``{"elements", "widest", "error"}``: the loads of ``watched`` in a replay of the Triton launches this
        function recorded (:func:`sb_ref.testing.loads.record_launches`), in a fresh sandboxed kernel that defines
        only the recorded kernels, once the grader has checked them (:mod:`autograder.replay`)."""
        return self.session.replay_launches(record, watched, result)

    def time_calls(self, helper, case, seeds, reps):
        """``[(seconds, result)]``, one per seed: ``helper(fn, case, seed, reps)`` run in a fresh sandboxed kernel
        that ran only the notebook's lesson and exercise cells, after one untimed warm-up run, each timed by the
        grader's clock around the whole call (the kernel's own clocks are not asked)."""
        return self.session.time_calls(self.target, helper, case, seeds, reps)

    def alone(self):
        """A context in which no process of the learner runs (its kernels are shut down; the notebook's kernel
        comes back, with its cells run again, before the next cell): what is timed in it shares the machine with
        nothing the learner started."""
        return self.session.alone()

    def __repr__(self):
        return f"<learner function {self.name}>"

    def __call__(self, *args, **kwargs):
        call_id = self.session.new_id()
        grad_inputs = [t for t in wire.tensors_in((args, kwargs)) if t.requires_grad]
        result = self.session.call(f"serve_call(globals(), {self.target!r}, {{request}}, {{answer}}, {call_id})",
                                   {"args": args, "kwargs": kwargs}, self.name)
        outputs = [t for t in wire.tensors_in(result) if t.requires_grad]
        if not (grad_inputs and outputs and torch.is_grad_enabled()):
            return wire.replace_tensors(result, iter([t.detach() if t.requires_grad else t
                                                      for t in wire.tensors_in(result)]))
        linked = iter(_RemoteGrad.apply(self, call_id, len(grad_inputs), *grad_inputs,
                                        *[o.detach() for o in outputs]))
        return wire.replace_tensors(result, iter([next(linked) if t.requires_grad else t
                                                  for t in wire.tensors_in(result)]))


class RemoteObject(RemoteFunction):
    """An object that lives in the learner's kernel (a module instance, say): attributes are fetched from there,
    methods and calls run there, and passing it back as an argument passes the object itself."""

    def __init__(self, session, handle, type_name):
        super().__init__(session, [handle, None], f"<{type_name} object>")
        self.remote_handle = handle

    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return self.session.call(f"serve_getattr({self.remote_handle}, {attribute!r}, {{answer}}, "
                                 f"{self.session.new_id()})", None, f"{self.name}.{attribute}")


class _RemoteGrad(torch.autograd.Function):
    """Connects a remote call's outputs to its inputs in the grader's autograd graph."""

    @staticmethod
    def forward(ctx, remote, call_id, n_inputs, *tensors):
        ctx.remote, ctx.call_id, ctx.n_inputs = remote, call_id, n_inputs
        ctx.input_meta = [(t.shape, t.dtype, t.device) for t in tensors[:n_inputs]]
        return tuple(t.clone() for t in tensors[n_inputs:])

    @staticmethod
    def backward(ctx, *grad_outputs):
        grads = ctx.remote.session.call(f"serve_backward({{request}}, {{answer}}, {ctx.call_id})",
                                        list(grad_outputs), ctx.remote.name)
        grads = [torch.zeros(s, dtype=d, device=dev) if g is None else g.to(dev)
                 for g, (s, d, dev) in zip(grads, ctx.input_meta)]
        return (None, None, None, *grads, *([None] * len(grad_outputs)))


class AnswerPipe:
    """The grader's end of the pipe that answers come back through (a FIFO in the grader's call folder, which the
    sandbox sees read-only). A thread reads it as it fills, frame by frame (:data:`autograder.wire.FRAME`), and keeps
    only the frame of the call being waited for, at most :data:`~autograder.wire.MAX_MESSAGE_BYTES`: whatever else
    the notebook writes there is read and dropped, and bytes that are not a frame spoil only this notebook's calls."""

    def __init__(self, folder):
        self.path = Path(folder) / "answers"
        os.mkfifo(self.path)
        os.chmod(self.path, 0o622)  # the sandbox may write, only the grader reads
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)  # one writer of its own: never an EOF
        self._changed = threading.Condition()
        self._expected, self._answer, self.broken = None, None, ""
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def expect(self, n):
        with self._changed:
            self._expected, self._answer = n, None

    def wait(self, n, timeout):
        """The bytes of answer ``n`` (or a :class:`~autograder.wire.WireError` to raise), None if none came."""
        with self._changed:
            self._changed.wait_for(lambda: self._answer is not None or self.broken, timeout)
            answer = self._answer
            self._expected = self._answer = None
        if answer is None and self.broken:
            return wire.WireError(self.broken)
        return answer

    def close(self):
        self._closed = True

    def _bytes(self, n):
        """Up to n bytes as they arrive; b"" once closed."""
        while not self._closed:
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self._fd, min(n, 1 << 20))
                except BlockingIOError:
                    continue
                if chunk:
                    return chunk
        return b""

    def _exactly(self, n, keep):
        parts, left = [], n
        while left:
            chunk = self._bytes(left)
            if not chunk:
                return None
            left -= len(chunk)
            if keep:
                parts.append(chunk)
        return b"".join(parts) if keep else b""

    def _deliver(self, answer):
        with self._changed:
            self._answer = answer
            self._changed.notify_all()

    def _read(self):
        try:
            while not self._closed:
                header = self._exactly(wire.FRAME.size, keep=True)
                if header is None:
                    break
                magic, n, length = wire.FRAME.unpack(header)
                if magic != wire.MAGIC:
                    with self._changed:
                        self.broken = "the pipe held bytes that are not an answer of the grader's protocol"
                        self._changed.notify_all()
                    while self._bytes(1 << 20):
                        pass
                    break
                wanted, too_large = n == self._expected, length > wire.MAX_MESSAGE_BYTES
                if wanted and too_large:  # refused at once: what follows is read and dropped
                    self._deliver(wire.WireError(f"an answer of {length >> 20} MiB, more than the "
                                                 f"{wire.MAX_MESSAGE_BYTES >> 20} MiB one message may"))
                data = self._exactly(length, keep=wanted and not too_large)
                if data is None:
                    break
                if wanted and not too_large:
                    self._deliver(data)
        finally:
            os.close(self._fd)


class RemoteSession:
    """Function calls into one :class:`~autograder.kernel.LearnerKernel`: requests as files in the sandbox's call
    folder (the grader's: the notebook sees it read-only), answers through its :class:`AnswerPipe`."""

    BOOTSTRAP = "from autograder.serve import serve_backward, serve_call, serve_getattr"
    # Seconds an answer may still take once the kernel says the call is done: by then it has all been written into
    # the pipe, of which at most the pipe's buffer is left to read.
    ANSWER_WAIT = 2.0

    def __init__(self, kernel, call_timeout):
        self.kernel, self.call_timeout = kernel, call_timeout
        self._dir = kernel.sandbox.new_call_folder()
        self.pipe = AnswerPipe(self._dir)
        self._n = itertools.count()
        self._ids = itertools.count()
        self.measuring = None  # the grader's MeasuringKernel, or None
        self.replayer = None  # the grader's Replayer, or None
        self.memory_measuring = None  # on a GPU grader, a CPU MeasuringKernel for memory (else `measuring`'s)

    def close(self):
        self.pipe.close()

    def measure_memory(self, target, warmup_args, args):
        """See :meth:`RemoteFunction.measure_memory`; the grader sets :attr:`measuring` to do it."""
        measuring = self.memory_measuring or self.measuring
        if measuring is None or not isinstance(target, str):
            return None
        return measuring.memory(target, warmup_args, args)

    def replay_launches(self, record, watched, result):
        """See :meth:`RemoteFunction.replay_launches`; None without a :attr:`replayer`."""
        return None if self.replayer is None else self.replayer.replay(record, watched, result)

    def time_calls(self, target, helper, case, seeds, reps):
        """See :meth:`RemoteFunction.time_calls`."""
        if self.measuring is None or not isinstance(target, str):
            raise LearnerError(f"{target} cannot be timed: only a function the notebook defines by name can")
        return self.measuring.time_calls(target, helper, case, seeds, reps)

    @contextlib.contextmanager
    def alone(self):
        """See :meth:`RemoteFunction.alone`: the kernel is shut down, and :attr:`restore` brings it back after."""
        for measuring in (self.measuring, self.memory_measuring):
            if measuring is not None:
                measuring.close()
        self.kernel.shutdown()
        try:
            yield
        finally:
            self.restore()

    def restore(self):
        """Starts the kernel again after :meth:`alone`; the grader replaces it with one that also replays the
        notebook's cells."""
        self.kernel.start()
        self.bootstrap()

    def new_id(self):
        return next(self._ids)

    def bootstrap(self):
        """Run after every (re)start of the kernel."""
        outcome = self.kernel.run(self.BOOTSTRAP, timeout=120)
        if outcome.status != "ok":
            raise RuntimeError(f"could not prepare the learner's kernel: {outcome.message}")

    def call(self, template, payload, name):
        n = next(self._n)
        request = self._dir / f"{n}.request.pt"
        try:
            wire.save(payload, request)
        except FileExistsError:
            raise LearnerError(f"{name} could not be called: something already lies where the grader writes its "
                               "request (the notebook tampered with the grader's call files)") from None
        self.pipe.expect(n)
        outcome = self.kernel.run(template.format(request=repr(str(request)), answer=repr((str(self.pipe.path), n))),
                                  timeout=self.call_timeout)
        try:
            request.unlink()
        except OSError:
            pass
        if outcome.status == "timeout":
            raise LearnerTimeout(f"{name} ran past the time limit of {self.call_timeout:g} s")
        if outcome.status == "died":
            raise LearnerCrash(f"the notebook's kernel died while running {name}" +
                               (f" ({outcome.evalue})" if outcome.evalue else ""))
        if outcome.status != "ok":
            raise LearnerError(f"{name} could not be called: {outcome.message or 'no answer from the kernel'}")
        data = self.pipe.wait(n, self.ANSWER_WAIT)
        if data is None:
            raise LearnerError(f"{name} could not be called: no answer from the kernel")
        try:
            if isinstance(data, wire.WireError):
                raise data
            answer = wire.loads(data, name="the answer")
        except wire.WireError as exc:
            raise LearnerError(f"{name}: the notebook's answer was refused: {exc}") from None
        if not isinstance(answer, dict) or not ("error" in answer or "result" in answer):
            raise LearnerError(f"{name}: the notebook's answer was refused: not an answer of the grader's protocol")
        if "error" in answer:
            error = answer["error"]
            if not (isinstance(error, (list, tuple)) and len(error) == 3 and all(isinstance(e, str) for e in error)):
                raise LearnerError(f"{name}: the notebook's answer was refused: a malformed error")
            raise _learner_exception(name, *error)
        return self._objects_in(answer["result"])

    def _objects_in(self, value):
        """Handles in a result become :class:`RemoteObject` (or, for methods, :class:`RemoteFunction`)."""
        if isinstance(value, dict) and wire.REMOTE in value:
            obj = RemoteObject(self, value[wire.REMOTE], value["type"])
            return obj
        if isinstance(value, (list, tuple)):
            items = [self._objects_in(v) for v in value]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, dict):
            return {k: self._objects_in(v) for k, v in value.items()}
        return value

    def has_name(self, name):
        outcome = self.kernel.run(f"assert {name!r} in globals()", timeout=30)
        return outcome.status == "ok"


# Exceptions of these kinds are raised again as themselves, so that checks can tell them apart; anything else
# the learner's code raises arrives as a LearnerError that names it.
_REBUILT = {f"builtins.{name}": getattr(builtins, name) for name in
            ("NotImplementedError", "ValueError", "TypeError", "IndexError", "KeyError", "RuntimeError",
             "ZeroDivisionError", "AttributeError", "NameError", "AssertionError")}


def _learner_exception(name, ename, qualified, evalue):
    if qualified == "torch.autograd.gradcheck.GradcheckError":
        from torch.autograd.gradcheck import GradcheckError
        return GradcheckError(evalue)
    if qualified in _REBUILT:
        return _REBUILT[qualified](evalue)
    return LearnerError(f"{name} raised {ename}: {evalue}")


class RemoteNamespace(dict):
    """Local names for executing a trusted test cell: names the cell does not define itself resolve to the
    learner's functions (as proxies) when the learner's kernel has them."""

    def __init__(self, session, trusted_globals):
        super().__init__()
        self.session, self.trusted = session, trusted_globals

    def __missing__(self, name):
        # the grader's own names (checks, modules, builtins) always win over anything the learner defines
        if (name in self.trusted or hasattr(builtins, name) or name.startswith("__")
                or not self.session.has_name(name)):
            raise KeyError(name)
        self[name] = RemoteFunction(self.session, name, name)
        return self[name]
