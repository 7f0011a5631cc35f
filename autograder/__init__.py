"""The course's grader: ``python -m autograder`` (or ``make grade``). It runs from this repository and is not
installed with ``sb_ref``; the checks that notebooks call live in the installed package, in ``sb_ref.testing.lessons``.

- :mod:`autograder.cli`: the command: which notebooks, which lesson each is, the report.
- :mod:`autograder.grading`: one notebook: trusted cells put back, learner cells in a kernel, tests in the grader.
- :mod:`autograder.kernel`: the learner's kernel, a Jupyter kernel with time limits, inside the sandbox of
  :mod:`autograder.sandbox` (bubblewrap, a cgroup, :mod:`autograder.limits`); :mod:`autograder.rules`: which of the
  library's files each lesson's sandbox shows as stubs.
- :mod:`autograder.remote` (the grader's side), :mod:`autograder.serve` (the kernel's side) and :mod:`autograder.wire`
  (the codec between them): calls from the grader into the learner's functions.
- :mod:`autograder.report`: the table and the JSON report; :mod:`autograder.leaderboard`: lesson 08's speed table
  over every submission (``--leaderboard``).
"""
