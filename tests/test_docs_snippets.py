"""Every ```python block of README.md and docs/*.md runs as written.

The rule, page by page:

- The page's blocks run **in order, in one new Python process, in one namespace**: a
  block may use what the blocks above it on the same page defined, as a reader who
  reads down the page has it. Each page starts from nothing (no names from another
  page, no `examples` package on the path), in a temporary working folder, with a
  timeout of 120 s, warnings turned into errors, and fails if a coroutine was never
  awaited or a task was destroyed while pending.
- A block with a top-level `await` (or `async with`, `async for`) runs on the page's
  one event loop (an `asyncio.Runner`), so a dispatcher started by an earlier block
  is still on its loop; other blocks run outside any loop, so a block may call
  `asyncio.run()` itself, as a script does.
- A block that only includes a file (`--8<-- "examples/x.py:section"`) shows part of
  a file that runs as a whole elsewhere: instead of running the part out of its
  file, the test checks that the file is run by a test (`run_example("x.py")`, an
  import or `-m` of `examples.x`, an app path `"examples.x:app"` given to a server
  or `pybus worker`, or the file is itself a test module).
- Markers, an HTML comment on the line right before a block's fence (the site does
  not show it; the markdown does):
  - `<!-- snippet: requires redis -->`: the page runs with `REDIS_URL` set to a
    redis-server the test starts (tests/redis_server.py); without redis-server the
    page's test is skipped, saying so (under CI it fails instead).
  - `<!-- snippet: file PATH [in PROJECT ...] -->`: the block (python or toml) is the
    file PATH of an example project instead of code to run in the page's process.
    Each project (the names after `in`; a file without `in` belongs to every project
    of the page) is written to a folder of its own, where the `pytest` command runs
    (as a user types it, so the folder is not on `sys.path` unless the project says
    so, and with `-W error`, as a project with `filterwarnings = ["error"]` runs it);
    its tests must pass, none skipped, nothing warned.

Nothing else is skipped: a block without a marker runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.redis_server import redis_server

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(  # also indented, as inside an admonition (`??? example`)
    r"(?:^[ ]*<!-- snippet: (?P<marker>[^>]*?) -->\n)?"
    r"^(?P<indent>[ ]*)```(?P<language>python|toml)\n(?P<code>.*?)^(?P=indent)```",
    re.MULTILINE | re.DOTALL,
)
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::[\w-]+)?"\n$')
MARKER = re.compile(r"^(?:requires (?P<service>redis)|file (?P<path>\S+)(?: in (?P<projects>.+))?)$")


@dataclass
class Block:
    line: int  # of the first line of code, in the page
    code: str


@dataclass
class Page:
    path: Path
    blocks: list[Block] = field(default_factory=list)  # run in the page's process
    includes: list[tuple[int, str]] = field(default_factory=list)  # (line, included file)
    files: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)  # (path, projects, code)
    services: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def projects(self) -> dict[str, dict[str, str]]:
        """Each project's files: {project: {path: code}}."""
        names = sorted({name for _, projects, _ in self.files for name in projects}) or ["project"]
        return {
            name: {path: code for path, projects, code in self.files if not projects or name in projects}
            for name in names
        }


def read(path: Path) -> Page:
    text = path.read_text()
    page = Page(path)
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        code, marker = textwrap.dedent(match.group("code")), match.group("marker")
        where = f"{page.name}:{line}"
        parsed = MARKER.match(marker) if marker is not None else None
        if marker is not None and parsed is None:
            raise AssertionError(f"{where}: unknown snippet marker {marker!r} (see {__name__}'s docstring)")
        if parsed and parsed.group("path"):
            projects = tuple((parsed.group("projects") or "").split())
            page.files.append((parsed.group("path"), projects, code))
            continue
        if match.group("language") != "python":
            continue  # a toml block that is no project's file is only shown
        if parsed and parsed.group("service"):
            page.services.add(parsed.group("service"))
        included = INCLUDE.match(code)
        if included:
            page.includes.append((line, included.group("path")))
        else:
            assert "--8<--" not in code, f"{where}: mixes an include with code; make it one or the other"
            page.blocks.append(Block(line, code))
    return page


