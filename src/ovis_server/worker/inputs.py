"""What a job asks the engine for: its stored fields validated again by its model's spec,
and what it brings besides them. Its input image the API fetched, checked and stored at
submit: the worker reads it from the file store only, never from the internet. Its LoRAs
the worker's LoRA files (worker/loras.py) make local.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ovis_server.catalogue.spec import ModelInput
from ovis_server.engine.request import GenerationRequest
from ovis_server.jobs.job import Job
from ovis_server.storage.base import FileStore, input_image_key
from ovis_server.worker.failures import InvalidJobError

if TYPE_CHECKING:
    from ovis_server.worker.loras import LoraFiles
    from ovis_server.worker.placement import Placement


def job_request(job: Job, placement: Placement, files: FileStore) -> GenerationRequest:
    """The engine request of ``job``: its stored input validated by its model's spec (which
    may have changed since it was queued), with its input image; InvalidJobError if it no
    longer makes one."""
    spec = placement.spec_of(job.model_id)
    if spec is None:
        raise InvalidJobError(f"this worker does not serve model {job.model_id!r}")
    try:
        validated = spec.input_model.model_validate(job.input)
        request = validated.to_generation_request(job.seed)
    except (ValidationError, ValueError) as exc:
        raise InvalidJobError(f"stored input no longer validates: {exc}") from exc
    return with_stored_inputs(request, validated, job.id, files)


def with_lora_files(
    job: Job, request: GenerationRequest, loras: LoraFiles | None
) -> GenerationRequest:
    """``request`` with its LoRAs as local files (downloaded if need be)."""
    if not request.loras:
        return request
    if loras is None:
        raise InvalidJobError("this worker takes no LoRAs")
    return loras.localise(request, job)


def with_stored_inputs(
    request: GenerationRequest, validated: ModelInput, job_id: str, files: FileStore
) -> GenerationRequest:
    """``request`` with the job's stored input image, where its model takes one."""
    if not validated.reads_input_image():
        return request
    try:
        image = files.read(input_image_key(job_id))
    except FileNotFoundError:
        raise InvalidJobError("its input image is no longer in the file store") from None
    return dataclasses.replace(request, init_image=image)
