"""The distribution ships conf/ so an installed wheel finds its YAML groups, and the C source
of the Gram kernel that strategies/kernels.py compiles on first use."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_packages_and_conf(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("squall-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml_file in (ROOT / "conf").rglob("*.yaml"):
        assert str(yaml_file.relative_to(ROOT)) in names
    for pkg in ("orchestrator", "strategies", "cloud"):
        assert f"{pkg}/__init__.py" in names
    assert "strategies/distances.c" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "squall = orchestrator.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_python_dash_m_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "squall <command>" in proc.stdout
