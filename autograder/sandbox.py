"""The learner's sandbox: every process a notebook starts runs inside bubblewrap (Debian's ``bubblewrap``).

What the learner's code sees and may do, from inside:

- its own PID, network, IPC, UTS, cgroup and user namespaces: no other process of the machine (the grader
  included) is visible, no network but a loopback of its own; run by an unprivileged uid (65534, "nobody") when
  the grader is root, by the grader's own uid without any capability otherwise;
- a cleared environment (only :data:`PASSED_ENVIRONMENT` and what the grader sets), its own process session,
  killed with the grader (``--die-with-parent``);
- read-only: the system's ``/usr`` (and what ``/lib``, ``/bin`` point into), a few files of ``/etc``, the Python
  environment, ``sb_ref`` and the kernels, the grader's kernel-side modules, its own lesson folder (as
  ``/lesson``, its working directory) and the grader's call folder (requests, and the one pipe answers go into);
- writable: ``/tmp`` (also ``HOME``), a tmpfs of ``scratch_mb``, and the folder of its Jupyter sockets;
- nothing of ``solutions/``, of another submission, of the repository beyond the three folders above, or of any
  home directory.

Limits that hold for all of its processes together come from a cgroup (memory, processes) where the machine
lets the grader make one (:class:`Cgroup`); otherwise each process gets ``RLIMIT_AS`` and, under the dedicated
uid, ``RLIMIT_NPROC`` counts them all (see :mod:`autograder.limits`, and the README's instructor section).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .rules import library_file

SANDBOX_UID = 65534  # "nobody": learner code never runs as root
PASSED_ENVIRONMENT = ("TRITON_INTERPRET", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "LANG",
                      "LC_ALL", "TZ")
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "passwd", "group", "hosts", "localtime",
        "alternatives", "ssl", "ca-certificates", "fonts")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one learner's sandbox. ``memory_mb`` and ``processes`` hold for all its processes together where
    a cgroup can be made, else per process (memory) and per uid (processes); 0 turns a limit off."""

    memory_mb: int = 8192
    processes: int = 1024  # processes and threads
    scratch_mb: int = 1024  # the private /tmp (a tmpfs, so it also counts as memory)
    file_mb: int = 2048  # largest file one process may write


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot make namespaces here; the message says which and what to install."""


def library_folders():
    """The folders the kernel needs: ``sb_ref`` and ``sb_ref.kernels`` as installed, and the grader's own."""
    import importlib.util

    found = [Path(importlib.util.find_spec(name).origin).parent for name in ("sb_ref", "sb_ref.kernels")]
    return sorted({str(p) for p in (*found, Path(__file__).resolve().parent)})


