"""The distribution: `uv build` makes a wheel named pybus-cqrs (import name `pybus`), with its
license, that installs into a fresh virtual environment and runs the quickstart there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_in_a_fresh_environment_and_runs_the_quickstart(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is needed to build the wheel (it runs this suite: `uv run pytest`)")
    built = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("pybus_cqrs-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "pybus/__init__.py" in names
    assert "pybus/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    quickstart = tmp_path / "quickstart.py"  # a copy, away from the repository's own pybus
    shutil.copy(ROOT / "examples" / "quickstart.py", quickstart)
    ran = subprocess.run([str(python), str(quickstart)], cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    expected = subprocess.run(
        [sys.executable, "examples/quickstart.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert ran.stdout == expected.stdout
    version = subprocess.run([str(venv / "bin" / "pybus"), "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("pybus ")
