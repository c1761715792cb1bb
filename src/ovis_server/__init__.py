"""ovis-server: a self-hosted, RunComfy-compatible Model API for Ovis-Image-7B."""

__version__ = "0.1.0"
