"""benchmarks/suite_cpu.py: which row each process of a test run counts in."""

from __future__ import annotations

import pytest
from benchmarks.suite_cpu import Seen, kind, rows_by, table


@pytest.mark.parametrize(
    ("command", "row"),
    [
        ("/v/bin/python -m ovis_server worker --parent-pid 9509", "ovis-server worker"),
        ("/v/bin/python -m ovis_server serve --host 127.0.0.1", "ovis-server serve"),
        ("/v/bin/python /v/bin/ovis-server serve --model tiny", "ovis-server serve"),
        (
            "/v/bin/python -c import sys; sys.modules['torchao'] = None; "
            "from ovis_server.cli import main; main() generate x -o out.png",
            "ovis-server generate",
        ),
        ("/v/bin/python /repo/benchmarks/serve.py --model tiny", "benchmarks/serve.py"),
        ("/v/bin/python -m benchmarks.gpu.suite /tmp/out", "python -m benchmarks.gpu.suite"),
        (
            "/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))",
            "pytest-xdist worker (tests, in-process servers)",
        ),
        (".venv/bin/python -m pytest -n 2 --dist loadfile", "pytest"),
        ("postgres: 15/main: ovis_ci postgres 127.0.0.1(5)", "postgres (server side)"),
        ("/usr/lib/chromium/chromium --type=renderer", "chromium"),
        ("ld -plugin liblto_plugin.so -m elf_x86_64 -o out.so", "ld"),
        ("", "?"),
    ],
)
def test_each_process_counts_in_its_kind(command: str, row: str) -> None:
    assert kind(command) == row


def test_the_table_sums_by_kind_and_gives_shares() -> None:
    seen = [
        Seen("python -m ovis_server worker", 6.0),
        Seen("python -m ovis_server worker", 2.0),
        Seen("python -m ovis_server serve", 2.0),
    ]
    lines = table(seen, wall=10.0)
    assert lines[2] == "| ovis-server worker | 2 | 8.0 | 4.00 | 80% |"
    assert lines[3] == "| ovis-server serve | 1 | 2.0 | 2.00 | 20% |"
    assert lines[-1].startswith("CPU 10 s in 10 s of wall time: 1.00 cores busy of ")


def test_the_processes_a_test_file_or_a_test_started_sum_by_it() -> None:
    faults = "tests/e2e/test_faults.py::test_sigterm[sqlite]"
    seen = [
        Seen("python -m ovis_server worker", 6.0, test=faults),
        Seen("python -m ovis_server serve", 2.0, test="tests/e2e/test_faults.py::test_hang"),
        Seen("python -m ovis_server worker", 2.0, test="tests/e2e/test_queue.py::test_q"),
        Seen("python -c import sys;exec(eval(sys.stdin.readline()))", 50.0),  # no test
    ]
    lines, total = rows_by(seen, "test file", lambda process: process.test_file)
    assert lines[0] == "| test file | processes | CPU s | CPU s each | share |"
    assert lines[2:] == [
        "| test_faults.py | 2 | 8.0 | 4.00 | 80% |",
        "| test_queue.py | 1 | 2.0 | 2.00 | 20% |",
    ]
    assert total == 10.0
    lines, total = rows_by(seen, "test", lambda process: process.test, most=2)
    assert lines[2:] == [
        f"| {faults} | 1 | 6.0 | 6.00 | 60% |",
        "| tests/e2e/test_faults.py::test_hang | 1 | 2.0 | 2.00 | 20% |",
    ]
