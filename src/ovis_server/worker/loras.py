"""A job's LoRAs on the worker's side: each ``loras[].path`` judged again under the
operator's rules, its file obtained (the operator's folder, or downloaded into the LoRA
cache, the job's status saying so meanwhile), and the request handed to the engine with
local files in place of the paths (the engine loads them: engine/loras.py).

A LoRA that cannot be had (not allowed any more, not found, not safetensors, too large,
a failed download) fails its job at once with the reason: the job is not retried."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from ovis_server.config import Settings
from ovis_server.engine.request import GenerationRequest
from ovis_server.inputs.loras import (
    LoraCache,
    LoraFileError,
    LoraPolicy,
    LoraSourceError,
    obtain,
    parse_source,
    policy_from_settings,
)
from ovis_server.jobs.job import Job
from ovis_server.jobs.store import JobStore
from ovis_server.worker.failures import InvalidJobError

logger = logging.getLogger(__name__)


class LoraFiles:
    """Where the worker finds a request's LoRA files."""

    def __init__(self, policy: LoraPolicy, cache: LoraCache, store: JobStore | None = None):
        self.policy = policy
        self.cache = cache
        self.store = store  # where a download in progress is shown (the job's warnings)

    @classmethod
    def from_settings(cls, settings: Settings, store: JobStore | None = None) -> LoraFiles:
        cache = LoraCache(settings.lora_cache_dir, settings.lora_cache_size)
        return cls(policy_from_settings(settings), cache, store)

    def localise(self, request: GenerationRequest, job: Job | None = None) -> GenerationRequest:
        """``request`` (of ``job``, whose status shows a download; None: ``generate``'s)
        with each LoRA path replaced by its local file; InvalidJobError naming the LoRA and
        why where one cannot be had."""
        if not request.loras:
            return request
        files = []
        for index, (path, scale) in enumerate(request.loras):
            where = f"loras.{index}.path"
            try:
                source = parse_source(path, self.policy)
                if source.kind != "local" and self.cache.find(source) is None:
                    self._show(job, f"downloading LoRA {path}")
                    try:
                        local = asyncio.run(obtain(source, self.policy, self.cache))
                    finally:
                        self._show(job, None)
                else:
                    local = asyncio.run(obtain(source, self.policy, self.cache))
            except (LoraSourceError, LoraFileError) as exc:
                raise InvalidJobError(f"{where}: {exc}") from None
            files.append((str(local), scale))
        return dataclasses.replace(request, loras=tuple(files))

    def _show(self, job: Job | None, note: str | None) -> None:
        """While a download runs, the job's status carries it among its warnings."""
        if self.store is None or job is None:
            return
        try:
            self.store.set_warnings(job.id, [*job.warnings, *([note] if note else [])])
        except Exception:  # a note for the client must never stop the job
            logger.exception("job %s: could not show its LoRA download", job.id)
