"""A stand-in for the Hugging Face hub on 127.0.0.1: the part of its HTTP API that
``HfApi.model_info``, ``hf_hub_download`` and ``snapshot_download`` use, serving one local
folder as one model repository (and ``more`` folders as more), as fast as it can or at a set
pace.

- ``GET /api/models/{repo}[/revision/{rev}]``: the model's info, with its files (``siblings``,
  with sizes and blob ids when ``?blobs=true``) and its commit (``sha``);
- ``GET /api/models/{repo}/tree/{rev}``: the file listing (``?recursive=true``);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a file, with ``X-Repo-Commit``, ``ETag`` (the
  git blob id) and ``Content-Length``; a ``Range: bytes=N-`` asks for the rest.

Anything else is a 404 with the hub's ``X-Error-Code``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

CHUNK = 4096


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _repository(folder: Path) -> tuple[dict[str, bytes], str]:
    """A folder as a repository: its files by path, and a commit id that follows them."""
    files = {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    digest = hashlib.sha1(usedforsecurity=False)
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + data)
    return files, digest.hexdigest()


class FakeHub:
    def __init__(
        self,
        repo_id: str,
        folder: Path,
        bytes_per_second: float | None = None,
        more: Mapping[str, Path] | None = None,
    ) -> None:
        self.repo_id = repo_id
        # Each repository's files and commit; ``files`` and ``commit`` are repo_id's.
        self.repos = {
            repo: _repository(path) for repo, path in {repo_id: folder, **(more or {})}.items()
        }
        self.files, self.commit = self.repos[repo_id]
        self.bytes_per_second = bytes_per_second
        self.requests: list[str] = []
        self._pace_lock = threading.Lock()
        self._next_send = 0.0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub.handle(self, body=True)

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def total_bytes(self) -> int:
        return sum(len(data) for data in self.files.values())

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file_downloads(self) -> list[str]:
        return [
            entry for entry in self.requests if entry.startswith("GET") and "/resolve/" in entry
        ]

    # -- answering ---------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(request.path)
        path = unquote(url.path)
        self.requests.append(f"{request.command} {path}")
        named = re.fullmatch(r"/(?:api/models/)?([^/]+/[^/]+)(?:/.*)?", path)
        repo_id = named.group(1) if named else ""
        found = self.repos.get(repo_id)
        if found is None:
            self._error(request, 404, "RepoNotFound", "Repository not found")
            return
        files, commit = found
        repo = re.escape(repo_id)
        if match := re.fullmatch(rf"/api/models/{repo}(?:/revision/([^/]+))?", path):
            if not self._revision(request, match.group(1) or "main", commit):
                return
            blobs = "blobs=true" in url.query.lower()
            siblings = [
                {
                    "rfilename": name,
                    **({"size": len(data), "blobId": git_blob_id(data)} if blobs else {}),
                }
                for name, data in files.items()
            ]
            self._json(request, {"id": repo_id, "modelId": repo_id, "sha": commit,
                                 "private": False, "siblings": siblings}, body)  # fmt: skip
        elif match := re.fullmatch(rf"/api/models/{repo}/tree/([^/]+)(/.*)?", path):
            if not self._revision(request, match.group(1), commit):
                return
            under = (match.group(2) or "").strip("/")
            entries = [
                {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": name}
                for name, data in files.items()
                if not under or name.startswith(under + "/")
            ]
            self._json(request, entries, body)
        elif match := re.fullmatch(rf"/{repo}/resolve/([^/]+)/(.+)", path):
            if not self._revision(request, match.group(1), commit):
                return
            data = files.get(match.group(2))
            if data is None:
                self._error(request, 404, "EntryNotFound", "Entry not found")
                return
            self._file(request, data, commit, body)
        else:
            self._error(request, 404, "RepoNotFound", "Repository not found")

    def _revision(self, request: BaseHTTPRequestHandler, revision: str, commit: str) -> bool:
        if revision in ("main", commit):
            return True
        self._error(request, 404, "RevisionNotFound", "Invalid rev id")
        return False

    def _json(self, request: BaseHTTPRequestHandler, value: object, body: bool) -> None:
        data = json.dumps(value).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _error(self, request: BaseHTTPRequestHandler, status: int, code: str, text: str) -> None:
        data = json.dumps({"error": text}).encode()
        request.send_response(status)
        request.send_header("X-Error-Code", code)
        request.send_header("X-Error-Message", text)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)

    def _file(self, request: BaseHTTPRequestHandler, data: bytes, commit: str, body: bool) -> None:
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", "")):
            start = min(int(match.group(1)), len(data))
        request.send_response(206 if start else 200)
        request.send_header("X-Repo-Commit", commit)
        request.send_header("ETag", f'"{git_blob_id(data)}"')
        request.send_header("Content-Length", str(len(data) - start))
        request.send_header("Accept-Ranges", "bytes")
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.end_headers()
        if not body:
            return
        for offset in range(start, len(data), CHUNK):
            chunk = data[offset : offset + CHUNK]
            self._pace(len(chunk))
            request.wfile.write(chunk)

    def _pace(self, size: int) -> None:
        """Hold the whole server to ``bytes_per_second``, however many downloads run."""
        if not self.bytes_per_second:
            return
        with self._pace_lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + size / self.bytes_per_second
        time.sleep(max(start - now, 0))
