"""Every code block in README.md runs as pasted, after the README's own setup lines.

The server is started the way the README says (its ``serve --model tiny`` block, with
``OVIS_SERVER_PORT`` and ``OVIS_SERVER_DATA_DIR`` so that it takes a free port and a fresh
directory), and the examples run with the two ``export`` lines its first start printed.
A block that cannot run here says why in a ``<!-- readme-skip: … -->`` line above it (a GPU,
the hub, another program); a block marked ``<!-- readme-test: NAME -->`` is run by the test
that names it, here or in the file ``RUN_ELSEWHERE`` says.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .helpers import free_port, http_get

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
BLOCKS = re.compile(r"(?:<!-- readme-(test|skip): ([^\n]*?) -->\n)?```(\w*)\n(.*?)\n```", re.S)

RUN_HERE = {
    "serve-tiny",
    "setup",
    "generate",
    "curl-session",
    "stream-curl",
    "cli",
    "python-client",
    "stream-python",
    "webhook-curl",
    "webhook-verify",
    "openai-install",
    "openai-sdk",
}
RUN_ELSEWHERE = {
    "runcomfy-dialect": "test_dialects.py",
    "openai-curl": "test_dialects.py",
    "image-to-image": "test_image_inputs_api.py",
    "image-to-image-python": "test_image_inputs_api.py",
    "image-to-image-openai": "test_image_inputs_api.py",
    "loras": "test_loras_api.py",
}


@dataclass(frozen=True)
class Block:
    kind: str | None  # "test", "skip" or None
    name: str  # the test's marker, or the reason it is skipped
    language: str
    code: str
    line: int


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [
        Block(m.group(1), m.group(2) or "", m.group(3), m.group(4), text.count("\n", 0, m.start()))
        for m in BLOCKS.finditer(text)
    ]


def readme_block(marker: str) -> str:
    """The code of the block marked ``<!-- readme-test: MARKER -->``."""
    found = [b.code for b in readme_blocks() if b.kind == "test" and b.name == marker]
    assert len(found) == 1, f"README has {len(found)} blocks marked {marker}"
    return found[0]


def test_every_code_block_is_run_or_says_why_not() -> None:
    blocks = [block for block in readme_blocks() if block.language]  # not the diagrams
    unmarked = [f"line {b.line + 1}: {b.code[:60]!r}" for b in blocks if b.kind is None]
    assert not unmarked, f"README blocks neither run nor excused: {unmarked}"
    assert all(b.name.strip() for b in blocks if b.kind == "skip"), "a skip says why"
    tested = [b.name for b in blocks if b.kind == "test"]
    assert len(tested) == len(set(tested)), tested
    assert set(tested) == RUN_HERE | set(RUN_ELSEWHERE)
    for marker, test_file in RUN_ELSEWHERE.items():
        assert f'"{marker}"' in (Path(__file__).parent / test_file).read_text(), (marker, test_file)


@dataclass(frozen=True)
class ReadmeServer:
    env: dict[str, str]  # the environment a reader has after the README's setup lines
    log: Path  # serve's stdout and stderr


def activated(env: dict[str, str]) -> dict[str, str]:
    """``env`` as ``. .venv/bin/activate`` leaves it."""
    return {
        **env,
        "VIRTUAL_ENV": str(VENV_BIN.parent),
        "PATH": f"{VENV_BIN}{os.pathsep}{env['PATH']}",
    }


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadmeServer]:
    if not (VENV_BIN / "activate").exists():
        pytest.skip("no .venv beside the README: ./scripts/install.sh makes it")
    data_dir = tmp_path_factory.mktemp("readme-data")
    log = data_dir.parent / "serve.log"
    port = free_port()
    env = {
        **os.environ,
        "OVIS_SERVER_PORT": str(port),
        "OVIS_SERVER_DATA_DIR": str(data_dir),
        "HF_HUB_OFFLINE": "1",
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", readme_block("serve-tiny")],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600  # generous: the machine may be loaded
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if http_get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        printed = dict(re.findall(r"^ +export (OVIS_SERVER_\w+)=(\S+)$", log.read_text(), re.M))
        assert set(printed) == {"OVIS_SERVER_URL", "OVIS_SERVER_TOKEN"}, log.read_text()
        reader = activated({**os.environ, **printed})
        reader.pop("OVIS_SERVER_PORT", None)
        reader["OVIS_SERVER_DATA_DIR"] = str(data_dir)  # where ``generate`` builds its tiny model
        yield ReadmeServer(reader, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_block(
    code: str, language: str, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    command = ["bash", "-euo", "pipefail", "-c", code]
    if language == "python":
        command = [str(VENV_BIN / "python"), "-c", code]
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def test_the_first_start_prints_the_token_framed_and_no_migration_lines(
    readme_server: ReadmeServer,
) -> None:
    lines = readme_server.log.read_text().splitlines()
    assert not [line for line in lines if "alembic" in line.lower()], lines
    top = next(i for i, line in enumerate(lines) if line.startswith("No API token existed"))
    bottom = next(i for i in range(top, len(lines)) if lines[i].startswith("====="))
    assert lines[top - 1] == "=" * 78
    assert lines[top - 2] == ""
    frame = lines[top:bottom]
    assert not [line for line in frame if " INFO " in line or " WARNING " in line], frame
    # The lines it prints are the README's setup lines, with the values filled in.
    setup = re.findall(r"^export (\w+)=", readme_block("setup"), re.M)
    assert setup == ["OVIS_SERVER_URL", "OVIS_SERVER_TOKEN"]
    assert [line.split("=")[0].split()[-1] for line in frame if "export " in line] == setup
    assert readme_server.env["OVIS_SERVER_TOKEN"].startswith("ovis_")


def test_curl_session_stream_and_cli_run_as_written(
    tmp_path: Path, readme_server: ReadmeServer
) -> None:
    """The curl session, then (in the same shell: they use its REQUEST_ID) the status
    stream's curl and the command-line client."""
    session = "\n".join(readme_block(name) for name in ("curl-session", "stream-curl", "cli"))
    done = run_block(session, "bash", tmp_path, readme_server.env)
    assert '"outcome":"not_cancellable"}' in done.stdout
    assert "event: result" in done.stdout  # the stream of the finished request
    request_id = re.search(r'"request_id":"([^"]+)"', done.stdout)
    assert request_id
    assert f'"request_id": "{request_id.group(1)}"' in done.stdout  # ovis-server status
    assert '"status": "completed"' in done.stdout
    assert "seed 7: saved ovis.png" in done.stderr
    with Image.open(tmp_path / "ovis.png") as image:
        assert image.size == (1024, 1024)
        assert image.format == "PNG"


