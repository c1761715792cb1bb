"""Settings shared by the commands: where data lives and how the server is reached."""

from __future__ import annotations

from pathlib import Path

import platformdirs

ENV_PREFIX = "OVIS_SERVER_"


def default_data_dir() -> Path:
    """ovis-server's folder under the user's data home (``~/.local/share/ovis-server``)."""
    return Path(platformdirs.user_data_dir("ovis-server", appauthor=False))
