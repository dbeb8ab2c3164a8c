"""HTTP servers inside the test process, so that no test reaches the internet: :class:`FileServer` (plain files with
Range support, and ways to fail) for URL downloads, :class:`FakeHub` (the few Hugging Face hub routes huggingface_hub
calls to list a repository and download its files: tree, revision, resolve) for hf:// ids."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


def _serve(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_port}"


class FileServer:
    """Serves ``files`` over HTTP with Range support; ``modes[name]``: ``corrupt`` (other bytes), ``truncate`` (stops
    half-way, once), ``norange`` (ignores Range), ``page`` (an HTML page instead of the file, as a file host's
    confirmation or login page). ``requests`` records (path, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/").split("?")[0]
                ranged = self.headers.get("Range")
                server.requests.append((name, ranged))
                if name not in server.files:
                    self.send_response(404)
                    self.end_headers()
                    return
                data, mode = server.files[name], server.modes.get(name, "ok")
                if mode == "page":
                    page = b"<!DOCTYPE html><html><body>Google Drive can't scan this file for viruses.</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if mode == "corrupt":
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                start = int(ranged.removeprefix("bytes=").rstrip("-")) if ranged and mode != "norange" else 0
                if start >= len(data) and ranged:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if mode == "truncate":
                    server.modes[name] = "ok"  # the next request gets the rest
                    body = body[: len(body) // 2]
                self.wfile.write(body)

        self.httpd, self.url = _serve(Handler)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()



COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def hub_etag(name: str, data: bytes) -> str:
    """The hub's digest of a file: an LFS file's sha256, else its git blob sha1 (the cache's blob names)."""
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()  # noqa: S324


class FakeHub:
    """A Hugging Face hub endpoint for ``repos`` ({repo_id: {path: bytes}}) at one commit, :data:`COMMIT` (branch
    ``main``). ``gated`` repositories refuse downloads as the hub does (401, ``X-Error-Code: GatedRepo``).
    ``requests`` records (method, path) of every request; :meth:`downloads` the files whose bytes were sent."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()) -> None:
        self.repos, self.gated = repos, set(gated)
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, head=True)

            def do_GET(self) -> None:
                hub.answer(self, head=False)

        self.httpd, self.url = _serve(Handler)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def downloads(self) -> list[str]:
        """Repository paths whose content was sent (GET of a resolve URL), in order."""
        return [m.group(1) for method, path in self.requests if method == "GET"
                if (m := re.match(rf"^/[^/]+/[^/]+/resolve/{COMMIT}/(.+)$", path))]  # fmt: skip

    def _send(self, h, code: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        h.send_response(code)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, code: int, error_code: str, head: bool) -> None:
        body = json.dumps({"error": error_code}).encode()
        self._send(h, code, body, {"X-Error-Code": error_code, "X-Error-Message": error_code,
                                   "Content-Type": "application/json"}, head)  # fmt: skip

    def answer(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path))
        api = re.match(r"^/api/models/([^/]+/[^/]+)/(tree|revision)/([^/]+)", path)
        resolve = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        match = api or resolve
        if match is None:
            return self._send(h, 404, head=head)
        repo, revision = match.group(1), match.group(3 if api else 2)
        files = self.repos.get(repo)
        if files is None:
            return self._error(h, 404, "RepoNotFound", head)
        if revision not in ("main", COMMIT):
            return self._error(h, 404, "RevisionNotFound", head)
        if api and api.group(2) == "tree":
            entries = [{"type": "file", "path": name, "size": len(data), "oid": hub_etag(name, data) if not
                        name.endswith(LFS_SUFFIXES) else "0" * 40,
                        **({"lfs": {"oid": hub_etag(name, data), "size": len(data), "pointerSize": 130}}
                           if name.endswith(LFS_SUFFIXES) else {})} for name, data in sorted(files.items())]  # fmt: skip
            return self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
        if api:
            info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in sorted(files)]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if repo in self.gated:
            return self._error(h, 401, "GatedRepo", head)
        name = resolve.group(3)
        if name not in files:
            return self._error(h, 404, "EntryNotFound", head)
        data = files[name]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hub_etag(name, data)}"', "Content-Type": "application/octet-stream"}
        return self._send(h, 200, data, headers, head)


def fill_hub_cache(hub_home, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, revision: str = "main") -> None:
    """A huggingface_hub cache laid out as the library lays it out: blobs named by the hub's digest, snapshot links."""
    repo = hub_home / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hub_etag(name, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
