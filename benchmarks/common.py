"""What the benchmarks that start ``ovis-server`` or queue jobs share."""

from __future__ import annotations

import socket
import subprocess

import httpx

PROMPTS = [
    'A neon sign that reads "OVIS" above a rainy street at night',
    "A chalkboard menu listing coffee prices in neat handwriting",
    "A vintage travel poster for the Alps with bold title lettering",
    "A birthday cake with 'HAPPY 30TH' piped in blue icing",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ready(base: str) -> bool:
    """Whether the server at ``base`` answers /readyz with 200 (a worker has loaded)."""
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited within two minutes."""
    process.terminate()
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
