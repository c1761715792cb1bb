"""The README's curl session works as written against a running server."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from PIL import Image

from .helpers import ServerFactory

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(marker: str) -> str:
    """The fenced bash block right after ``<!-- readme-test: MARKER -->``."""
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {marker} -->\n```bash\n(.*?)\n```", text, re.S)
    assert match, f"README has no block marked {marker}"
    return match.group(1)


def test_curl_session_runs_as_written(tmp_path: Path, shared_server: ServerFactory) -> None:
    server = shared_server()
    env = {
        **os.environ,
        "OVIS_SERVER_URL": server.base_url,
        "OVIS_SERVER_TOKEN": server.token("readme"),
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("curl-session")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        '"queue_position"' in result.stdout
        or '"in_progress"' in result.stdout
        or ('"completed"' in result.stdout)
    )
    assert result.stdout.rstrip().endswith('"outcome":"not_cancellable"}')
    with Image.open(tmp_path / "ovis.png") as image:
        assert image.size == (1024, 1024)
        assert image.format == "PNG"


def test_readme_lists_every_serve_option() -> None:
    from click.testing import CliRunner

    from ovis_server.cli import main

    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    table = README.read_text().split("## Configuration", 1)[1].split("##", 1)[0]
    missing = sorted(option for option in options if f"`{option}`" not in table)
    assert not missing, f"README's configuration table lacks {missing}"
