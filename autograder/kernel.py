"""The learner's kernel: a Jupyter kernel in a sandbox of its own (:mod:`autograder.sandbox`), with time and memory
limits.

Learner code runs only here. The grader sends it cells to execute and function calls to make
(:mod:`autograder.remote`), and keeps the checks, the references and the scores in its own process, where
nothing the learner writes can reach them. A cell or call that runs past its time limit is interrupted (and
the kernel restarted if it ignores the interrupt); a kernel that dies (``os._exit``, a crash in a native
library, the memory limit) is reported as such. After either, the kernel is fresh: the caller replays what
the learner's code needs.
"""
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager


# What the grader keeps of one cell's output: a cell may print gigabytes, the grader holds at most this much.
MAX_STDOUT_CHARS = 1 << 20


@dataclass
class Outcome:
    """What happened to one piece of code sent to the kernel."""

    status: str  # "ok", "error", "timeout" or "died"
    ename: str = ""
    evalue: str = ""
    stdout: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def message(self):
        if self.status == "timeout":
            return f"ran past its time limit ({self.extra.get('timeout', '?')} s)"
        if self.status == "died":
            return "the kernel died (os._exit, a crash, or the memory limit)" + (
                f": {self.evalue}" if self.evalue else "")
        return f"{self.ename}: {self.evalue}" if self.ename else ""


