"""The distribution ships every package and subpackage (strategies/rules/ included), conf/ so an
installed wheel finds its YAML groups, and the C source of the Gram kernel that
strategies/kernels.py compiles on first use; building it warns about nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "strategies", "cloud", "conf")


def _source_files() -> list[Path]:
    """The files of the working tree that are not ignored (tracked or new), relative to ROOT."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: skip build outputs
        skip = {".git", ".venv", "build", "dist", "runs", "__pycache__"}
        return [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file()
                and not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)]
    return [Path(name) for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    """(the wheel, the build's output), built from a copy of the source files: a build/
    folder left in the checkout would hand stale modules to the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-cache-dir", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp / "dist").glob("squall-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive, proc.stdout + proc.stderr


def test_wheel_builds_without_warnings(wheel):
    output = wheel[1]
    assert "is absent from the `packages` configuration" not in output, output
    assert "warn" not in output.lower(), output


def test_wheel_contains_packages_conf_and_rules(wheel):
    names = set(wheel[0].namelist())
    yaml_files = list((ROOT / "conf").rglob("*.yaml"))
    assert len(yaml_files) > 10
    for yaml_file in yaml_files:
        assert yaml_file.relative_to(ROOT).as_posix() in names
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names
    assert "strategies/distances.c" in names
    rules = sorted((ROOT / "strategies" / "rules").glob("*.py"))
    assert len(rules) > 1, "strategies/rules/ holds no rule"
    for rule in rules:
        assert rule.relative_to(ROOT).as_posix() in names


def test_wheel_ships_every_module_and_nothing_else(wheel):
    names = set(wheel[0].namelist())
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES
               for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    shipped = {n for n in names if n.endswith(".py")}
    assert shipped == modules  # no test, no benchmark, no stale module from an old build/


def test_wheel_entry_point_is_the_cli(wheel):
    archive = wheel[0]
    entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
    assert "squall = orchestrator.cli:main" in archive.read(entry_points).decode()


def test_python_dash_m_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "squall <command>" in proc.stdout
