"""Start a program under resource limits: ``python -m autograder.limits --memory-mb N -- PROGRAM ARGS...``.

The learner's sandbox (:mod:`autograder.sandbox`) is started through this, so everything the learner's code runs
inherits the limits: no core dumps, files of at most ``--file-mb``, and either a cgroup (``--cgroup-procs``: this
process joins it before anything else runs, so that its memory and process limits hold for the whole tree) or, where
the machine gives none, an address-space cap per process (``--memory-mb``; allocations beyond it fail inside the
learner's code instead of taking the machine down) and a cap on the processes of the sandbox's uid
(``--processes``). CUDA reserves far more address space than it uses, so on
a GPU the cap is left off (``--memory-mb 0``) and the grader watches resident memory instead.
"""
import argparse
import os
import resource


def main():
    parser = argparse.ArgumentParser(prog="python -m autograder.limits")
    parser.add_argument("--memory-mb", type=int, required=True, help="address-space cap per process; 0 for none")
    parser.add_argument("--file-mb", type=int, default=0, help="largest file a process may write; 0 for no cap")
    parser.add_argument("--processes", type=int, default=0, help="processes and threads of this uid; 0 for no cap")
    parser.add_argument("--cgroup-procs", action="append", default=[], help="a cgroup.procs file to join")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no program given")
    for procs in args.cgroup_procs:
        with open(procs, "w") as file:
            file.write(str(os.getpid()))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for limit, value in ((resource.RLIMIT_AS, args.memory_mb << 20), (resource.RLIMIT_FSIZE, args.file_mb << 20),
                         (resource.RLIMIT_NPROC, args.processes)):
        if value > 0:
            resource.setrlimit(limit, (value, value))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
