"""The worker runs compatible queued jobs as one batch; each image is the one it gets alone."""

from __future__ import annotations

import numpy as np

from .bodies import SLOW
from .helpers import (
    ServerFactory,
    download,
    pixels,
    status_of,
    submit,
    wait_for,
    wait_result,
)


def test_worker_batches_compatible_jobs_without_changing_their_images(
    fresh_server: ServerFactory,
) -> None:
    server = fresh_server(max_batch="4")
    with server.client(server.token("b")) as client:
        # A long job keeps the worker busy while four compatible ones queue behind it.
        blocker = submit(client, **{**SLOW, "num_inference_steps": 20})
        wait_for(lambda: status_of(client, blocker)["status"] == "in_progress")
        fields = {"image_size": "square", "num_inference_steps": 6}
        prompts = ["one", "two", "three", "four"]
        batched = [submit(client, prompt=p, seed=n, **fields) for n, p in enumerate(prompts)]
        cancelled = submit(client, prompt="five", seed=9, **fields)
        client.post(f"/v1/requests/{cancelled}/cancel")
        together = [wait_result(client, rid) for rid in batched]
        assert "batch of 4" in server.log()

        alone = []
        for n, p in enumerate(prompts):  # one at a time: each runs in a batch of 1
            alone.append(wait_result(client, submit(client, prompt=p, seed=n, **fields)))
        assert "batch of 1" in server.log()
        for pair in zip(together, alone, strict=True):
            first, second = (pixels(download(r["output"]["image"])) for r in pair)
            assert int(np.abs(first - second).max()) <= 2