READ = {page.name: page for page in map(read, PAGES)}
RUN = sorted(name for name, page in READ.items() if page.blocks)
PROJECTS = sorted(
    f"{name}:{project}" for name, page in READ.items() for project in page.projects() if page.files
)
INCLUDES = sorted({(name, path) for name, page in READ.items() for _, path in page.includes})

# Runs a page's blocks: given the page's path and, on stdin, its blocks as JSON.
DRIVER = r"""
import ast, asyncio, inspect, json, sys
page, blocks = sys.argv[1], json.load(sys.stdin)
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
runner = None
for line, code in blocks:
    # Padded so that a traceback names the page's own line, and shows it.
    compiled = compile("\n" * (line - 1) + code, page, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if compiled.co_flags & inspect.CO_COROUTINE:
        runner = runner or asyncio.Runner()
        runner.run(eval(compiled, namespace))
    else:
        exec(compiled, namespace)
if runner is not None:
    runner.close()
"""


def test_the_blocks_are_found() -> None:
    assert sum(len(page.blocks) for page in READ.values()) >= 30  # the pattern still matches the pages
    assert "docs/recipes.md" in RUN


@pytest.fixture
def services(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Environment variables for the services the page's markers require."""
    page = READ[request.node.callspec.params["page"]]
    with ExitStack() as stack:
        environment: dict[str, str] = {}
        if "redis" in page.services:
            url, _ = stack.enter_context(redis_server())
            environment["REDIS_URL"] = url
        yield environment


@pytest.mark.parametrize("page", RUN)
def test_the_page_runs(page: str, services: dict[str, str], tmp_path: Path) -> None:
    blocks = [(block.line, block.code) for block in READ[page].blocks]
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", DRIVER, str(ROOT / page)],
        input=json.dumps(blocks),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_environment(), **services},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"a block of {page} failed:\n{output}"
    for sign in ("was never awaited", "Task was destroyed but it is pending", "Traceback"):
        assert sign not in output, f"{page} ran, but reported a problem:\n{output}"


@pytest.mark.parametrize("project", PROJECTS)
def test_the_example_project_passes_its_tests(project: str, tmp_path: Path) -> None:
    page, name = project.rsplit(":", 1)
    files = READ[page].projects()[name]
    for path, code in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(code)
    result = subprocess.run(  # warnings are errors, as in a project with filterwarnings = ["error"]
        [
            Path(sys.executable).with_name("pytest"),
            "-q",
            "-W",
            "error",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{project}: the project's tests failed:\n{output}"
    assert re.search(r"\b\d+ passed\b", output), output
    assert "skipped" not in output, output
    assert "warning" not in output.lower(), f"{project}: the project's run warned:\n{output}"


@pytest.mark.parametrize(("page", "path"), INCLUDES)
def test_an_included_file_is_run_by_a_test(page: str, path: str) -> None:
    included = Path(path)
    assert (ROOT / included).is_file(), f"{page} includes {path}, which does not exist"
    if included.parts[0] == "tests" and included.name.startswith("test_"):
        return  # pytest runs it
    module = ".".join(included.with_suffix("").parts)
    runs: tuple[str, ...] = (f'run_example("{included.name}")', f'"{module}"', f'"{module}:')
    runs += (
        f"import {module}",
        f"from {module} ",
        f"from {included.parent.as_posix()} import {included.stem}",
    )
    for test in (ROOT / "tests").glob("test_*.py"):
        if test.name.startswith("test_docs"):
            continue
        if any(run in test.read_text() for run in runs):
            return
    pytest.fail(f"{page} includes {path}, but no test runs it: add one (see tests/test_examples.py)")


def _environment() -> dict[str, str]:
    """This environment, without what would make the page see the repository's own modules."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "REDIS_URL")}
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    return environment
