"""Where the test suite's CPU goes: pytest run under a sampler of /proc (Linux).

Runs ``python -m pytest PYTEST_ARGS`` and, every ``--interval`` seconds, reads the CPU time
(user + system) of it and of every process it starts, down to the workers of the servers
the tests start. At the end it prints, by kind of process (an ``ovis-server`` subcommand,
a benchmark script, pytest's own processes, anything else by its program), how many ran,
their CPU seconds in all and each, and their share; then the wall time and how busy that
kept the machine's cores. A process counts from the first sample that sees it: one that
lives less than an interval may be missed, and each loses what it spent after its last
sample, so the figures are a little low.

A second table counts the processes the tests start by test file: a child inherits the
environment in which pytest names the test that runs (``PYTEST_CURRENT_TEST``). pytest's own
processes, where the tests and the in-process servers run, and PostgreSQL's backends are
not in it (their environment does not change as the tests go by). A third table names the
30 tests whose processes used the most.

    python benchmarks/suite_cpu.py -- -n 4 --dist loadfile
    python benchmarks/suite_cpu.py --interval 0.2 -- tests/e2e/test_faults.py -x
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = __file__.rsplit("/", 2)[0]

import argparse
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

SUBCOMMAND = re.compile(r"(?:-m ovis_server|ovis-server|cli import main; main\(\)) (\S+)")
SCRIPT = re.compile(r"benchmarks/(\S+\.py)")


@dataclass
class Seen:
    command: str
    cpu: float  # since the run started (for a process older than the run, from then)
    base: float = 0.0
    test: str = ""  # the test that started it (its node id), where its environment says

    @property
    def test_file(self) -> str:
        return self.test.split("::", 1)[0].rsplit("/", 1)[-1]

    def update(self, cpu: float) -> None:
        self.cpu = cpu - self.base


def kind(command: str) -> str:
    """The row a process counts in, from its command line."""
    if "import sys;exec(eval(sys.stdin.readline()))" in command:
        return "pytest-xdist worker (tests, in-process servers)"
    found = SUBCOMMAND.search(command)
    if found:
        return f"ovis-server {found.group(1)}"
    found = SCRIPT.search(command)
    if found:
        return f"benchmarks/{found.group(1)}"
    if re.search(r"-m pytest\b", command):
        return "pytest"
    program = command.split(" ", 1)[0].rsplit("/", 1)[-1]
    found = re.search(r"-m (\S+)", command)
    if found and program.startswith("python"):
        return f"python -m {found.group(1)}"
    return "postgres (server side)" if program.startswith("postgres") else program or "?"


def read_stat(pid: str) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, start tick) of ``pid``, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS, int(fields[19])


def read_command(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def read_test(pid: str) -> str:
    """The test (its node id) named by ``PYTEST_CURRENT_TEST`` in the environment ``pid``
    started with ("" where there is none)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return ""
    for entry in raw.split(b"\0"):
        if entry.startswith(b"PYTEST_CURRENT_TEST="):
            # "tests/e2e/test_x.py::test_y[sqlite] (call)": the phase goes
            return entry.split(b"=", 1)[1].decode(errors="replace").rsplit(" (", 1)[0]
    return ""


def sample(root: int, since: int, known: dict[tuple[int, int], Seen], family: set[int]) -> None:
    """One pass over /proc: new descendants of ``root`` join ``family``; each known
    process's CPU time is brought up to date. PostgreSQL's backends are the server's
    children, not the suite's, and count too (those older than the run, started at tick
    ``since``, from the time they are first seen)."""
    for entry in Path("/proc").iterdir():
        pid = entry.name
        if not pid.isdigit():
            continue
        stat = read_stat(pid)
        if stat is None:
            continue
        parent, cpu, started = stat
        key = (int(pid), started)
        if key in known:
            known[key].update(cpu)
            continue
        command = read_command(pid)
        if int(pid) == root or parent in family or command.startswith("postgres: "):
            family.add(int(pid))
            base = cpu if started < since else 0.0
            known[key] = Seen(command, cpu - base, base, read_test(pid))


def rows_by(
    seen: Iterable[Seen], heading: str, name_of: Callable[[Seen], str], most: int = 0
) -> tuple[list[str], float]:
    """Table rows of ``seen`` summed by ``name_of`` each process (one that it names "" is
    left out), the largest first (only the ``most`` largest, where it is not 0), and their
    total CPU seconds."""
    rows: dict[str, list[float]] = {}
    for process in seen:
        name = name_of(process)
        if not name:
            continue
        row = rows.setdefault(name, [0, 0.0])
        row[0] += 1
        row[1] += process.cpu
    total = sum(cpu for _, cpu in rows.values()) or 1.0
    lines = [f"| {heading} | processes | CPU s | CPU s each | share |", "|---|---:|---:|---:|---:|"]
    largest = sorted(rows.items(), key=lambda item: -item[1][1])
    for name, (count, cpu) in largest[: most or None]:
        lines.append(
            f"| {name} | {count:.0f} | {cpu:.1f} | {cpu / count:.2f} | {cpu / total:.0%} |"
        )
    return lines, total


def table(seen: Iterable[Seen], wall: float) -> list[str]:
    lines, total = rows_by(seen, "kind", lambda process: kind(process.command))
    cores = os.cpu_count() or 1
    lines += [
        "",
        f"CPU {total:.0f} s in {wall:.0f} s of wall time: {total / wall:.2f} cores busy of "
        f"{cores} ({total / wall / cores:.0%}).",
    ]
    return lines


def print_section(heading: str, lines: list[str]) -> None:
    print("\n".join(["", f"## {heading}", "", *lines]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments")
    args = parser.parse_args(argv)
    if not Path("/proc/self/stat").exists():
        parser.error("this needs Linux's /proc")
    started = time.monotonic()
    since = (read_stat("self") or (0, 0.0, 0))[2]
    # The run's own pytest was started by no test (where this script runs under pytest).
    env = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}
    process = subprocess.Popen([sys.executable, "-m", "pytest", *args.pytest_args], env=env)
    known: dict[tuple[int, int], Seen] = {}
    family: set[int] = set()
    try:
        while process.poll() is None:
            sample(process.pid, since, known, family)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        process.wait()
    wall = time.monotonic() - started
    seen = known.values()
    print_section(f"CPU by process: pytest {' '.join(args.pytest_args)}", table(seen, wall))
    by_file, _ = rows_by(seen, "test file", lambda process: process.test_file)
    print_section("CPU of the processes the tests started, by test file", by_file)
    by_test, _ = rows_by(seen, "test", lambda process: process.test, most=30)
    print_section("The 30 tests whose processes used the most CPU", by_test)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
