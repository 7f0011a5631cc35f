"""The grade report: a table for people, JSON for programs.

JSON shape (``--json FILE``)::

    {"schema": "sb-ref-grades/1", "graded_at": ISO-8601 time, "with_hidden": bool, "device": str,
     "points": float, "max_points": float,
     "notebooks": [{"path": str, "lesson": str, "points": float, "max_points": float, "seconds": float,
                    "error": str,       # non-empty when the notebook could not be graded at all
                    "notes": [str],     # cells that timed out or killed the kernel
                    "exercises": [{"grade_id": str, "max_points": float, "points": float,
                                   "status": "passed" | "failed" | "not attempted" | "timed out" | "crashed",
                                   "message": str}]}]}
"""
import datetime
import json
import textwrap

SCHEMA = "sb-ref-grades/1"


def _points(x):
    return f"{x:g}"


def table(grades):
    """A fixed-width table: one row per exercise, the check's message under anything not passed, totals."""
    rows = [("lesson", "exercise", "points", "status")]
    details = {}
    for grade in grades:
        if grade.error:
            rows.append((grade.lesson, "-", "0/?", "not graded"))
            details[len(rows) - 1] = grade.error
        for i, e in enumerate(grade.exercises):
            rows.append((grade.lesson if i == 0 else "", e.grade_id,
                         f"{_points(e.points)}/{_points(e.max_points)}", e.status))
            if e.status != "passed" or e.message:
                details[len(rows) - 1] = e.message
        for note in grade.notes:
            rows.append(("", "(note)", "", ""))
            details[len(rows) - 1] = note
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
        if details.get(n):
            lines += textwrap.wrap(details[n], width=100, initial_indent="      ",
                                   subsequent_indent="      ", max_lines=8)
    points = sum(g.points for g in grades)
    max_points = sum(g.max_points for g in grades)
    lines += ["", f"total: {_points(points)}/{_points(max_points)} points"]
    return "\n".join(lines)


def as_json(grades, *, with_hidden, device):
    return {
        "schema": SCHEMA,
        "graded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "with_hidden": with_hidden,
        "device": device,
        "points": sum(g.points for g in grades),
        "max_points": sum(g.max_points for g in grades),
        "notebooks": [g.to_dict() for g in grades],
    }


def write_json(path, grades, **kw):
    with open(path, "w") as f:
        json.dump(as_json(grades, **kw), f, indent=2)
        f.write("\n")
