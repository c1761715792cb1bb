"""Fetching a hub id's weights into the Hugging Face cache, with progress.

A hub id's weights live in Hugging Face's own cache (``HF_HOME``, by default
``~/.cache/huggingface``; ``HF_HUB_CACHE`` for the hub part alone), shared with every other
tool that uses the hub, so weights downloaded before are found there. The files fetched are
those the pipeline loads: ``model_index.json`` and the folders of the components it names,
in safetensors where the repository has them. The engine loads them from the snapshot
folder, as it would any local diffusers directory.

Several processes on one machine (serve's workers, one per GPU, or ``ovis-server download``
beside them) download once: the first takes a lock and downloads; the others wait, showing
the figures it writes beside the lock.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ovis_server.engine.download_progress import (
    LOG_SECONDS,
    PROGRESS_SECONDS,
    ByteBars,
    DownloadProgress,
    Rate,
    Show,
    duration_text,
    size_text,
    their_progress,
    write_progress,
)
from ovis_server.engine.weights import (
    MODEL_INDEX,
    PhaseReport,
    WeightsNotFoundError,
    cache_folder,
    cached_snapshot,
    is_hub_id,
    resolve_weights,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

# Weight formats torch does not load, and pickled ones that safetensors make unneeded.
_NEVER = (".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".gguf", ".tflite")
_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
_VARIANT = re.compile(
    r"^(?P<stem>[^/.]+)\.(?P<variant>[A-Za-z0-9_]+)(?:-\d{5}-of-\d{5})?\.safetensors$"
    r"|^(?P<index_stem>[^/.]+)\.safetensors\.index\.(?P<index_variant>[A-Za-z0-9_]+)\.json$"
)


class WeightsDownloadError(WeightsNotFoundError):
    """A hub id's weights could not be downloaded, and the cache does not hold them."""


class DownloadInterrupted(Exception):  # noqa: N818 (a stop asked for, not a failure)
    """Stopped (SIGTERM, Ctrl-C) while downloading; what was downloaded stays cached."""


@dataclass(frozen=True)
class FetchedWeights:
    folder: str  # the snapshot folder, a diffusers directory
    downloaded: int  # bytes this call downloaded (0: all were there)
    total: int  # bytes of the weights' files
    files: int


def select_files(sizes: dict[str, int], model_index: dict[str, Any]) -> dict[str, int]:
    """Of a repository's files (name -> size), those the pipeline loads: ``model_index.json``
    and the folders of the components it names; safetensors rather than pickles, and no
    variants (``*.fp16.safetensors``) where the plain files are there."""
    folders = {
        key
        for key, value in model_index.items()
        if not key.startswith("_") and isinstance(value, list) and value and value[0] is not None
    }
    chosen = {MODEL_INDEX: sizes[MODEL_INDEX]} if MODEL_INDEX in sizes else {}
    for folder in folders:
        inside = {name: size for name, size in sizes.items() if name.startswith(folder + "/")}
        names = {name[len(folder) + 1 :] for name in inside}
        has_safetensors = any(name.endswith(".safetensors") for name in names)
        for name, size in inside.items():
            base = name[len(folder) + 1 :]
            if base.endswith(_NEVER) or (has_safetensors and _pickled(base)):
                continue
            variant = _VARIANT.match(base)
            if variant is not None:
                stem = variant.group("stem") or variant.group("index_stem")
                plain = (f"{stem}.safetensors", f"{stem}.safetensors.index.json")
                if any(candidate in names for candidate in plain):
                    continue
            chosen[name] = size
    return chosen


def _pickled(name: str) -> bool:
    return name.endswith(_PICKLED) or any(f"{suffix}.index" in name for suffix in _PICKLED)


@dataclass(frozen=True)
class _Plan:
    commit: str
    folder: Path
    files: dict[str, int]  # name -> size, of what the pipeline loads

    def missing(self, repo_id: str, cache_dir: str | None) -> dict[str, int]:
        from huggingface_hub import try_to_load_from_cache

        return {
            name: size
            for name, size in self.files.items()
            if not isinstance(
                try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=self.commit),
                str,
            )
        }


