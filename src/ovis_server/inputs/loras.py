"""Where a request's LoRA may come from, and how its file reaches the worker.

A ``loras[].path`` is one of:

- the name of one of the operator's LoRAs, ``<data-dir>/loras/<name>.safetensors``
  (always allowed; ``GET /v1/loras`` lists them);
- a hub repository id, ``owner/name`` or ``owner/name/file.safetensors`` (only with
  ``--lora-downloads hub``);
- an ``https`` URL of a ``.safetensors`` file (only with ``--lora-downloads url``), fetched
  under the same destination rules as webhooks and input images.

The API judges the source at submit (:func:`parse_source`: a 422 for what is not allowed or
does not exist); the worker obtains the file (:func:`obtain`): downloads go into a cache
keyed by the source and the content's hash, bounded in size (least recently used first
out), and every file must be safetensors, judged by its header, never a pickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ovis_server.inputs.fetch import FetchError, FetchPolicy, check_url, fetch_into

if TYPE_CHECKING:
    from ovis_server.config import Settings

SUFFIX = ".safetensors"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DownloadKind = Literal["hub", "url"]
DEFAULT_MAX_SIZE = 2 * 1000**3
MAX_HEADER = 100 * 1024 * 1024  # the safetensors header's own limit

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REPO = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
    r"(?:/(?P<file>[A-Za-z0-9._/-]{1,200}))?"
)


class LoraSourceError(ValueError):
    """The path names no LoRA this server may use; the message says why."""


class LoraFileError(ValueError):
    """The file is not a usable LoRA (not safetensors, too large, not reachable)."""


@dataclass(frozen=True)
class LoraSource:
    kind: Literal["local", "hub", "url"]
    ref: str  # the name, the repository id or the URL
    filename: str | None = None  # hub: the file in the repository, if named

    @property
    def key(self) -> str:
        """What the cache files this source's downloads under."""
        text = f"{self.kind}:{self.ref}:{self.filename or ''}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class LoraPolicy:
    """What the operator allows: their LoRA folder, which downloads, and their limits."""

    loras_dir: Path
    downloads: frozenset[DownloadKind] = frozenset()
    fetch: FetchPolicy = field(default_factory=lambda: FetchPolicy(max_bytes=DEFAULT_MAX_SIZE))


def policy_from_settings(settings: Settings) -> LoraPolicy:
    """The operator's LoRA rules: ``<data-dir>/loras/``, ``--lora-downloads``,
    ``--max-lora-size``; private addresses and plain http only with
    ``--allow-private-image-urls`` (the opt-in input images have)."""
    return LoraPolicy(
        settings.loras_dir,
        frozenset(settings.lora_downloads),
        FetchPolicy(
            max_bytes=settings.max_lora_size,
            allow_private=settings.allow_private_image_urls,
            allow_http=settings.allow_private_image_urls,
        ),
    )


def source_problems(paths: Iterable[str], policy: LoraPolicy) -> list[dict[str, Any]]:
    """What is wrong with a request's LoRA paths, as pydantic's errors read (``loc``
    ``("loras", index, "path")``): empty where every one is allowed and exists."""
    problems: list[dict[str, Any]] = []
    for index, path in enumerate(paths):
        try:
            parse_source(path, policy)
        except LoraSourceError as exc:
            problems.append({"loc": ("loras", index, "path"), "msg": str(exc), "type": "lora"})
    return problems


def local_names(loras_dir: Path) -> list[str]:
    """The operator's LoRAs by name, sorted."""
    if not loras_dir.is_dir():
        return []
    return sorted(
        path.name[: -len(SUFFIX)]
        for path in loras_dir.iterdir()
        if path.name.endswith(SUFFIX)
        and _NAME.fullmatch(path.name[: -len(SUFFIX)])
        and path.is_file()
    )


def parse_source(path: str, policy: LoraPolicy) -> LoraSource:
    """Judge ``path`` at submit: the source it names, or LoraSourceError saying why not."""
    path = path.strip()
    lowered = path.lower().split("?", 1)[0]
    if lowered.endswith(PICKLED):
        raise LoraSourceError("must be a .safetensors file (pickled weights can run code)")
    if "://" in path:
        if "url" not in policy.downloads:
            raise LoraSourceError("LoRA downloads from URLs are off on this server")
        try:
            check_url(path, policy.fetch)
        except FetchError as exc:
            raise LoraSourceError(str(exc)) from None
        if not lowered.endswith(SUFFIX):
            raise LoraSourceError("must be the URL of a .safetensors file")
        return LoraSource("url", path)
    if _NAME.fullmatch(path):
        if path not in local_names(policy.loras_dir):
            raise LoraSourceError(f"this server has no LoRA called {path!r}")
        return LoraSource("local", path)
    match = _REPO.fullmatch(path)
    if match is None or ".." in path.split("/"):
        raise LoraSourceError(
            "must be a LoRA name of this server, a hub repository id (owner/name) or an "
            "https URL of a .safetensors file"
        )
    filename = match["file"]
    if filename is not None and not filename.endswith(SUFFIX):
        raise LoraSourceError("must name a .safetensors file of the repository")
    if "hub" not in policy.downloads:
        raise LoraSourceError("LoRA downloads from the hub are off on this server")
    return LoraSource("hub", match["repo"], filename)


