"""The documentation site, built once per test process with the project's own mkdocs.yml."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_built: list[Path] = []


def built_site() -> Path:
    """The folder `mkdocs build` wrote (built on the first call; the build is strict, as in CI)."""
    if not _built:
        folder = Path(tempfile.mkdtemp(prefix="pybus-site-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        result = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(folder)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )
        assert result.returncode == 0, f"mkdocs build failed:\n{result.stdout}{result.stderr}"
        _built.append(folder)
    return _built[0]
