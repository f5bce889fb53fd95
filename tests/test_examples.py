"""Every example runs, as a user would run it, and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout


def test_quickstart_shows_command_follow_up_and_query() -> None:
    assert run_example("quickstart.py").splitlines() == [
        "[command] RegisterUser('Ada') -> stored as user 1",
        "[event]   UserRegistered -> welcome mail to ada@example.com",
        "[event]   UserRegistered -> signups metric +1 (user 1)",
        "[result]  execute returned user id 1",
        "[query]   GetUserName(1) -> 'Ada'",
    ]


def test_readme_example_runs() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.splitlines() == ["welcome, user 1", "UserRegistered(user_id=1)"]