def check_safetensors(path: Path, max_bytes: int) -> None:
    """LoraFileError unless ``path`` is a safetensors file of at most ``max_bytes``: an
    8-byte header length and a JSON header whose tensors lie within the file."""
    size = path.stat().st_size
    if size > max_bytes:
        raise LoraFileError(f"is larger than {max_bytes} bytes")
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise LoraFileError("is not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise LoraFileError("is not a safetensors file")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, ValueError):
            raise LoraFileError("is not a safetensors file") from None
    if not isinstance(header, dict):
        raise LoraFileError("is not a safetensors file")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(value, int) for value in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= size - 8 - length
        ):
            raise LoraFileError("is not a safetensors file (a tensor lies outside it)")


class LoraCache:
    """Downloaded LoRAs on disk, ``<key>-<sha256>.safetensors``, at most ``max_bytes`` in
    all: the least recently used go first."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes

    def find(self, source: LoraSource) -> Path | None:
        for path in sorted(self.folder.glob(f"{source.key}-*{SUFFIX}")):
            with contextlib.suppress(OSError):
                os.utime(path)  # used now
                return path
        return None

    def add(self, source: LoraSource, download: Path) -> Path:
        """Move a checked download in (its name from its content's hash), then trim."""
        digest = hashlib.sha256()
        with download.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        final = self.folder / f"{source.key}-{digest.hexdigest()[:32]}{SUFFIX}"
        download.replace(final)
        self.trim(keep=final)
        return final

    def trim(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used files until the rest fit; what was removed."""
        files: list[tuple[float, int, Path]] = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = []
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                removed.append(path)
        return removed


async def obtain(
    source: LoraSource,
    policy: LoraPolicy,
    cache: LoraCache,
    hub_endpoint: str | None = None,
) -> Path:
    """The local file of ``source``, downloading it into ``cache`` if need be (the
    worker's side); LoraFileError saying why it cannot be had."""
    if source.kind == "local":
        path = policy.loras_dir / f"{source.ref}{SUFFIX}"
        if not path.is_file():
            raise LoraFileError(f"this server has no LoRA called {source.ref!r}")
        check_safetensors(path, policy.fetch.max_bytes)
        return path
    found = cache.find(source)
    if found is not None:
        return found
    cache.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.folder, prefix=".download-") as scratch:
        download = Path(scratch) / f"lora{SUFFIX}"
        if source.kind == "url":
            with download.open("wb") as file:
                try:
                    await fetch_into(source.ref, policy.fetch, file.write)
                except FetchError as exc:
                    raise LoraFileError(f"could not be downloaded: {exc}") from None
        else:
            _from_hub(source, policy.fetch.max_bytes, download, hub_endpoint)
        check_safetensors(download, policy.fetch.max_bytes)
        return cache.add(source, download)


def _from_hub(source: LoraSource, max_bytes: int, target: Path, endpoint: str | None) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint)
    try:
        info = api.model_info(source.ref, files_metadata=True)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        raise LoraFileError(f"hub repository {source.ref} not found ({status})") from None
    except OSError:
        raise LoraFileError("the hub could not be reached") from None
    sizes = {item.rfilename: item.size for item in info.siblings or ()}
    filename = source.filename or _the_one_safetensors(sizes)
    if filename not in sizes:
        raise LoraFileError(f"hub repository {source.ref} has no file {filename}")
    size = sizes[filename]
    if size is not None and size > max_bytes:
        raise LoraFileError(f"is larger than {max_bytes} bytes")
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        try:
            path = hf_hub_download(source.ref, filename, local_dir=folder, endpoint=endpoint)
        except (HfHubHTTPError, OSError):
            raise LoraFileError("the hub download failed") from None
        Path(path).replace(target)


def _the_one_safetensors(names: Iterable[str]) -> str:
    found = [name for name in names if name.endswith(SUFFIX)]
    if len(found) != 1:
        raise LoraFileError(
            "name the file (owner/name/file.safetensors): the repository has "
            f"{len(found)} .safetensors files"
        )
    return found[0]
