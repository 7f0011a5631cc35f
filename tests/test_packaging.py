"""Packaging: ``import sb_ref`` and ``import sb_ref.kernels`` work from everywhere they must.

From the repository root, from ``lessons/``, from an unrelated folder, through the editable install,
and from a built wheel; and nothing installs a top-level ``kernels`` or ``autograder`` module (both
names belong to popular PyPI packages). Every import runs in a fresh interpreter (this one's), so
what ``sys.path`` and ``sys.modules`` hold in the test process cannot help it along.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SB_REF = ROOT / "sb_ref"
KERNELS = ROOT / "kernels"

PROBE = """
import importlib.util, json, sys
import sb_ref, sb_ref.kernels
import sb_ref.testing.lessons.lesson01  # what the lesson notebooks import
print(json.dumps({
    "sb_ref": sb_ref.__file__,
    "kernels": sb_ref.kernels.__file__,
    "lessons": sb_ref.testing.lessons.lesson01.__file__,
    "api": [hasattr(sb_ref, name) for name in
            ("stick_breaking_attention", "stick_breaking_weights", "StickBreakingSelfAttention")],
    "top_level_kernels": getattr(importlib.util.find_spec("kernels"), "origin", None),
    "top_level_autograder": getattr(importlib.util.find_spec("autograder"), "origin", None),
}))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would put the repository on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def probe(cwd: Path, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"import sb_ref / sb_ref.kernels failed in {cwd}:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def assert_from_repo(found: dict) -> None:
    assert inside(found["sb_ref"], SB_REF), f"sb_ref came from {found['sb_ref']}, not {SB_REF}"
    assert inside(found["kernels"], KERNELS), f"sb_ref.kernels came from {found['kernels']}, not {KERNELS}"
    assert inside(found["lessons"], SB_REF), f"the lessons' checks came from {found['lessons']}, not {SB_REF}"
    assert all(found["api"]), "sb_ref lacks part of its public API"


def test_import_from_repo_root():
    assert_from_repo(probe(ROOT))


def test_import_from_lessons_folder():
    assert (ROOT / "lessons").is_dir()
    assert_from_repo(probe(ROOT / "lessons"))


def test_import_from_unrelated_folder_through_editable_install(tmp_path):
    found = probe(tmp_path)
    assert_from_repo(found)
    # The editable install maps sb_ref and sb_ref.kernels only: it does not put the repository on
    # sys.path, so the repository's kernels/ and autograder/ folders are not importable from elsewhere.
    for name in ("top_level_kernels", "top_level_autograder"):
        assert not inside(found[name], ROOT), f"{name.split('_', 2)[2]} is importable from outside: {found[name]}"


def test_editable_install_maps_the_repository():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("sb-ref")
    except PackageNotFoundError:
        pytest.fail("sb-ref is not installed in this environment: run `make install` (pip install -e .)")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    assert direct_url.get("dir_info", {}).get("editable"), f"sb-ref is installed, but not editable: {direct_url}"
    location = Path(unquote(urlparse(direct_url["url"]).path))
    assert location.resolve() == ROOT.resolve(), f"sb-ref is installed in editable mode from {location}"


def test_pyproject_ships_sb_ref_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_cfg = project["tool"]["setuptools"]
    assert setuptools_cfg["package-dir"]["sb_ref.kernels"] == "kernels"
    for package in setuptools_cfg["packages"]:
        assert package == "sb_ref" or package.startswith("sb_ref."), package
    assert project["project"]["requires-python"] == ">=3.10"
    requirements = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    assert {"torch", "triton", "numpy"} <= requirements.keys()
    for requirement in requirements.values():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators and operators <= {">=", "<", "!="}, (
            f"the library's own requirements stay ranges, so it installs next to any recent torch: {requirement}"
        )


def _copy_source_tree(dst: Path) -> Path:
    """The repository's files without build outputs, so a stale build/ cannot leak into the wheel."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", ".build", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ipynb_checkpoints",
    )
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _copy_source_tree(tmp_path_factory.mktemp("src") / "sb-ref")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         ".", "-w", str(out)],
        cwd=src,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("sb_ref-*.whl"))
    assert len(wheels) == 1, f"expected one sb_ref wheel, found {[w.name for w in out.iterdir()]}"
    return wheels[0]


def test_wheel_holds_sb_ref_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top_level if t.endswith(".dist-info")}
    assert top_level - dist_info == {"sb_ref"}, f"the wheel installs more than sb_ref: {sorted(top_level)}"
    assert "sb_ref/__init__.py" in names
    assert "sb_ref/kernels/__init__.py" in names
    for forbidden in ("kernels/", "autograder/", "tests/", "benchmarks/", "lessons/", "solutions/"):
        assert not any(name.startswith(forbidden) for name in names), f"the wheel ships a top-level {forbidden}"
    (info,) = dist_info
    top_level_txt = f"{info}/top_level.txt"
    if top_level_txt in names:
        assert zipfile.ZipFile(wheel).read(top_level_txt).decode().split() == ["sb_ref"]


def test_wheel_ships_every_module_of_sb_ref_and_kernels(wheel):
    """A subpackage left out of pyproject's explicit package list would be missing from the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sb_ref/{p.relative_to(SB_REF).as_posix()}" for p in SB_REF.rglob("*.py")}
    expected |= {f"sb_ref/kernels/{p.relative_to(KERNELS).as_posix()}" for p in KERNELS.rglob("*.py")}
    expected = {name for name in expected if "__pycache__" not in name}
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel (add their packages to pyproject.toml): {missing}"


def test_import_from_unpacked_wheel(wheel, tmp_path):
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = probe(elsewhere, env=clean_env(PYTHONPATH=str(unpacked)))
    assert inside(found["sb_ref"], unpacked), f"sb_ref came from {found['sb_ref']}, not the wheel"
    assert inside(found["kernels"], unpacked / "sb_ref" / "kernels"), (
        f"sb_ref.kernels came from {found['kernels']}, not the wheel"
    )
    assert inside(found["lessons"], unpacked), f"the lessons' checks came from {found['lessons']}, not the wheel"
    assert all(found["api"])
