"""Start a program under resource limits: ``python -m autograder.limits --memory-mb N -- PROGRAM ARGS...``.

The learner's Jupyter kernel is started through this, so everything the learner's code runs inherits the
limit: an address-space cap (``RLIMIT_AS``) and no core dumps. Allocations beyond the cap fail inside the
learner's code instead of taking the machine down. CUDA reserves far more address space than it uses, so on
a GPU the cap is left off (``--memory-mb 0``) and the grader watches resident memory instead.
"""
import argparse
import os
import resource


def main():
    parser = argparse.ArgumentParser(prog="python -m autograder.limits")
    parser.add_argument("--memory-mb", type=int, required=True, help="address-space cap; 0 for none")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no program given")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if args.memory_mb > 0:
        cap = args.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
