"""nbgrader's settings for the stick-breaking attention course. Run nbgrader from this folder.

The course root is this folder: ``solutions/`` is nbgrader's source (solved notebooks with solution and hidden-test
regions), ``lessons/`` its release (what learners open). Regenerate the release with ``make release``; collect
submissions into ``submitted/<student>/<lesson>/``, then ``nbgrader autograde <lesson>`` and
``nbgrader generate_feedback <lesson>``.

Two preprocessors are defined here:

- ``NamedStubs`` replaces each solution region with ``raise NotImplementedError("<task>: ...")`` naming the function
  (or method) the learner has to write, instead of nbgrader's anonymous stub;
- ``HideHiddenTestsInFeedback`` removes the hidden-test regions from the feedback, and cuts the tracebacks of those
  cells down to the error message (a traceback would quote the hidden line that failed). The checks' messages say
  what failed (regime, shape, worst error, hint) without quoting the test code.
"""
import os
import re

from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import (CheckCellMetadata, ClearHiddenTests, ClearMarkScheme, ClearOutput, ClearSolutions,
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


c.CourseDirectory.course_id = "stick-breaking-attention"
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "lessons"

# Release: stubs that name the task; everything else as nbgrader does it.
# (nbgrader 0.9's list, with NamedStubs in place of ClearSolutions)
c.GenerateAssignment.preprocessors = [
    IncludeHeaderFooter, InstantiateTests, LockCells, NamedStubs, ClearOutput, CheckCellMetadata, ComputeChecksums,
    SaveCells, ClearHiddenTests, ClearMarkScheme, ComputeChecksums, CheckCellMetadata,
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
