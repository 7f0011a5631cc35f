"""The course environment and its commands.

- requirements.lock pins every package the course needs, exactly, for every supported Python;
  environment.yml (the conda route) lists the same pins.
- The Makefile keeps Jupyter, IPython, matplotlib, Triton and PyTorch out of the user's home.
- ``.ci/run`` fails when a test fails or when no test ran.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
ENVIRONMENT_YML = ROOT / "environment.yml"

# What the course needs pinned (DESIGN.md): numpy is listed because Triton's interpreter needs it.
COURSE_PACKAGES = {"torch", "triton", "numpy", "matplotlib", "jupyterlab", "nbgrader", "nbclient", "pytest"}
SUPPORTED_PYTHONS = ["3.10", "3.11", "3.12", "3.13", "3.14"]

# The tests that run `make` and `.ci/run` need the project's own .venv, already installed:
# anywhere else they would start a full install.
IN_PROJECT_VENV = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()
needs_project_venv = pytest.mark.skipif(
    not IN_PROJECT_VENV or shutil.which("make") is None,
    reason="runs make; only inside the project's .venv (make install / make test)",
)


# --------------------------------------------------------------------------- the pins


def read_lock() -> list[str]:
    lines = []
    for raw in LOCK.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"')
    return value


def read_environment_yml() -> tuple[list[str], list[str]]:
    """(conda dependencies, pip dependencies) of environment.yml.

    A small reader for the simple YAML that file uses (PyYAML is not a dependency): a
    ``dependencies:`` list whose items are strings and one ``- pip:`` item holding a list of strings.
    """
    conda, pip = [], []
    in_dependencies = False
    pip_indent = None
    for raw in ENVIRONMENT_YML.read_text().splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():  # a top-level key
            in_dependencies = raw.split(":", 1)[0].strip() == "dependencies"
            pip_indent = None
            continue
        if not in_dependencies:
            continue
        match = re.match(r"^(\s*)-\s+(.*?)\s*$", raw)
        assert match, f"environment.yml: unexpected line in dependencies: {raw!r}"
        indent, value = len(match.group(1)), match.group(2)
        if value.startswith(("'", '"')):
            value = _unquote(value)
        else:
            value = value.split(" #", 1)[0].strip()
        if pip_indent is not None and indent > pip_indent:
            pip.append(value)
        elif value == "pip:":
            pip_indent = indent
        else:
            pip_indent = None
            conda.append(value)
    return conda, pip


def pins(lines: list[str]) -> list[Requirement]:
    return [Requirement(line) for line in lines]


def applicable(requirements: list[Requirement], python: str) -> dict[str, Requirement]:
    """The requirements that apply on a given Python, by package name (each name at most once)."""
    chosen: dict[str, Requirement] = {}
    for req in requirements:
        if req.marker is None or req.marker.evaluate({"python_version": python, "python_full_version": f"{python}.0"}):
            name = canonicalize_name(req.name)
            assert name not in chosen, f"{req.name} is pinned twice for Python {python}"
            chosen[name] = req
    return chosen


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    return spec.version


def test_lock_pins_exactly():
    for req in pins(read_lock()):
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"requirements.lock must pin exact versions (name==version): {req}"
        )


@pytest.mark.parametrize("python", SUPPORTED_PYTHONS)
def test_lock_pins_every_course_package_once_per_python(python):
    chosen = applicable(pins(read_lock()), python)
    missing = COURSE_PACKAGES - chosen.keys()
    assert not missing, f"requirements.lock pins nothing for {sorted(missing)} on Python {python}"


def test_lock_pins_the_course_torch_and_its_triton():
    chosen = applicable(pins(read_lock()), "3.11")
    # torch 2.13.0 is the course's release, and 3.7.1 the Triton release it is built against.
    assert pinned_version(chosen["torch"]) == "2.13.0"
    assert pinned_version(chosen["triton"]) == "3.7.1"


def test_lock_can_build_the_editable_install():
    """setuptools is pinned (the editable install is built without isolation) at a version pyproject accepts."""
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    chosen = applicable(pins(read_lock()), "3.11")
    for requirement in map(Requirement, build_requires):
        name = canonicalize_name(requirement.name)
        assert name in chosen, f"requirements.lock does not pin the build requirement {requirement}"
        assert requirement.specifier.contains(pinned_version(chosen[name])), (
            f"requirements.lock pins {chosen[name]}, but pyproject.toml's build needs {requirement}"
        )


def test_environment_yml_mirrors_the_lock():
    conda, pip = read_environment_yml()
    assert "-e ." in pip, "environment.yml must install this repository (- -e .) in its pip section"
    yml_pins = sorted(str(r) for r in pins([line for line in pip if line != "-e ."]))
    lock_pins = sorted(str(r) for r in pins(read_lock()))
    assert yml_pins == lock_pins, (
        "environment.yml and requirements.lock disagree:\n"
        f"  only in environment.yml:   {sorted(set(yml_pins) - set(lock_pins))}\n"
        f"  only in requirements.lock: {sorted(set(lock_pins) - set(yml_pins))}"
    )
    assert "pip" in conda
    (python,) = [dep for dep in conda if re.match(r"python\b", dep)]
    version = re.fullmatch(r"python\s*=+\s*(3\.\d+)(\.\*)?", python)
    assert version, f"environment.yml should pin a Python minor version (python=3.X), found {python!r}"
    assert version.group(1) in SUPPORTED_PYTHONS


def test_yaml_reader_understands_quotes_and_comments(tmp_path, monkeypatch):
    sample = tmp_path / "environment.yml"
    sample.write_text(
        "name: x\n"
        "channels:\n  - conda-forge\n"
        "dependencies:\n"
        "  - python=3.12   # comment\n"
        "  - pip\n"
        "  - pip:\n"
        "      - a==1\n"
        "      - 'b==2; python_version < \"3.11\"'\n"
        "      # a comment line\n"
        "      - -e .\n"
        "  - git\n"
        "variables:\n  X: '1'\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ENVIRONMENT_YML", sample)
    assert read_environment_yml() == (
        ["python=3.12", "pip", "git"],
        ["a==1", 'b==2; python_version < "3.11"', "-e ."],
    )


@pytest.mark.skipif(not IN_PROJECT_VENV, reason="checks the project's own .venv (make install)")
def test_project_venv_holds_the_pinned_versions():
    from importlib.metadata import PackageNotFoundError, version

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    wrong = []
    for name, req in applicable(pins(read_lock()), python).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            wrong.append(f"{req}: not installed")
            continue
        # A local build label (torch 2.13.0+cpu) satisfies the pin 2.13.0.
        if not req.specifier.contains(installed, prereleases=True):
            wrong.append(f"{req}: {installed} installed")
    assert not wrong, "the .venv does not match requirements.lock (run make install):\n  " + "\n  ".join(wrong)


# --------------------------------------------------------------------------- the Makefile


def make_env() -> dict[str, str]:
    """The environment variables the Makefile runs the test suite and the grader with."""
    proc = subprocess.run(["make", "-s", "--no-print-directory", "env"], cwd=ROOT, capture_output=True, text=True,
                          env=without_make_vars(os.environ), timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = {}
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"export (\w+)=(.*)", line.strip())
        assert match, f"unexpected line from make env: {line!r}"
        found[match.group(1)] = match.group(2)
    return found


def without_make_vars(env) -> dict[str, str]:
    """An environment for a nested make or pytest: nothing inherited from an outer make or pytest."""
    return {
        k: v for k, v in env.items()
        if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR")
        and not k.startswith("PYTEST_")
    }


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_keeps_tool_state_inside_the_repository():
    env = make_env()
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR",
                 "TRITON_CACHE_DIR", "TRITON_HOME"):
        assert name in env, f"make does not set {name}"
    for name, value in env.items():
        if value.startswith("/"):
            assert Path(value).is_relative_to(ROOT / ".build"), f"{name}={value} is not inside .build/"


@needs_project_venv
def test_make_install_is_a_no_op_once_installed():
    proc = subprocess.run(["make", "-q", "install"], cwd=ROOT, env=without_make_vars(os.environ),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, "make install would do work again although nothing changed"


# --------------------------------------------------------------------------- CI


@needs_project_venv
@pytest.mark.parametrize(
    "test_source, expect_success",
    [
        ("def test_passes():\n    assert True\n", True),
        ("def test_fails():\n    assert False\n", False),
        ("def helper():\n    pass\n", False),  # no test collected: pytest exits 5
    ],
    ids=["a-test-passes", "a-test-fails", "no-test-ran"],
)
def test_ci_passes_only_when_tests_ran_and_passed(tmp_path, test_source, expect_success):
    test_file = tmp_path / "test_sample.py"
    test_file.write_text(test_source)
    env = without_make_vars(os.environ)
    env["PYTEST_ARGS"] = f"-p no:cacheprovider {test_file}"
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run")], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == expect_success, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ci_script_is_strict_and_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert commands[-1] == "make test"
