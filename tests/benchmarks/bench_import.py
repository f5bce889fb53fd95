"""What `import pybus` costs on top of the standard library it builds on.

Run: `uv run python tests/benchmarks/bench_import.py` (`--rounds N`, default 5;
`--modules` also prints each module's self time; `--source DIR` measures the pybus
package in DIR instead of the installed one, e.g. an earlier commit exported with
`git archive <commit> pybus | tar -x -C DIR`). Given more than once, `--source`
measures each tree in turn within every round, so that a busy machine slows them
alike: that is how to compare two versions.

Each round is a fresh interpreter running

    python -X importtime -c "import asyncio, typing, dataclasses, inspect, logging; import pybus"

with bytecode caching on (`PYTHONDONTWRITEBYTECODE` removed from the environment;
one unmeasured run first writes the caches), from a temporary directory so the
current directory is not on the path. The standard modules are imported first, so
what `import pybus` reports is what pybus adds on top of them. Two numbers per round:

- pybus's own modules: the self time of every `pybus.*` module, summed;
- total: the cumulative time of the `import pybus` line, that is pybus's modules and
  every module they pull in that the five standard ones had not already loaded.

The script prints the median of the rounds for both, and with `--modules` the median
self time of each module `import pybus` loads, biggest first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

BASELINE = "import asyncio, typing, dataclasses, inspect, logging"
STATEMENT = f"{BASELINE}; import pybus"


def one_round(cwd: str, source: str | None = None) -> dict[str, tuple[int, int]]:
    """Self and cumulative microseconds of each module the `import pybus` line loaded."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if source is not None:
        env["PYTHONPATH"] = source
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", STATEMENT],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rows: list[tuple[str, int, int]] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        rows.append((name.rstrip(), int(self_us), int(cumulative_us)))
    # The output lists a module after everything it imported; the top-level `pybus`
    # line closes the block of modules that `import pybus` loaded.
    end = next(i for i, (name, _, _) in enumerate(rows) if name == " pybus")
    start = end
    while start > 0 and rows[start - 1][0].startswith("  "):
        start -= 1
    return {name.strip(): (self_us, cumulative_us) for name, self_us, cumulative_us in rows[start : end + 1]}


def summary(rounds: list[dict[str, tuple[int, int]]], modules: bool) -> None:
    """Print the medians of `rounds`: pybus's own modules, the total and, with `modules`, each module."""
    own = [sum(s for name, (s, _) in r.items() if name.split(".")[0] == "pybus") for r in rounds]
    total = [r["pybus"][1] for r in rounds]
    print(f"pybus's own modules, self time summed: {statistics.median(own) / 1000:5.1f} ms")
    print(f"total on top of the standard modules:  {statistics.median(total) / 1000:5.1f} ms")
    if modules:
        names = {name for r in rounds for name in r}
        medians = {name: statistics.median(r.get(name, (0, 0))[0] for r in rounds) for name in names}
        for name, us in sorted(medians.items(), key=lambda item: -item[1]):
            print(f"{us / 1000:7.2f} ms  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description="What `import pybus` costs on top of the standard library.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modules", action="store_true", help="print each module's self time")
    parser.add_argument(
        "--source",
        action="append",
        help="the directory holding the pybus package to measure; repeat it to compare trees, "
        "measured in turn within each round",
    )
    args = parser.parse_args()
    sources: list[str | None] = [os.path.abspath(path) for path in args.source] if args.source else [None]
    with tempfile.TemporaryDirectory() as cwd:
        for source in sources:
            one_round(cwd, source)  # writes the bytecode caches
        rounds: dict[str | None, list[dict[str, tuple[int, int]]]] = {source: [] for source in sources}
        for _ in range(args.rounds):
            for source in sources:
                rounds[source].append(one_round(cwd, source))
    print(f"python -X importtime -c {STATEMENT!r}: median of {args.rounds} rounds, bytecode cached")
    for source in sources:
        if len(sources) > 1:
            print(f"\n{source}:")
        summary(rounds[source], args.modules)


if __name__ == "__main__":
    main()
