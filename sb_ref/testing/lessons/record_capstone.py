"""Records the capstone's reference results (lesson 09) from a real run::

    python -m sb_ref.testing.lessons.record_capstone [NOTEBOOK]

runs the code of the capstone's solution notebook (by default ``solutions/09_capstone/09_capstone.ipynb`` of this
repository) top to bottom in a fresh interpreter, in the notebook's folder, so that its stick-breaking model trains
on the solutions of the earlier lessons beside it, with the notebook's own settings for this machine's device
(``SB_CAPSTONE_STEPS`` is dropped from its environment). What the notebook measured (the accuracy per length of
both models), the settings, the attention the stick-breaking model ran on, the seconds the run took and the
machine's load are written as this device's entry of :data:`~sb_ref.testing.lessons.capstone_recorded.RECORDED`;
the notebook prints that entry beside the learner's table. ``tests/test_capstone_reference.py`` runs it again and
compares within :data:`TOLERANCE`.
"""
import argparse
import json
import os
import pprint
import subprocess
import sys
import time
from pathlib import Path

#: How far a fresh run's accuracy (a fraction of the reads) may be from the recorded one, length by length: the
#: training is seeded, but float rounding differs with the thread count and the CPU, and training amplifies it.
TOLERANCE = 0.05

RECORDED_FILE = Path(__file__).with_name("capstone_recorded.py")
# the notebook's names for what it measured; "attention": where the stick-breaking model's attention came from (the
# earlier lesson's notebook, or "__main__" for the notebook's own fallback to the library)
REPORT = """import json
print(json.dumps({"device": DEVICE, "settings": SETTINGS, "lengths": LENGTHS, "accuracy": results,
                  "attention": (sb_attention if DEVICE == "cuda" else blocked_attention).__module__,
                  "threads": torch.get_num_threads()}))"""


def notebook_as_script(path):
    """The code cells of the notebook at ``path``, in order, as one script (IPython magics and shell lines left out):
    no Jupyter package is needed, so a GPU machine without one runs it too."""
    code = []
    for cell in json.loads(Path(path).read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines = "".join(cell["source"]).splitlines()
            code.append("\n".join(line for line in lines if not line.lstrip().startswith(("%", "!"))))
    return "\n\n".join(code) + "\n"


def run(notebook, timeout=1800):
    """Runs ``notebook``'s code top to bottom as one script in a fresh interpreter in the notebook's folder; returns
    what it measured (a dict: device, settings, lengths, accuracy {attention: [accuracy per length]}, the module the
    stick-breaking attention came from, PyTorch's thread count, the seconds the run took, the one-minute load average
    before and after it)."""
    notebook = Path(notebook).resolve()
    env = {name: value for name, value in os.environ.items() if name != "SB_CAPSTONE_STEPS"}
    env["MPLBACKEND"] = "Agg"
    load_before, start = os.getloadavg(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-"], input=notebook_as_script(notebook) + REPORT, cwd=notebook.parent,
                          env=env, capture_output=True, text=True, timeout=timeout)
    seconds, load_after = time.perf_counter() - start, os.getloadavg()
    if proc.returncode != 0:
        raise RuntimeError(f"{notebook.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["accuracy"] = {name: [round(a, 4) for a in accs] for name, accs in result["accuracy"].items()}
    result.update(seconds=round(seconds, 1), load=[round(load_before[0], 2), round(load_after[0], 2)])
    return result


def differences(fresh, recorded):
    """[(attention, length, fresh, recorded)] for every accuracy further than :data:`TOLERANCE` from the record."""
    if fresh["lengths"] != recorded["lengths"] or set(fresh["accuracy"]) != set(recorded["accuracy"]):
        raise ValueError(f"the runs measured different things: lengths {fresh['lengths']} vs {recorded['lengths']}, "
                         f"models {sorted(fresh['accuracy'])} vs {sorted(recorded['accuracy'])}")
    return [(name, length, got, want) for name in recorded["accuracy"]
            for length, got, want in zip(recorded["lengths"], fresh["accuracy"][name], recorded["accuracy"][name])
            if abs(got - want) > TOLERANCE]


def write(entry, path=RECORDED_FILE):
    """Writes ``entry`` as its device's record into ``path``, keeping the other devices' records."""
    from .capstone_recorded import RECORDED

    recorded = {**RECORDED, entry["device"]: entry}
    path.write_text('"""The capstone\'s reference results (lesson 09), one entry per device, each from a real run of '
                    'its solution\nnotebook: written by `python -m sb_ref.testing.lessons.record_capstone`, not by '
                    'hand."""\n\nRECORDED = ' + pprint.pformat(recorded, width=116, sort_dicts=True) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sb_ref.testing.lessons.record_capstone",
                                     description=__doc__.split("::")[0].strip())
    repo = Path(__file__).resolve().parents[3]
    parser.add_argument("notebook", nargs="?", default=repo / "solutions" / "09_capstone" / "09_capstone.ipynb")
    notebook = Path(parser.parse_args(argv).notebook)
    if not notebook.is_file():
        parser.error(f"no notebook at {notebook}")
    entry = run(notebook)
    write(entry)
    print(json.dumps(entry, indent=1))
    print(f"recorded as the {entry['device']!r} entry of {RECORDED_FILE}")


if __name__ == "__main__":
    sys.exit(main())