class LearnerKernel:
    """A Jupyter kernel for untrusted code, inside ``sandbox`` (a :class:`~autograder.sandbox.Sandbox`). Use as a
    context manager. It talks to the grader over Unix sockets in a folder of its own (the sandbox has no network).

    Args:
        sandbox: where it runs, and under which limits.
        gpu: let it see the GPUs.
        rss_limit_mb: on a GPU without a cgroup: a watchdog kills the kernel when its processes together hold more
            resident memory than this (0: no watchdog).
        env: extra environment variables.
    """

    def __init__(self, sandbox, gpu=False, rss_limit_mb=0, env=None):
        self.sandbox, self.gpu, self.rss_limit_mb = sandbox, gpu, rss_limit_mb
        self.env = dict(env or {})
        self._spec_dir = tempfile.TemporaryDirectory(prefix="autograder-kernel-")
        self.km = self.kc = None
        self.killed_for_memory = False
        self._sockets = self.cgroup = None

    def _write_spec(self, socket_dir):
        spec = Path(self._spec_dir.name) / "kernels" / "learner"
        spec.mkdir(parents=True, exist_ok=True)
        argv = self.sandbox.command([sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                    socket_dir, self.env, gpu=self.gpu, cgroup=self.cgroup)
        (spec / "kernel.json").write_text(json.dumps(
            {"argv": argv, "display_name": "learner (sandboxed)", "language": "python"}))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def start(self):
        socket_dir = self._sockets = self.sandbox.new_socket_dir()
        self.cgroup = self.sandbox.make_cgroup()
        self._write_spec(socket_dir)
        ksm = KernelSpecManager(kernel_dirs=[str(Path(self._spec_dir.name) / "kernels")])
        self.km = KernelManager(kernel_name="learner", kernel_spec_manager=ksm, transport="ipc",
                                ip=str(socket_dir / "kernel"))
        self.km.connection_file = str(socket_dir / "connection.json")
        self.km.write_connection_file()
        self.sandbox.give(self.km.connection_file)
        repo = str(Path(__file__).resolve().parent.parent)  # so that `-m autograder.limits` resolves
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": repo}
        # the kernel's own chatter (warnings) would look like the grader's: it goes nowhere
        self.km.start_kernel(cwd=str(self.sandbox.lesson_dir), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.sandbox.take_back(socket_dir)  # the sockets exist now: nothing in the sandbox may swap them
        self.killed_for_memory = False
        if self.rss_limit_mb and self.cgroup is None:
            threading.Thread(target=self._watch_memory, args=(self.km,), daemon=True).start()

    def shutdown(self):
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None and self.km.has_kernel:
            self.km.shutdown_kernel(now=True)
        if self.cgroup is not None:
            self.cgroup.remove()  # whatever the notebook left running goes too
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
        self.km = self.kc = self._sockets = self.cgroup = None

    def restart(self):
        self.shutdown()
        self.start()

    def is_alive(self):
        return self.km is not None and self.km.is_alive()

    @property
    def meter(self):
        """Where its memory is read from outside: its cgroup, else its process tree (None when not running)."""
        if self.cgroup is not None:
            return self.cgroup
        pid = self._pid(self.km) if self.km is not None else None
        return None if pid is None else ProcessTreeMemory(pid)

    def _pid(self, km):
        process = getattr(km.provisioner, "process", None)
        return getattr(process, "pid", None)

    def _watch_memory(self, km):
        pid = self._pid(km)
        while pid and km.has_kernel and km is self.km:
            if tree_rss_kb(pid) > self.rss_limit_mb * 1024:
                self.killed_for_memory = True
                km.kill_kernel()
                return
            time.sleep(0.05)

    def run(self, code, timeout):
        """Execute ``code``; returns an :class:`Outcome`. Never raises for anything the code does."""
        if not self.is_alive():
            return Outcome("died", evalue="the kernel was not running")
        msg_id = self.kc.execute(code, store_history=False, allow_stdin=False)
        deadline = time.monotonic() + timeout
        stdout, kept, error = [], 0, None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._timed_out(timeout)
            try:
                msg = self.kc.get_iopub_msg(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not self.is_alive():
                    reason = "memory limit" if self.killed_for_memory else ""
                    self.restart()
                    return Outcome("died", evalue=reason)
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content.get("name") == "stdout":
                if kept < MAX_STDOUT_CHARS:
                    text = content["text"][:MAX_STDOUT_CHARS - kept]
                    stdout.append(text)
                    kept += len(text)
                    if kept == MAX_STDOUT_CHARS:
                        stdout.append(f"\n[output cut at {MAX_STDOUT_CHARS >> 20} MiB]")
            elif kind == "error":
                error = {"ename": str(content.get("ename", ""))[:200],
                         "evalue": str(content.get("evalue", ""))[:MAX_STDOUT_CHARS]}
            elif kind == "status" and content["execution_state"] == "idle":
                break
        if error is not None:
            return Outcome("error", error["ename"], error["evalue"], "".join(stdout))
        return Outcome("ok", stdout="".join(stdout))

    def _timed_out(self, timeout):
        # A loop stuck in native code may ignore an interrupt: a fresh kernel is the only sure way out.
        self.restart()
        return Outcome("timeout", extra={"timeout": timeout})


def _tree(pid):
    """Process ``pid`` and all its descendants, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {pid}
    for _ in range(64):  # descendants, level by level
        grown = tree | {p for p, parent in parents.items() if parent in tree}
        if grown == tree:
            break
        tree = grown
    return tree


def _status_kb(members, field):
    total = 0
    for member in members:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        if f"{field}:" in status:
            total += int(status.split(f"{field}:")[1].split()[0])
    return total


def tree_rss_kb(pid):
    """Resident memory (KiB) of process ``pid`` and all its descendants, read from /proc."""
    return _status_kb(_tree(pid), "VmRSS")


class ProcessTreeMemory:
    """What a cgroup tells of memory, read instead off the process tree of one kernel (where the machine lets the
    grader make no cgroup), from outside it: resident and anonymous memory now, and the pages faulted in so far
    (minor faults, its reaped children's included: a count no process can lower)."""

    def __init__(self, pid):
        self.pid = pid

    def memory_bytes(self):
        return _status_kb(_tree(self.pid), "VmRSS") << 10

    def anonymous_bytes(self):
        return _status_kb(_tree(self.pid), "RssAnon") << 10

    def faulted_bytes(self):
        faults = 0
        for member in _tree(self.pid):
            try:
                fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            faults += int(fields[7]) + int(fields[8])  # minflt, cminflt
        return faults * os.sysconf("SC_PAGE_SIZE")

    def watch_peak(self):
        """Resident memory at the end stands in for the peak; the faulted pages count what came and went."""
        return self.memory_bytes
