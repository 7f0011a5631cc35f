"""The speed leaderboard: every submission's lesson-08 kernel, timed in this one grader process, in one table.

``python -m autograder --with-hidden submitted/ --leaderboard board.md`` grades as usual and, for each lesson-08
notebook, keeps what its speed check measured (:func:`sb_ref.testing.speed.recorded_speeds`): the check runs in the
grader's process, times the learner's ``fast_forward`` from outside its sandbox and sb_ref's kernel right after, on
the same device and shapes (lesson 08's :data:`~sb_ref.testing.lessons.lesson08.FAST_FORWARD_TIERS` and timing
case). The last measurement of a notebook counts, as its score does (with hidden tests the check runs twice).

The board ranks the submissions whose numerics passed by their throughput ratio to sb_ref's kernel. Without a GPU
nothing is timed: the table still lists every submission's numerics, with "no GPU" in the speed columns, and the
header says that the ranking needs a GPU.
"""
import datetime
import platform
from dataclasses import dataclass

LESSON = "08_performance"
EXERCISE = "test_fast_forward"
CHECK = "check_fast_forward"


@dataclass
class Entry:
    """One submission's row: ``numerics`` "pass", "fail", or the exercise's status when its check never got to
    compare (not attempted, timed out, crashed); ``ratio`` sb_ref's time over the learner's (None: not timed);
    ``share`` the speed tier's share of the points; ``note`` why there is no time."""

    submission: str
    numerics: str
    ms: float = None
    reference_ms: float = None
    ratio: float = None
    share: float = None
    note: str = ""


def entry(submission, grade, records):
    """The row of one lesson-08 :class:`~autograder.grading.NotebookGrade`, from the speed records taken while it
    was graded (:func:`sb_ref.testing.speed.recorded_speeds`)."""
    if not isinstance(submission, str) or not submission:
        raise ValueError(f"submission must be a non-empty name, got {submission!r}")
    mine = [r for r in records if r.get("check") == CHECK]
    exercise = next((e for e in grade.exercises if e.grade_id == EXERCISE), None)
    if grade.error or exercise is None:
        return Entry(submission, "not graded", note=grade.error or f"no {EXERCISE} in this notebook")
    if not mine:  # the check stopped before comparing with sb_ref: the oracle's numerics, or no function at all
        numerics = "fail" if exercise.status == "failed" else exercise.status
        return Entry(submission, numerics, note=_first_line(exercise.message))
    last = mine[-1]
    if not last["numerics"]:
        return Entry(submission, "fail", note=last["error"])
    untimed = "" if last["ratio"] is not None or last["error"].startswith("no GPU") else last["error"]
    return Entry(submission, "pass", last["ms"], last["reference_ms"], last["ratio"], last["share"], untimed)


def _first_line(message):
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return line if len(line) <= 160 else line[:157] + "..."


def ranked(entries):
    """Timed entries first, fastest (highest ratio) first; then those that passed numerics untimed; then the rest;
    ties keep the submissions' order."""
    def key(e):
        return (0, -e.ratio) if e.ratio is not None else ((1, 0) if e.numerics == "pass" else (2, 0))
    return sorted(entries, key=key)


def _versions():
    import torch
    import triton

    import sb_ref
    cuda = f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""
    return (f"python {platform.python_version()}, torch {torch.__version__}{cuda}, triton {triton.__version__}, "
            f"sb_ref {getattr(sb_ref, '__version__', '?')}")


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


class Leaderboard:
    """The rows gathered while grading (:meth:`add`, one lesson-08 notebook at a time), and the page they make."""

    def __init__(self):
        self.entries, self.timing, self.tiers = [], None, None

    def add(self, submission, grade, records):
        """Adds the row of ``grade`` (see :func:`entry`); the records also say what was timed, and in which tiers."""
        self.entries.append(entry(submission, grade, records))
        for record in records:
            if record.get("check") == CHECK and self.timing is None:
                self.timing, self.tiers = record["timing"], record["tiers"]
        return self.entries[-1]

    def markdown(self, *, device, on_gpu, date=None):
        """The page: a header (device, versions, date, what was timed, the tiers), then one row per submission
        (rank, submission, ms, sb_ref ms, ratio to sb_ref, tier, numerics, note)."""
        if not isinstance(on_gpu, bool):
            raise TypeError(f"on_gpu must be a bool, got {type(on_gpu).__name__}")
        date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        lines = ["# Lesson 08 speed leaderboard: `fast_forward` against sb_ref's kernel", "",
                 f"- device: {device}", f"- software: {_versions()}", f"- date: {date}"]
        if self.timing is not None:
            t = self.timing
            tiers = ", ".join(f">= {least:g}x: {share:.0%}" for least, share in self.tiers)
            where = "" if on_gpu else " (on a GPU; not here)"
            lines += [f"- timed{where}: (B, H, T, D) = ({t.B}, {t.H}, {t.T}, {t.D}), {t.dtype}, causal, {t.regime} "
                      "inputs; each submission, then sb_ref's kernel, in this one grader process",
                      f"- ratio: sb_ref's time over the submission's (higher is faster); tiers, as the share of the "
                      f"exercise's points: {tiers}"]
        lines.append("")
        if not on_gpu:
            lines += ["**No GPU: nothing was timed.** Speed is measured on a GPU only: run this command on a GPU "
                      "machine for the ranking. Below, each submission's numerics.", ""]
        lines += ["| rank | submission | ms | sb_ref ms | ratio to sb_ref | tier | numerics | note |",
                  "|---:|---|---:|---:|---:|---|---|---|"]
        rank = 0
        for e in ranked(self.entries):
            if e.ratio is not None:
                rank += 1
                speed = [f"{e.ms:.3f}", f"{e.reference_ms:.3f}", f"{e.ratio:.3f}x", f"{e.share:.0%}"]
            else:
                speed = ["no GPU" if not on_gpu and e.numerics == "pass" else "-"] * 4
            cells = [rank if e.ratio is not None else "-", e.submission, *speed, e.numerics, e.note]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if not self.entries:
            lines.append("| - | (no lesson-08 submission) | - | - | - | - | - | - |")
        return "\n".join(lines) + "\n"

    def write(self, path, **kw):
        with open(path, "w") as f:
            f.write(self.markdown(**kw))


def submission_name(path, display):
    """A submission's name: ``submitted/alice`` for ``submitted/alice/08_performance/08_performance.ipynb``
    (``display`` turns a path into the text the report uses)."""
    folder = path.parent.parent if path.parent.name == path.stem else path.parent
    return display(folder)
