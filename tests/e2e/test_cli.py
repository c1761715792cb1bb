"""The command line: tokens, first start, and the serve options users set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from ovis_server.db.connect import HEAD_REVISION

from .helpers import (
    ServerFactory,
    create_token,
    http_get,
    run_cli,
    start_server,
    submit,
    wait_result,
)


def test_token_create_list_revoke(tmp_path: Path) -> None:
    created = run_cli("token", "create", "--name", "ci bot", "--data-dir", str(tmp_path))
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("ovis_")
    assert len(secret) > 40
    assert secret == created.stdout.splitlines()[-1]  # alone on its line
    assert "webhook signing secret: whsec_" in created.stdout

    listing = run_cli("token", "list", "--data-dir", str(tmp_path)).stdout
    assert "ci bot" in listing
    assert "active" in listing
    assert secret not in listing
    assert secret[:9] in listing  # a hint to tell tokens apart

    create_token(tmp_path, "twin")
    create_token(tmp_path, "twin")
    ambiguous = run_cli("token", "revoke", "twin", "--data-dir", str(tmp_path), check=False)
    assert ambiguous.returncode == 2
    assert "2 active tokens" in ambiguous.stderr

    revoked = run_cli("token", "revoke", "ci bot", "--data-dir", str(tmp_path))
    assert "revoked" in revoked.stdout
    assert "revoked" in run_cli("token", "list", "--data-dir", str(tmp_path)).stdout
    missing = run_cli("token", "revoke", "nobody", "--data-dir", str(tmp_path), check=False)
    assert missing.returncode == 2
    assert "no token" in missing.stderr
    blank = run_cli("token", "create", "--name", " ", "--data-dir", str(tmp_path), check=False)
    assert blank.returncode == 2


def test_db_upgrade_names_the_revision_and_logs_nothing_of_alembic(tmp_path: Path) -> None:
    for _ in range(2):  # a new database, then one already at the head
        done = run_cli("db", "upgrade", "--data-dir", str(tmp_path))
        assert done.stdout.strip().endswith(f"is at revision {HEAD_REVISION}"), done.stdout
        assert "alembic" not in (done.stdout + done.stderr).lower(), done.stderr


def test_data_dir_from_the_environment(tmp_path: Path) -> None:
    result = run_cli(
        "token", "create", "--name", "env", env={"OVIS_SERVER_DATA_DIR": str(tmp_path)}
    )
    assert result.stdout.strip().splitlines()[-1].startswith("ovis_")
    assert (tmp_path / "ovis-server.db").is_file()


def printed_tokens(log: str) -> list[str]:
    """The tokens a start printed, in the export line the README's examples read."""
    return re.findall(r"^\s*export OVIS_SERVER_TOKEN=(ovis_\S+)$", log, flags=re.M)


def test_first_start_creates_a_token_and_prints_it_once(tmp_path: Path, tiny_weights: Path) -> None:
    first = start_server(tmp_path, tiny_weights, "--no-worker")
    first.stop()
    printed = printed_tokens(first.log())
    assert len(printed) == 1
    assert "ovis_" not in first.log().replace(printed[0], "")  # nowhere else
    second = start_server(tmp_path, tiny_weights, "--no-worker")
    try:
        assert not printed_tokens(second.log())
        assert "ovis_" not in second.log()
        with second.client(printed[0]) as client:
            assert client.get("/v1/models").status_code == 200
    finally:
        second.stop()


def test_no_auth_serves_without_tokens_and_warns(tmp_path: Path, tiny_weights: Path) -> None:
    server = start_server(tmp_path, tiny_weights, "--no-worker", "--no-auth")
    try:
        assert http_get(server.base_url + "/v1/models").status_code == 200
        assert "--no-auth" in server.log()
        assert not printed_tokens(server.log())
    finally:
        server.stop()


def test_public_url_and_url_expiry(fresh_server: ServerFactory) -> None:
    public = "https://images.example.com/api"
    server = fresh_server(public_url=public + "/", url_ttl_seconds=2)
    with server.client(server.token("p")) as client:
        answer = client.post(
            "/v1/models/aidc-ai/ovis-image", json={"prompt": "x", "num_inference_steps": 1}
        ).json()
        assert answer["status_url"].startswith(public + "/v1/requests/")
        result = wait_result(client, answer["request_id"])
        url = result["output"]["image"]
        assert url.startswith(public + "/files/")
        local = url.replace(public, server.base_url)
        assert http_get(local).status_code == 200
        time.sleep(3)
        expired = http_get(local)
        assert expired.status_code == 403
        assert expired.json()["error_code"] == 403002
        fresh = client.get(f"/v1/requests/{answer['request_id']}/result").json()
        assert (
            http_get(fresh["output"]["image"].replace(public, server.base_url)).status_code == 200
        )
        assert submit(client, num_inference_steps=1)


def test_serve_refuses_a_model_it_cannot_find(tmp_path: Path) -> None:
    result = run_cli("worker", "--model", "no such model", "--data-dir", str(tmp_path), check=False)
    assert result.returncode == 1
    assert "neither 'tiny'" in result.stderr


def test_random_full_is_refused_on_a_cpu_before_anything_starts(tmp_path: Path) -> None:
    serve = run_cli(
        "serve", "--model", "random-full", "--device", "cpu", "--data-dir", str(tmp_path),
        check=False,
    )  # fmt: skip
    generate = run_cli(
        "generate", "a sign", "-o", str(tmp_path / "out.png"), "--model", "random-full",
        "--device", "cpu", "--data-dir", str(tmp_path), check=False,
    )  # fmt: skip
    for result in (serve, generate):
        assert result.returncode == 1
        assert "--model random-full builds the real Ovis-Image-7B architecture" in result.stderr
        assert "use --model tiny" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_the_command_line_and_the_api_import_no_model_library() -> None:
    """Every command imports the CLI, and serve the API app besides: none of it runs the
    model, so none of it imports torch, diffusers, transformers or numpy (with numpy and
    Pillow, a client command's start took 0.69 s of CPU rather than 0.44 s on a 2-core
    machine)."""
    code = (
        "import sys; import ovis_server.cli; from ovis_server.api.app import create_app; "
        "print(sorted({'torch', 'diffusers', 'transformers', 'numpy'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_an_exit_without_teardown_still_flushes_its_output_and_runs_exit_handlers(
    tmp_path: Path,
) -> None:
    """worker, serve and generate end so (cli/common.py): what they wrote last reaches its
    pipe and file, and the exit handlers registered with atexit run."""
    script = tmp_path / "ends.py"
    script.write_text(
        "import atexit, logging, sys\n"
        "from ovis_server.cli.common import exit_without_teardown\n"
        f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
        "atexit.register(lambda: print('exit handler ran', file=sys.stderr, end=''))\n"
        "logging.getLogger('last').info('last line')\n"
        "print('no newline', end='')\n"
        "exit_without_teardown(3)\n"
        "print('not reached')\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    ended = subprocess.run(
        [sys.executable, str(script)], env=environment, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert ended.returncode == 3
    assert ended.stdout == "no newline"  # block-buffered into a pipe, then flushed
    assert ended.stderr == "exit handler ran"
    assert (tmp_path / "log.txt").read_text() == "INFO:last:last line\n"