def _plan(api: HfApi, repo_id: str, cache_dir: str | None) -> _Plan:
    """Ask the hub what the main revision's files are and which of them the pipeline needs."""
    from huggingface_hub import hf_hub_download

    info = api.model_info(repo_id, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
    if MODEL_INDEX not in sizes or info.sha is None:
        raise WeightsDownloadError(
            f"{repo_id} on the Hugging Face hub has no {MODEL_INDEX}: not a diffusers pipeline"
        )
    # By "main", so that the cache records which commit main is (refs/main): the engine and a
    # later start without the hub find the snapshot through it.
    index_path = hf_hub_download(
        repo_id, MODEL_INDEX, revision="main", cache_dir=cache_dir, endpoint=api.endpoint
    )
    model_index = json.loads(Path(index_path).read_text())
    return _Plan(info.sha, Path(index_path).parent, select_files(sizes, model_index))


def _hub_failure(exc: Exception, repo_id: str, endpoint: str) -> WeightsDownloadError | None:
    """A clear error for a hub answer that no cached copy can make up for."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return WeightsDownloadError(
            f"{repo_id} is gated on the Hugging Face hub: accept its terms at "
            f"{endpoint}/{repo_id} and set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsDownloadError(
            f"there is no model {repo_id} on the Hugging Face hub at {endpoint} (if it is "
            "private, set HF_TOKEN to a token that may read it)"
        )
    return None


def _reason(exc: BaseException) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


def fetch_weights(
    repo_id: str,
    *,
    report: PhaseReport | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = logger.info,
    log_every: float = LOG_SECONDS,
    status_line: Callable[[str], None] | None = None,
    interval: float = PROGRESS_SECONDS,
    cache_dir: str | None = None,
    endpoint: str | None = None,
) -> FetchedWeights:
    """The weights of hub model ``repo_id`` in the Hugging Face cache: downloaded with
    ``snapshot_download`` if any file is missing, else found there. Progress goes to ``log``
    (a line every ``log_every`` seconds, or to ``status_line`` every ``interval``, to be
    redrawn in place) and to ``report`` (phase ``downloading``, progress in bytes; back to
    ``loading`` when done). Raises WeightsDownloadError with what to do when the hub cannot
    be reached and the cache lacks the weights, DownloadInterrupted when ``stop`` is set.
    ``cache_dir`` and ``endpoint`` default to the hub's (``HF_HUB_CACHE``, ``HF_ENDPOINT``)."""
    from huggingface_hub import HfApi, constants

    # The hub's HTTP client logs every request at INFO: a line per file, twice.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    api = HfApi(endpoint=endpoint)
    endpoint = api.endpoint
    cache = cache_dir or constants.HF_HUB_CACHE
    show = Show(report, log, log_every, status_line)
    try:
        plan = _plan(api, repo_id, cache_dir)
    except WeightsDownloadError:
        raise
    except Exception as exc:  # the hub's answer, or no answer: many kinds of error
        logger.debug("asking the hub about %s failed", repo_id, exc_info=True)
        failure = _hub_failure(exc, repo_id, endpoint)
        if failure is not None:
            raise failure from None
        folder = cached_snapshot(repo_id, cache_dir)
        if folder is None:
            raise WeightsDownloadError(
                f"cannot download {repo_id}: the Hugging Face hub at {endpoint} did not answer "
                f"({_reason(exc)}), and the cache ({cache}) does not hold it. Run 'ovis-server "
                "download' where the hub can be reached (with the same HF_HOME), or pass "
                "--model with a local diffusers directory."
            ) from None
        log(f"{repo_id} is in the cache ({folder}); the hub did not answer ({_reason(exc)})")
        return FetchedWeights(str(folder), 0, 0, 0)
    total = sum(plan.files.values())
    missing = plan.missing(repo_id, cache_dir)
    if not missing:
        files = len(plan.files)
        log(f"{repo_id} is in the cache ({plan.folder}): {size_text(total)} in {files} files")
        return FetchedWeights(str(plan.folder), 0, total, len(plan.files))
    try:
        with _download_lock(repo_id, cache, plan, show, stop, interval) as progress_file:
            missing = plan.missing(repo_id, cache_dir)  # another process may have fetched them
            if missing:
                _download(
                    repo_id,
                    plan,
                    missing,
                    cache_dir,
                    endpoint,
                    show,
                    stop,
                    interval,
                    progress_file,
                    log,
                )
    except OSError as exc:  # the cache cannot be written: a read-only mount, a full disk
        raise WeightsDownloadError(f"cannot download {repo_id} into {cache}: {exc}") from None
    if report is not None:
        report.phase("loading")
    return FetchedWeights(str(plan.folder), sum(missing.values()), total, len(plan.files))


@contextlib.contextmanager
def _download_lock(
    repo_id: str,
    cache: str,
    plan: _Plan,
    show: Show,
    stop: threading.Event | None,
    interval: float,
) -> Iterator[Path]:
    """Hold the repository's download lock (one downloader per machine and cache); while
    another process holds it, show that process's progress. Yields the progress file."""
    from filelock import FileLock, Timeout

    folder = Path(cache) / ".locks" / "ovis-server"
    folder.mkdir(parents=True, exist_ok=True)
    name = "models--" + repo_id.replace("/", "--")
    lock = FileLock(str(folder / f"{name}.lock"))
    progress_file = folder / f"{name}.progress.json"
    total = sum(plan.files.values())
    while True:
        try:
            lock.acquire(timeout=interval)
            break
        except Timeout:
            if stop is not None and stop.is_set():
                raise DownloadInterrupted(repo_id) from None
            show(their_progress(repo_id, progress_file, total, len(plan.files)))
    try:
        yield progress_file
    finally:
        progress_file.unlink(missing_ok=True)
        lock.release()


def _download(
    repo_id: str,
    plan: _Plan,
    missing: dict[str, int],
    cache_dir: str | None,
    endpoint: str,
    show: Show,
    stop: threading.Event | None,
    interval: float,
    progress_file: Path,
    log: Callable[[str], None],
) -> None:
    from huggingface_hub import snapshot_download

    total = sum(plan.files.values())
    present = total - sum(missing.values())
    log(
        f"downloading {repo_id}: {size_text(sum(missing.values()))} in {len(missing)} of "
        f"{len(plan.files)} files, into {cache_folder(repo_id, cache_dir)}"
    )
    bars = ByteBars()
    failure: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            snapshot_download(
                repo_id,
                revision=plan.commit,
                cache_dir=cache_dir,
                allow_patterns=[glob.escape(name) for name in sorted(plan.files)],
                endpoint=endpoint,
                tqdm_class=bars.tqdm_class(),
            )
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)
        finally:
            finished.set()

    started = time.monotonic()
    rate = Rate()
    show(DownloadProgress(repo_id, present, total, len(plan.files), rate.add(present)))
    threading.Thread(target=run, name="weights-download", daemon=True).start()

    def measure() -> DownloadProgress:
        # Bytes written, by the bars; or by the files now in the cache, which also counts
        # what another process finished and needs no bar.
        still = plan.missing(repo_id, cache_dir)
        fetched = max(bars.done(), sum(missing.values()) - sum(still.values()))
        done = min(present + fetched, total)
        return DownloadProgress(repo_id, done, total, len(plan.files), rate.add(done))

    while not finished.wait(interval):
        if stop is not None and stop.is_set():
            raise DownloadInterrupted(repo_id)
        progress = measure()
        show(progress)
        write_progress(progress_file, progress)
    if failure:
        exc = failure[0]
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        raise WeightsDownloadError(
            f"downloading {repo_id} failed ({_reason(exc)}); what was downloaded stays in the "
            "cache, and the next start (or 'ovis-server download') fetches the rest"
        ) from None
    seconds = time.monotonic() - started
    fetched = sum(missing.values())
    show(DownloadProgress(repo_id, total, total, len(plan.files), fetched / max(seconds, 1e-3)))
    log(
        f"downloaded {repo_id}: {size_text(fetched)} in {duration_text(seconds)} "
        f"({size_text(fetched / max(seconds, 1e-3))}/s)"
    )


def local_weights(
    model: str,
    data_dir: Path,
    *,
    report: PhaseReport | None = None,
    stop: threading.Event | None = None,
    family: str | None = None,
) -> str:
    """``resolve_weights``, then, for a hub id, the snapshot folder in the Hugging Face cache,
    downloaded first if the cache lacks files (progress in the log and in ``report``)."""
    weights = resolve_weights(model, data_dir, family)
    if not is_hub_id(weights):
        return weights
    return fetch_weights(weights, report=report, stop=stop).folder