def test_generate_runs_as_written(tmp_path: Path, readme_server: ReadmeServer) -> None:
    run_block(readme_block("generate"), "bash", tmp_path, readme_server.env)
    with Image.open(tmp_path / "ovis.png") as image:
        assert image.size == (1024, 1024)


def test_python_client_runs_as_written(tmp_path: Path, readme_server: ReadmeServer) -> None:
    done = run_block(readme_block("python-client"), "python", tmp_path, readme_server.env)
    assert "in_progress" in done.stdout
    assert re.search(r"^seed \d+$", done.stdout, re.M), done.stdout
    with Image.open(tmp_path / "ovis.png") as image:
        assert image.size == (1024, 1024)


def test_stream_example_runs_as_written(tmp_path: Path, readme_server: ReadmeServer) -> None:
    done = run_block(readme_block("stream-python"), "python", tmp_path, readme_server.env)
    assert "status='in_queue'" in done.stdout or "status='in_progress'" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("request_id=")
    assert "status='succeeded'" in done.stdout.splitlines()[-1]


def test_webhook_examples_run_as_written(tmp_path: Path, readme_server: ReadmeServer) -> None:
    done = run_block(readme_block("webhook-curl"), "bash", tmp_path, readme_server.env)
    assert '"request_id"' in done.stdout
    # The receiver, as pasted, refuses a message that is not signed.
    check = readme_block("webhook-verify") + "\nprint(receive(b'{}', {'webhook-id': 'msg_1'}))"
    refused = run_block(check, "python", tmp_path, readme_server.env)
    assert refused.stdout.strip() == "401"


def test_openai_sdk_example_runs_with_the_readme_install_line(
    tmp_path: Path, readme_server: ReadmeServer
) -> None:
    # No download in a test: the line must be satisfied by what the dev install put in
    # .venv, and would fetch openai from PyPI on a reader's machine.
    offline = {**readme_server.env, "PIP_NO_INDEX": "1"}
    installed = run_block(readme_block("openai-install"), "bash", tmp_path, offline)
    assert "Requirement already satisfied: openai" in installed.stdout
    done = run_block(readme_block("openai-sdk"), "python", tmp_path, readme_server.env)
    assert done.stdout.strip() == "['aidc-ai/ovis-image']"
    for index in (0, 1):
        with Image.open(tmp_path / f"bakery-{index}.png") as image:
            assert image.size == (1024, 768)


def test_readme_lists_every_serve_option() -> None:
    from click.testing import CliRunner

    from ovis_server.cli import main

    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    options = set(re.findall(r"(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    table = README.read_text().split("## Configuration", 1)[1].split("##", 1)[0]
    missing = sorted(option for option in options if f"`{option}`" not in table)
    assert not missing, f"README's configuration table lacks {missing}"
