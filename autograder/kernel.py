"""The learner's kernel: a Jupyter kernel in a process of its own, with time and memory limits.

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
    """A Jupyter kernel for untrusted code. Use as a context manager.

    Args:
        cwd: the kernel's working directory (the notebook's folder).
        memory_mb: address-space cap of the kernel process (0: none, e.g. on a GPU).
        rss_limit_mb: resident-memory limit enforced by a watchdog (0: none).
        env: extra environment variables.
    """

    def __init__(self, cwd, memory_mb=8192, rss_limit_mb=0, env=None):
        self.cwd, self.memory_mb, self.rss_limit_mb = str(cwd), memory_mb, rss_limit_mb
        self.env = {**os.environ, **(env or {})}
        self._spec_dir = tempfile.TemporaryDirectory(prefix="autograder-kernel-")
        self._write_spec()
        self.km = self.kc = None
        self.killed_for_memory = False

    def _write_spec(self):
        spec = Path(self._spec_dir.name) / "kernels" / "learner"
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "autograder.limits", "--memory-mb", str(self.memory_mb), "--",
                sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps(
            {"argv": argv, "display_name": "learner (limited)", "language": "python"}))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def start(self):
        ksm = KernelSpecManager(kernel_dirs=[str(Path(self._spec_dir.name) / "kernels")])
        self.km = KernelManager(kernel_name="learner", kernel_spec_manager=ksm)
        repo = str(Path(__file__).resolve().parent.parent)  # so that `-m autograder.limits` resolves
        env = dict(self.env, PYTHONPATH=os.pathsep.join(filter(None, [repo, self.env.get("PYTHONPATH")])))
        # the kernel's own chatter (ports, warnings) would look like the grader's: it goes nowhere
        self.km.start_kernel(cwd=self.cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.killed_for_memory = False
        if self.rss_limit_mb:
            threading.Thread(target=self._watch_memory, args=(self.km,), daemon=True).start()

    def shutdown(self):
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None and self.km.has_kernel:
            self.km.shutdown_kernel(now=True)
        self.km = self.kc = None

    def restart(self):
        self.shutdown()
        self.start()

    def is_alive(self):
        return self.km is not None and self.km.is_alive()

    def _pid(self, km):
        process = getattr(km.provisioner, "process", None)
        return getattr(process, "pid", None)

    def _watch_memory(self, km):
        pid = self._pid(km)
        while pid and km.has_kernel and km is self.km:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return
            rss_kb = int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
            if rss_kb > self.rss_limit_mb * 1024:
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
