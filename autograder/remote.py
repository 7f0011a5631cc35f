"""The learner's functions, seen from the grader: proxies that run them in the learner's kernel.

A test cell such as ``check_weight_matrix(stick_breaking_matrix)`` runs in the grader's own process, with
the real check from ``sb_ref.testing``; only the name ``stick_breaking_matrix`` resolves to a
:class:`RemoteFunction`, which sends its arguments to the kernel, calls the learner's function there and brings
the result back. So the learner's code can compute whatever it likes, but cannot touch the check, the
reference it compares against, or the verdict. Gradients flow through a proxy too: the backward pass is
computed in the kernel, on the graph that the call left there.
"""
import builtins
import itertools
import tempfile
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
    """Calls ``name`` in the learner's kernel. Raises what the learner's code raised (NotImplementedError as
    itself, anything else as :class:`LearnerError`), or :class:`LearnerTimeout` / :class:`LearnerCrash`."""

    _ids = itertools.count()

    def __init__(self, session, name):
        self.session, self.name = session, name
        self.__name__ = self.__qualname__ = name

    def __repr__(self):
        return f"<learner function {self.name}>"

    def __call__(self, *args, **kwargs):
        call_id = next(self._ids)
        grad_inputs = [t for t in wire.tensors_in((args, kwargs)) if t.requires_grad]
        result = self.session.call(f"serve_call(globals(), {self.name!r}, {{request}}, {{response}}, {call_id})",
                                   {"args": args, "kwargs": kwargs}, self.name)
        outputs = [t for t in wire.tensors_in(result) if t.requires_grad]
        if not (grad_inputs and outputs and torch.is_grad_enabled()):
            return wire.replace_tensors(result, iter([t.detach() if t.requires_grad else t
                                                      for t in wire.tensors_in(result)]))
        linked = iter(_RemoteGrad.apply(self, call_id, len(grad_inputs), *grad_inputs,
                                        *[o.detach() for o in outputs]))
        return wire.replace_tensors(result, iter([next(linked) if t.requires_grad else t
                                                  for t in wire.tensors_in(result)]))


class _RemoteGrad(torch.autograd.Function):
    """Connects a remote call's outputs to its inputs in the grader's autograd graph."""

    @staticmethod
    def forward(ctx, remote, call_id, n_inputs, *tensors):
        ctx.remote, ctx.call_id, ctx.n_inputs = remote, call_id, n_inputs
        ctx.input_meta = [(t.shape, t.dtype, t.device) for t in tensors[:n_inputs]]
        return tuple(t.clone() for t in tensors[n_inputs:])

    @staticmethod
    def backward(ctx, *grad_outputs):
        grads = ctx.remote.session.call(f"serve_backward({{request}}, {{response}}, {ctx.call_id})",
                                        list(grad_outputs), ctx.remote.name)
        grads = [torch.zeros(s, dtype=d, device=dev) if g is None else g.to(dev)
                 for g, (s, d, dev) in zip(grads, ctx.input_meta)]
        return (None, None, None, *grads, *([None] * len(grad_outputs)))


class RemoteSession:
    """Function calls into one :class:`~autograder.kernel.LearnerKernel`, through files in a private folder."""

    BOOTSTRAP = "from autograder.wire import serve_call, serve_backward"

    def __init__(self, kernel, call_timeout):
        self.kernel, self.call_timeout = kernel, call_timeout
        self._dir = tempfile.TemporaryDirectory(prefix="autograder-calls-")
        self._n = itertools.count()

    def bootstrap(self):
        """Run after every (re)start of the kernel."""
        outcome = self.kernel.run(self.BOOTSTRAP, timeout=120)
        if outcome.status != "ok":
            raise RuntimeError(f"could not prepare the learner's kernel: {outcome.message}")

    def call(self, template, payload, name):
        n = next(self._n)
        request, response = (Path(self._dir.name) / f"{n}.{part}.pt" for part in ("request", "response"))
        wire.save(payload, request)
        outcome = self.kernel.run(template.format(request=repr(str(request)), response=repr(str(response))),
                                  timeout=self.call_timeout)
        if outcome.status == "timeout":
            raise LearnerTimeout(f"{name} ran past the time limit of {self.call_timeout:g} s")
        if outcome.status == "died":
            raise LearnerCrash(f"the notebook's kernel died while running {name}" +
                               (f" ({outcome.evalue})" if outcome.evalue else ""))
        if outcome.status != "ok" or not response.exists():
            raise LearnerError(f"{name} could not be called: {outcome.message or 'no answer from the kernel'}")
        answer = wire.load(response)
        if "error" in answer:
            ename, evalue, _ = answer["error"]
            if ename == "NotImplementedError":
                raise NotImplementedError(evalue)
            raise LearnerError(f"{name} raised {ename}: {evalue}")
        return answer["result"]

    def has_name(self, name):
        outcome = self.kernel.run(f"assert {name!r} in globals()", timeout=30)
        return outcome.status == "ok"


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
        self[name] = RemoteFunction(self.session, name)
        return self[name]
