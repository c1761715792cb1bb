"""scripts/install.sh picks PyTorch's build: the CPU index where the machine has no NVIDIA GPU
and the index answers, the usual index (with a line saying so) where it does not. The script
runs with --dry-run (it prints the pip commands instead of running them) in a copy of the
repository without a .venv, against a closed port, a port that never answers and a small
HTTP server on 127.0.0.1 standing in for the index."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from .helpers import free_port

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install.sh"
TORCH = "torch==2.13.0"


class IndexHandler(BaseHTTPRequestHandler):
    """A CPU wheel index's torch page, and a record of what was asked."""

    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        IndexHandler.asked.append(self.path)
        if self.path == "/whl/cpu/torch/":
            body = b'<a href="torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl">torch</a>'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def index() -> Iterator[str]:
    IndexHandler.asked = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), IndexHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()
    server.server_close()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the script where a repository would have it, with no .venv beside it."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "install.sh")
    return tmp_path


def path_without_nvidia_smi(extra: Path | None = None) -> str:
    """This machine's PATH less any folder with an nvidia-smi: a machine without a GPU."""
    folders = [
        folder
        for folder in os.environ["PATH"].split(os.pathsep)
        if folder and not (Path(folder) / "nvidia-smi").exists()
    ]
    return os.pathsep.join(([str(extra)] if extra else []) + folders)


def install(checkout: Path, index_url: str, *args: str, path: str | None = None) -> str:
    env = {
        **os.environ,
        "OVIS_TORCH_CPU_INDEX_URL": index_url,
        "OVIS_TORCH_PROBE_TIMEOUT": "2",
        "PATH": path or path_without_nvidia_smi(),
    }
    done = subprocess.run(
        ["bash", str(checkout / "scripts" / "install.sh"), "--dry-run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert not (checkout / ".venv").exists(), "a dry run makes nothing"
    return done.stdout


def test_without_a_gpu_the_cpu_index_is_taken_when_it_answers(checkout: Path, index: str) -> None:
    printed = install(checkout, index, "--dev")
    assert f"installing the CPU build of PyTorch from {index}" in printed
    assert f"would run: .venv/bin/python -m pip install --quiet --index-url {index} {TORCH}\n" in (
        printed
    )
    assert printed.endswith("would run: .venv/bin/python -m pip install --quiet -e .[dev]\n")
    assert IndexHandler.asked == ["/whl/cpu/torch/"]


def test_an_unreachable_cpu_index_falls_back_to_the_usual_index_with_a_message(
    checkout: Path,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/whl/cpu"
    printed = install(checkout, closed)
    assert f"PyTorch's CPU index ({closed}) cannot be reached" in printed
    assert f"would run: .venv/bin/python -m pip install --quiet {TORCH}\n" in printed
    assert "--index-url" not in printed


def test_an_index_that_never_answers_does_not_hold_the_install_up(checkout: Path) -> None:
    # It accepts the connection and says nothing: the probe gives up after its timeout
    # (2 s here), with no retries.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        started = time.monotonic()
        printed = install(checkout, f"http://127.0.0.1:{silent.getsockname()[1]}/whl/cpu")
        took = time.monotonic() - started
    finally:
        silent.close()
    assert "cannot be reached within 2s" in printed
    assert f"would run: .venv/bin/python -m pip install --quiet {TORCH}\n" in printed
    assert took < 60, took


def test_with_a_gpu_the_index_is_not_asked(checkout: Path, index: str, tmp_path: Path) -> None:
    bin_dir = tmp_path / "gpu-bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    printed = install(checkout, index, path=path_without_nvidia_smi(bin_dir))
    assert "NVIDIA GPU found: PyTorch comes from PyPI with CUDA" in printed
    assert "torch" not in printed.replace("PyTorch", "")
    assert IndexHandler.asked == []


def test_a_probe_timeout_that_is_not_whole_seconds_is_refused(checkout: Path) -> None:
    done = subprocess.run(
        ["bash", str(checkout / "scripts" / "install.sh"), "--dry-run"],
        env={**os.environ, "OVIS_TORCH_PROBE_TIMEOUT": "5; rm -rf /"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "OVIS_TORCH_PROBE_TIMEOUT must be whole seconds" in done.stderr
