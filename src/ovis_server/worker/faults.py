"""Fault injection for reliability tests: make the pipeline fail on purpose.

Off unless ``OVIS_SERVER_FAULTS`` is set, as ``marker=fault`` pairs separated by commas.
A job whose prompt contains a marker meets its fault inside the pipeline, at the first
denoising step:

- ``error``: an exception from the model code (the job fails, the worker goes on);
- ``oom``: ``torch.cuda.OutOfMemoryError``, as a GPU out of memory raises it;
- ``hang``: the step never returns (the stall watchdog ends the worker);
- ``exit``: the worker process dies at once, as under ``kill -9`` or the OOM killer.
"""

from __future__ import annotations

import os
import threading

ENV_VAR = "OVIS_SERVER_FAULTS"
KINDS = ("error", "oom", "hang", "exit")


class InjectedFaultError(RuntimeError):
    """The ``error`` fault."""


class FaultPlan:
    def __init__(self, faults: dict[str, str]) -> None:
        unknown = sorted(set(faults.values()) - set(KINDS))
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown faults {unknown}; known: {', '.join(KINDS)}")
        self.faults = faults

    @classmethod
    def from_env(cls) -> FaultPlan:
        spec = os.environ.get(ENV_VAR, "")
        pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
        return cls({marker.strip(): kind.strip() for marker, kind in pairs if marker.strip()})

    def strike(self, prompt: str) -> None:
        """Raise, hang or die if ``prompt`` carries a marker; otherwise nothing."""
        for marker, kind in self.faults.items():
            if marker not in prompt:
                continue
            if kind == "error":
                raise InjectedFaultError(f"injected fault for prompts containing {marker!r}")
            if kind == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected fault)")
            if kind == "hang":
                threading.Event().wait()
            if kind == "exit":
                os._exit(137)
