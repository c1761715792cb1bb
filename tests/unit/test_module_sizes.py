"""No module of the package grows past 400 lines: past that, a module holds more than one
job, and the rooms the code is laid out in stop saying where a change goes."""

from __future__ import annotations

from pathlib import Path

import ovis_server

MAX_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    package = Path(ovis_server.__file__).parent
    sizes = {
        str(path.relative_to(package)): len(path.read_text(encoding="utf-8").splitlines())
        for path in package.rglob("*.py")
    }
    assert len(sizes) > 100  # the package itself, not an empty folder
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
