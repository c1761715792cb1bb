"""What a job brings besides its fields: its input image, which the API fetched, checked
and stored at submit. The worker reads it from the file store only: it never reaches the
internet."""

from __future__ import annotations

import dataclasses

from ovis_server.catalogue.spec import ModelInput
from ovis_server.engine.request import GenerationRequest
from ovis_server.storage.base import FileStore, input_image_key
from ovis_server.worker.failures import InvalidJobError


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
