"""One Settings model: its precedence, its config file, the options made from it, and the
worker started by ``serve`` getting it whole."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ovis_server.cli import main
from ovis_server.config import SETTINGS_JSON_ENV, Settings
from ovis_server.settings_sources import cli_of, env_name, option_name
from ovis_server.worker.supervisor import worker_command, worker_environment


@pytest.fixture(autouse=True)
def no_settings_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, field in Settings.model_fields.items():
        cli = cli_of(field)
        if cli is not None:
            monkeypatch.delenv(env_name(name, cli), raising=False)


def test_command_line_over_environment_over_file_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ovis.toml"
    config.write_text('retention = "2h"\nrate-limit = 5\nport = 9000\nmax_batch = 2\n')
    monkeypatch.setenv("OVIS_SERVER_CONFIG", str(config))
    monkeypatch.setenv("OVIS_SERVER_PORT", "9100")
    monkeypatch.setenv("OVIS_SERVER_RATE_LIMIT", "6")
    settings = Settings(rate_limit_per_minute=7)
    assert settings.rate_limit_per_minute == 7  # the command line
    assert settings.port == 9100  # the environment
    assert settings.retention_seconds == 7200  # the file
    assert settings.max_batch == "2"
    assert settings.max_queued == 10_000  # the default


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "ovis.toml"
    config.write_text("no_such_setting = 1\n")
    result = CliRunner().invoke(main, ["token", "list", "--config", str(config)])
    assert result.exit_code == 2
    assert "there is no setting 'no_such_setting'" in result.output


def test_values_are_checked_by_the_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["token", "list", "--data-dir", str(tmp_path)], env={"OVIS_SERVER_RETENTION": "1x"}
    )
    assert result.exit_code == 2
    assert "'--retention' (OVIS_SERVER_RETENTION)" in result.output
    with pytest.raises(ValueError, match="start the schedule with 0"):
        Settings(webhook_retry_schedule="5s,1m")
    with pytest.raises(ValueError, match="neither 'auto' nor a whole number"):
        Settings(max_batch="0")


def test_every_option_field_is_an_option_with_its_env_var() -> None:
    help_text = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    for name, field in Settings.model_fields.items():
        cli = cli_of(field)
        if cli is not None and "serve" in cli.commands:
            assert re.search(rf"--{option_name(name, cli)}\b", help_text), name
            assert env_name(name, cli) in help_text, name


def test_the_worker_gets_the_settings_whole_and_not_in_argv(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        database_url="postgresql://user:secret@db/ovis",
        max_batch="3",
        stall_timeout_seconds="2m",
        fp8=True,
    )
    assert not any("secret" in arg for arg in worker_command())
    env = worker_environment(settings)
    assert Settings.model_validate_json(env[SETTINGS_JSON_ENV]) == settings