def _outside_site_packages():
    """Package folders on the grader's path outside Python's prefixes (a user's site-packages): never a source tree."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return [entry for entry in dict.fromkeys(sys.path)
            if entry.endswith(("site-packages", "dist-packages")) and os.path.isdir(entry)
            and not any(entry.startswith(p + os.sep) for p in prefixes)]


def _python_path():
    """The kernel's PYTHONPATH: the grader's parent folder, sb_ref's where it is not installed in a prefix, and the
    package folders outside the prefixes."""
    import importlib.util

    sb_ref_parent = str(Path(importlib.util.find_spec("sb_ref").origin).parent.parent)
    grader_parent = str(Path(__file__).resolve().parent.parent)
    return list(dict.fromkeys([sb_ref_parent, grader_parent, *_outside_site_packages()]))


def wrap(view, program, devices=()):
    """argv that runs ``program`` in bubblewrap, with ``view`` (bubblewrap's mount and environment arguments).

    As root: an outer bubblewrap (root, so that it may bind what only root can reach) makes every namespace but the
    user's; then the uid drops to :data:`SANDBOX_UID` for good (no capability, no new privileges); then an inner,
    unprivileged bubblewrap makes the user namespace, around exactly the outer view (``devices``, such as the GPUs,
    bound again into its fresh ``/dev``). Otherwise one unprivileged bubblewrap makes every namespace, the user's
    included."""
    session = ["--die-with-parent", "--new-session"]
    if os.geteuid() != 0:
        return [shutil.which("bwrap"), "--unshare-all", "--hostname", "sandbox", *session, *view, "--", *program]
    drop = [shutil.which("setpriv"), f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--"]
    inner = [shutil.which("bwrap"), "--unshare-user", *session, "--bind", "/", "/", "--dev", "/dev",
             *[arg for device in devices for arg in ("--dev-bind", device, device)], "--"]
    return [shutil.which("bwrap"), "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--hostname",
            "sandbox", "--unshare-cgroup-try", *session, *view, "--", *drop, *inner, *program]


@lru_cache(maxsize=1)
def bwrap_problem():
    """None when bubblewrap works here, else one line that says why not."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv is not installed (Debian/Ubuntu: apt-get install util-linux)"
    probe = subprocess.run(wrap(["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"], ["true"]),
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"bubblewrap cannot make its namespaces here: {probe.stderr.strip()[:300]}"
    return None


def _open_parents(view):
    """``--dir`` arguments that make every folder above a bind's destination world-readable in the view (bubblewrap
    would copy the host's modes, and a root grader's ``/root`` is closed to the sandbox's uid)."""
    parents = []
    for i, word in enumerate(view):
        if word in ("--ro-bind", "--ro-bind-try", "--bind", "--dev-bind"):
            for parent in reversed(Path(view[i + 2]).parents):
                if str(parent) not in ("/", "/tmp") and str(parent) not in parents:
                    parents.append(str(parent))
    return [arg for parent in parents for arg in ("--perms", "0755", "--dir", parent)]


class Cgroup:
    """A cgroup of the grader's own (v2, or v1's memory and pids hierarchies) that holds one sandbox's processes:
    its memory and process limits hold for all of them together, and its peak memory is read from outside.
    :meth:`make` returns None where the machine does not let the grader create one."""

    def __init__(self, dirs, version):
        self.dirs, self.version = dirs, version

    @classmethod
    def make(cls, limits, name):
        try:
            own = dict(line.split(":", 2)[1:] for line in Path("/proc/self/cgroup").read_text().splitlines())
        except OSError:
            return None
        made = []
        try:
            if own.get("memory") is not None:
                memory = Path("/sys/fs/cgroup/memory", own["memory"].lstrip("/"), name)
                pids = Path("/sys/fs/cgroup/pids", own.get("pids", "/").lstrip("/"), name)
                for path in (memory, pids):
                    path.mkdir()
                    made.append(path)
                if limits.memory_mb:
                    (memory / "memory.limit_in_bytes").write_text(str(limits.memory_mb << 20))
                    _try_write(memory / "memory.memsw.limit_in_bytes", str(limits.memory_mb << 20))
                if limits.processes:
                    (pids / "pids.max").write_text(str(limits.processes))
                return cls(made, 1)
            path = Path("/sys/fs/cgroup", own[""].lstrip("/"), name)
            path.mkdir()
            made.append(path)
            if limits.memory_mb:
                (path / "memory.max").write_text(str(limits.memory_mb << 20))
                _try_write(path / "memory.swap.max", "0")
            if limits.processes:
                (path / "pids.max").write_text(str(limits.processes))
            return cls(made, 2)
        except (OSError, KeyError):
            for path in reversed(made):
                _try_rmdir(path)
            return None

    @property
    def procs_files(self):
        return [str(d / "cgroup.procs") for d in self.dirs]

    def _memory_file(self, v1, v2):
        return self.dirs[0] / (v1 if self.version == 1 else v2)

    def _stat(self):
        return dict(line.split() for line in self._memory_file("memory.stat", "memory.stat").read_text().splitlines())

    def memory_bytes(self):
        """Memory charged to it now (page cache included)."""
        return int(self._memory_file("memory.usage_in_bytes", "memory.current").read_text())

    def anonymous_bytes(self):
        """Memory its processes hold themselves (no page cache): what a notebook's own data takes."""
        stat = self._stat()
        return int(stat["total_rss"] if "total_rss" in stat else stat.get("rss", stat.get("anon", 0)))

    def faulted_bytes(self):
        """Bytes of pages its processes have faulted in so far (a count that only grows: memory freed and taken
        again counts again)."""
        stat = self._stat()
        return int(stat.get("total_pgfault", stat.get("pgfault", 0))) * os.sysconf("SC_PAGE_SIZE")

    def watch_peak(self):
        """Start measuring the peak from now; returns a function that reads it (bytes charged at most since)."""
        if self.version == 1:
            self._memory_file("memory.max_usage_in_bytes", "").write_text("0")
            return lambda: int(self._memory_file("memory.max_usage_in_bytes", "").read_text())
        fd = os.open(self._memory_file("", "memory.peak"), os.O_RDWR)  # v2: a reset holds for this descriptor
        os.write(fd, b"reset\n")

        def read():
            os.lseek(fd, 0, os.SEEK_SET)
            value = int(os.read(fd, 64))
            os.close(fd)
            return value
        return read

    def pids(self):
        return [int(p) for p in Path(self.procs_files[0]).read_text().split()]

    def remove(self):
        """Kill whatever is left in it, then remove it."""
        for _ in range(50):
            left = self.pids()
            for pid in left:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            if all(_try_rmdir(d) for d in self.dirs):
                return
            time.sleep(0.05)


def _try_write(path, text):
    try:
        path.write_text(text)
    except OSError:
        pass


def _try_rmdir(path):
    try:
        path.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


class Sandbox:
    """One learner's sandbox: its private folders, its cgroup, and the command that starts a program inside.

    Args:
        lesson_dir: the submission's lesson folder, seen read-only as ``/lesson``.
        limits: a :class:`SandboxLimits`.
        hidden: {path inside the repository: text} files shown in place of the library's own (see
            :mod:`autograder.rules`).
        enabled: False runs the program without bubblewrap (the grader says so; nothing is isolated).
    """

    def __init__(self, lesson_dir, limits=SandboxLimits(), hidden=None, enabled=True):
        self.lesson_dir, self.limits, self.enabled = Path(lesson_dir).resolve(), limits, enabled
        self.root = Path(tempfile.mkdtemp(prefix="autograder-sandbox-"))
        os.chmod(self.root, 0o711)
        self.calls = self.root / "calls"  # the grader's: requests, and the pipe answers go into
        self.calls.mkdir(mode=0o755)
        self.stubs = self.root / "stubs"
        self.stubs.mkdir(mode=0o755)
        self.hidden = {}
        for n, (relative, text) in enumerate(sorted((hidden or {}).items())):
            stub = self.stubs / f"{n}.py"
            stub.write_text(text)
            stub.chmod(0o644)
            self.hidden[str(library_file(relative))] = str(stub)
        self._sockets = self._cgroups = self._calls = 0

    @property
    def uid(self):
        return SANDBOX_UID if self.enabled and os.geteuid() == 0 else os.geteuid()

    def new_socket_dir(self):
        """A fresh folder for one kernel start's Jupyter sockets and connection file, writable by the sandbox."""
        self._sockets += 1
        path = self.root / f"sockets-{self._sockets}"
        path.mkdir(mode=0o700)
        self.give(path)
        return path

    def give(self, path):
        """Make ``path`` the sandbox uid's (when the grader is root)."""
        if self.uid != os.geteuid():
            os.chown(path, self.uid, self.uid)

    def take_back(self, path):
        """Make ``path`` the grader's again and read-only to the sandbox: no socket can be swapped after start."""
        if self.uid != os.geteuid():
            os.chown(path, os.geteuid(), os.getegid())
            os.chmod(path, 0o755)

    def make_cgroup(self):
        """A fresh cgroup under this sandbox's limits, for one process tree (None where none can be made)."""
        self._cgroups += 1
        return Cgroup.make(self.limits, f"autograder-{os.getpid()}-{self.root.name[-8:]}-{self._cgroups}")

    def new_call_folder(self):
        """A fresh folder of the grader's for one session's requests and answer pipe (the sandbox reads it)."""
        self._calls += 1
        path = self.calls / f"session-{self._calls}"
        path.mkdir(mode=0o755)
        return path

    def command(self, program, socket_dir, env, gpu=False, cgroup=None):
        """argv that runs ``program`` (a list) inside the sandbox, with the limits (held by ``cgroup`` where there
        is one), environment ``env``."""
        limits = [sys.executable, "-m", "autograder.limits", "--memory-mb",
                  str(0 if gpu or (cgroup and self.limits.memory_mb) else self.limits.memory_mb),
                  "--file-mb", str(self.limits.file_mb)]
        if cgroup is not None:
            for procs in cgroup.procs_files:
                limits += ["--cgroup-procs", procs]
        elif self.uid != os.geteuid():
            limits += ["--processes", str(self.limits.processes)]
        if not self.enabled:
            return [*limits, "--", *program]
        scratch = ["--perms", "1777", "--size", str(self.limits.scratch_mb << 20), "--tmpfs", "/tmp"]
        view = [*self._system(), *self._python(), *self._repository(), *self._learner(socket_dir, gpu)]
        devices = sorted(glob.glob("/dev/nvidia*")) if gpu else []
        return [*limits, "--", *wrap([*scratch, *_open_parents(view), *view, *self._environment(env)], program,
                                     devices)]

    def _system(self):
        args = ["--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        for name in _ETC:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for tool in filter(None, map(shutil.which, ("bwrap", "setpriv"))):  # the inner bubblewrap runs inside
            if not tool.startswith("/usr/"):
                args += ["--ro-bind", tool, tool]
        return args

    def _python(self):
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        args = []
        for prefix in sorted(prefixes):
            args += ["--ro-bind", prefix, prefix]
        real = os.path.realpath(sys.executable)
        if not any(real.startswith(p + os.sep) for p in prefixes):
            args += ["--ro-bind", real, real]
        for entry in _outside_site_packages():
            args += ["--ro-bind", entry, entry]
        return args

    def _repository(self):
        """The library and its kernels where Python finds them, and the grader's own folder (its kernel side)."""
        args = []
        for folder in library_folders():
            args += ["--ro-bind", folder, folder]
        for original, stub in self.hidden.items():
            args += ["--ro-bind", stub, original]
        return args

    def _learner(self, socket_dir, gpu):
        args = ["--ro-bind", str(self.lesson_dir), "/lesson", "--chdir", "/lesson",
                "--ro-bind", str(self.calls), str(self.calls),
                "--bind", str(socket_dir), str(socket_dir)]
        if gpu:
            for device in sorted(glob.glob("/dev/nvidia*")):
                args += ["--dev-bind", device, device]
            args += ["--ro-bind", "/sys", "/sys"]
        return args

    def _environment(self, env):
        values = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
        values.update(env)
        values.update(HOME="/tmp", TMPDIR="/tmp", USER="learner", LOGNAME="learner",
                      PATH=os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]),
                      PYTHONPATH=os.pathsep.join(_python_path()), PYTHONDONTWRITEBYTECODE="1",
                      MPLCONFIGDIR="/tmp/matplotlib",
                      TRITON_CACHE_DIR="/tmp/triton", TRITON_HOME="/tmp", XDG_CACHE_HOME="/tmp/cache",
                      IPYTHONDIR="/tmp/ipython", JUPYTER_CONFIG_DIR="/tmp/jupyter", JUPYTER_DATA_DIR="/tmp/jupyter",
                      JUPYTER_RUNTIME_DIR="/tmp/jupyter", TORCHINDUCTOR_CACHE_DIR="/tmp/inductor",
                      CUDA_CACHE_PATH="/tmp/cuda")
        args = ["--clearenv"]
        for name, value in sorted(values.items()):
            args += ["--setenv", name, str(value)]
        return args

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)
