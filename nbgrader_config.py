"""nbgrader's settings for the stick-breaking attention course. Run nbgrader from this folder.

The course root is this folder: ``solutions/`` is nbgrader's source (solved notebooks with solution and hidden-test
regions), ``lessons/`` its release (what learners open). Regenerate the release with ``make release``; collect
submissions into ``submitted/<student>/<lesson>/<lesson>.ipynb``, then ``nbgrader autograde <lesson> --create`` and
``nbgrader generate_feedback <lesson>`` (feedback lands in ``feedback/<student>/<lesson>/``). Run nbgrader with
``.venv/bin`` first on PATH (``source .venv/bin/activate``): it calls its database tool ``alembic`` by name. The
gradebook is ``gradebook.db`` in this folder.

Three preprocessors are defined here:

- ``NamedStubs`` replaces each solution region with ``raise NotImplementedError("<task>: ...")`` naming the function
  (or method) the learner has to write, instead of nbgrader's anonymous stub;
- ``CleanRelease`` strips outputs, execution counts and per-machine metadata from the release;
- ``HideHiddenTestsInFeedback`` removes the hidden-test regions from the feedback, and cuts the tracebacks of those
  cells down to the error message (a traceback would quote the hidden line that failed). The checks' messages say
  what failed (regime, shape, worst error, hint) without quoting the test code.
"""
import os
import re

from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (CheckCellMetadata, NbGraderPreprocessor, ClearHiddenTests, ClearMarkScheme, ClearOutput, ClearSolutions,
                                    ComputeChecksums, GetGrades, IncludeHeaderFooter, InstantiateTests, LockCells,
                                    SaveCells)

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)


class NamedStubs(ClearSolutions):
    """ClearSolutions whose stub names the function or method that the learner writes."""

    def _task_name(self, cell):
        before = cell.source.split(self.begin_solution_delimeter)[0]
        names = re.findall(r"^(\s*)(?:def|class)\s+(\w+)", before, re.MULTILINE)
        if not names:
            return cell.metadata.get("nbgrader", {}).get("grade_id", "this exercise")
        indent, name = names[-1]
        owners = [n for i, n in names[:-1] if len(i) < len(indent)]
        return f"{owners[-1]}.{name}" if indent and owners else name

    def _replace_solution_region(self, cell, language):
        if self.begin_solution_delimeter not in cell.source:
            return False
        stub = f'# YOUR CODE HERE\nraise NotImplementedError("{self._task_name(cell)}: not written yet (see the task above)")'
        default = self.code_stub
        self.code_stub = dict(default, **{language: stub})
        try:
            return super()._replace_solution_region(cell, language)
        finally:
            self.code_stub = default


class HideHiddenTestsInFeedback(ClearHiddenTests):
    """Removes hidden-test regions from feedback, and the tracebacks of the cells that held them."""

    def preprocess_cell(self, cell, resources, cell_index):
        removed = self._remove_hidden_test_region(cell)
        if removed and cell.cell_type == "code":
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
        return cell, resources


class CleanRelease(NbGraderPreprocessor):
    """Last step of the release: no outputs, no execution counts, no per-machine metadata, so that the generated
    lessons are the same on every machine and their diffs stay readable."""

    keep_cell_metadata = ("nbgrader", "deletable", "editable", "tags")

    def preprocess(self, nb, resources):
        nb.metadata = {key: nb.metadata[key] for key in ("kernelspec", "language_info") if key in nb.metadata}
        if "language_info" in nb.metadata:
            nb.metadata["language_info"] = {"name": nb.metadata["language_info"].get("name", "python")}
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, cell_index):
        cell.metadata = {key: cell.metadata[key] for key in self.keep_cell_metadata if key in cell.metadata}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        return cell, resources


c.CourseDirectory.course_id = "stick-breaking-attention"
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "lessons"

# Release: nbgrader 0.9's list of steps, with NamedStubs in place of ClearSolutions and CleanRelease at the end.
c.GenerateAssignment.preprocessors = [
    IncludeHeaderFooter, InstantiateTests, LockCells, NamedStubs, ClearOutput, CheckCellMetadata, ComputeChecksums,
    SaveCells, ClearHiddenTests, ClearMarkScheme, ComputeChecksums, CheckCellMetadata, CleanRelease,
]
c.ClearSolutions.code_stub = {"python": '# YOUR CODE HERE\nraise NotImplementedError("not written yet")'}

# Autograding runs every notebook top to bottom in the kernel named python3 (the environment nbgrader runs in);
# each lesson runs in well under a minute on a laptop CPU, so five minutes per cell is a generous limit.
c.ExecutePreprocessor.timeout = 300
c.ExecutePreprocessor.kernel_name = "python3"
c.Execute.timeout = 300
c.Execute.kernel_name = "python3"

# Feedback: the grades, without the hidden tests.
c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTestsInFeedback, CSSHTMLHeaderPreprocessor]
c.HideHiddenTestsInFeedback.enforce_metadata = False
