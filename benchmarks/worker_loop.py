"""Worker loop benchmark: how much of the time the device's thread spends in the engine.

Runs the real worker loop (``Worker.run``, on this process's main thread as ``ovis-server
worker`` runs it) over ``--jobs`` queued jobs in a fresh SQLite store and local files
store, with no HTTP in the way, and times every engine call. ``engine busy`` is the share
of the wall time the device's thread spent inside the engine; what is left is the loop's
own work on that thread (claims, checks, hand-offs) and waiting. Storing, encoding and
recording run on the worker's finisher thread and do not count against it, unless they
fall so far behind that the loop waits for them.

    python benchmarks/worker_loop.py --model tiny --size 512x512 --steps 8 --jobs 12
"""

from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and its queue.py would hide the
# standard library's queue module.
if sys.path and sys.path[0] == __file__.rsplit("/", 1)[0]:
    sys.path[0] = __file__.rsplit("/", 2)[0]  # the repository: benchmarks.common

import argparse
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PROMPTS
from ovis_server.catalogue import OVIS_IMAGE, OvisImageInput
from ovis_server.cli import parse_image_size
from ovis_server.config import Settings
from ovis_server.db.connect import connect, migrate, sqlite_url
from ovis_server.jobs.job import NewJob
from ovis_server.jobs.store import JobStore
from ovis_server.storage.local import LocalFileStore
from ovis_server.storage.signing import UrlSigner
from ovis_server.worker.runner import Worker


def queue(store: JobStore, args: argparse.Namespace, count: int, first: int) -> list[str]:
    ids = []
    for index in range(first, first + count):
        item = OvisImageInput.model_validate(
            {
                "prompt": PROMPTS[index % len(PROMPTS)],
                "image_size": parse_image_size(args.size),
                "num_inference_steps": args.steps,
                "output_format": args.format,
            }
        )
        request_id = f"bench{index:04d}"
        store.submit(
            NewJob(
                id=request_id,
                token_id="bench",
                model_id=OVIS_IMAGE.model_id,
                input=item.model_dump(mode="json"),
                seed=index,
                progress_total=args.steps,
                batch_key=OVIS_IMAGE.batch_key(item.to_generation_request(index)),
            )
        )
        ids.append(request_id)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, random-full, or a PATH/hub id")
    parser.add_argument("--size", default="512x512", help="a preset name, or WxH")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    args = parser.parse_args(argv)

    import torch

    from ovis_server.engine.pipeline import Engine
    from ovis_server.engine.weights import resolve_weights

    with tempfile.TemporaryDirectory(prefix="ovis-loop-bench-") as scratch:
        data_dir = Path(scratch)
        engine = Engine.load(resolve_weights(args.model, data_dir), device=args.device)
        db = connect(sqlite_url(data_dir))
        migrate(db)
        store = JobStore(db)
        files = LocalFileStore(data_dir / "files", UrlSigner("bench"))
        limit = Settings(data_dir=data_dir).batch_limit(engine.device.type)
        worker = Worker(
            store=store,
            files=files,
            engine=engine,
            model=OVIS_IMAGE,
            worker_id="bench",
            poll_seconds=0.05,
            max_batch=limit,
        )
        # Warm-up (and compile, on CUDA): one batch through the loop's own path.
        queue(store, args, limit, 0)
        worker.run_jobs(store.claim_batch("bench", 30, limit), threading.Event())

        engine_seconds = 0.0
        # The worker's engine call (generate_batch in commits before generate_pixels, so
        # that the script measures those too).
        method = "generate_pixels" if hasattr(engine, "generate_pixels") else "generate_batch"
        generate = getattr(engine, method)

        def timed(*call: Any, **options: Any) -> Any:
            nonlocal engine_seconds
            started = time.perf_counter()
            try:
                return generate(*call, **options)
            finally:
                engine_seconds += time.perf_counter() - started

        setattr(engine, method, timed)
        writes: list[float] = []
        worker.step_write_seconds = writes  # the progress thread times each step's write
        ids = queue(store, args, args.jobs, limit)
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                found = [store.get(request_id) for request_id in ids]
                if all(job is not None and job.status.is_final for job in found):
                    stop.set()
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, name="watch")
        started = time.perf_counter()
        watcher.start()
        worker.run(stop)  # returns once every image is stored and recorded
        seconds = time.perf_counter() - started
        watcher.join()
        db.dispose()

    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model: {args.model}; {args.size}, {args.steps} steps, {args.format}; {name}")
    print()
    print("| jobs | batch | wall | engine busy | busy share | images / min |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.jobs} | {limit} | {seconds:.2f} s | {engine_seconds:.2f} s | "
        f"{engine_seconds / seconds:.1%} | {args.jobs * 60 / seconds:.1f} |"
    )
    if writes:
        writes.sort()
        print()
        print(
            f"step progress: {len(writes)} writes, mean {1000 * sum(writes) / len(writes):.1f} ms, "
            f"p95 {1000 * writes[math.ceil(0.95 * len(writes)) - 1]:.1f} ms, on the progress thread"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
