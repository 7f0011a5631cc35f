"""Your own work from an earlier lesson, in a later one: :func:`from_lesson`.

The lessons build on each other: lesson 03's layer runs lesson 02's attention, lesson 07's autograd function lesson
06's forward kernel, the capstone trains on lesson 04's (CPU) or lessons 06-07's (GPU) attention. A later notebook
takes the function from the earlier lesson's notebook beside it (``../<lesson>/<lesson>.ipynb``: the layout of
``lessons/`` and of a submission folder), but only once it passes that lesson's check; until then it runs the
library's version and says so, naming the check to pass.

Of the earlier notebook only its definitions run, in a namespace of their own: imports, functions, classes, names
assigned a literal constant or an earlier lesson's function (this module's :func:`from_lesson`, so that lessons
chain); none of its demos, plots or test cells.
"""
import ast
import contextlib
import io
import json
import linecache
import types
from pathlib import Path

__all__ = ["from_lesson", "notebook_definitions"]


def _kept(statement):
    """Whether a top-level statement of a cell is a definition (see the module's docstring)."""
    if isinstance(statement, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
        value = statement.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "from_lesson":
            return True
        try:
            ast.literal_eval(value)
        except ValueError:
            return False
        return True
    return False


def _is_test_cell(cell):
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta.get("grade", False) and not meta.get("solution", False)


def notebook_definitions(path):
    """A module holding the definitions of the notebook at ``path`` (see the module's docstring), named after the
    notebook. Each cell is compiled under a name of its own whose source :mod:`linecache` holds, as Jupyter does:
    ``inspect.getsource`` and so ``@triton.jit`` work on the functions it defines. A cell that is not valid Python
    (an IPython magic, say) is left out. The notebook is read as the JSON it is: no Jupyter package is needed."""
    path = Path(path)
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] != "code" or _is_test_cell(cell):
            continue
        source = "".join(cell["source"])
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        tree.body = [statement for statement in tree.body if _kept(statement)]
        if not tree.body:
            continue
        filename = f"<{path.name} cell {index}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(tree, filename, "exec"), module.__dict__)
    return module


def from_lesson(lesson, name, check, fallback):
    """Your function ``name`` from lesson ``lesson``'s notebook (a lesson folder's name, e.g. "04_tiles"), found
    beside the current folder, if it passes ``check`` (that lesson's visible check); else ``fallback``. Either way
    one printed line says which it is and, for the fallback, what to finish first (an earlier lesson that itself
    takes a function from another says so too)."""
    if not isinstance(lesson, str) or not lesson or Path(lesson).name != lesson:
        raise ValueError(f"lesson must be the name of a lesson's folder, e.g. '04_tiles', got {lesson!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be the name of a function in that lesson's notebook, got {name!r}")
    for argument, value in (("check", check), ("fallback", fallback)):
        if not callable(value):
            raise TypeError(f"{argument} must be a function, got {type(value).__name__}")
    path = Path.cwd().parent / lesson / f"{lesson}.ipynb"
    if not path.is_file():
        return _falling_back(fallback, f"lesson {lesson}: no notebook {path.parent.name}/{path.name} beside this one")
    try:
        fn = getattr(notebook_definitions(path), name, None)
    except Exception as exc:  # the earlier notebook's definitions do not run
        return _falling_back(fallback, f"lesson {lesson}: its definitions raise {type(exc).__name__}: {exc}")
    if not callable(fn):
        return _falling_back(fallback, f"lesson {lesson}: its notebook defines no `{name}`")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            check(fn)
    except Exception as exc:  # AssertionError from the check, or anything the learner's code raised in it
        return _falling_back(fallback, f"lesson {lesson}: your `{name}` does not pass {check.__name__} yet "
                                       f"({_gist(exc)})")
    print(f"lesson {lesson}: your `{name}` passes {check.__name__}: it is the one used here")
    return fn


def _gist(exc):
    """The start of a check's failure: its first line, and the next one where the first announces it (an earlier
    exercise's failure, say)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    gist = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return gist if len(gist) <= 300 else gist[:297] + "..."


def _falling_back(fallback, why):
    print(f"{why}; using `{fallback.__name__}` (the library's) in its place")
    return fallback
