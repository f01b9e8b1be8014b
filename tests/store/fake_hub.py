"""An in-process loopback HTTP server that serves files with Range support, and answers the
Hugging Face calls `huggingface_hub` makes for a pull (the repo tree and `resolve` downloads),
so tests exercise the real client code against HF_ENDPOINT=<this server>.

    GET /files/<name>                                plain download
    GET /api/models/<owner>/<repo>/tree/main         the repo's files, with LFS sha256 (in
                                                     pages linked by `Link: rel="next"` when
                                                     the repo has a page_size)
    GET /<owner>/<repo>/resolve/main/<path>          a file of the repo

    GET <path in redirects>                          302 to the URL it maps to

`cut_next_after` makes the next download stop after that many bytes (a dropped connection);
`start(tls=...)` serves HTTPS with that server context.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_CHUNK = 1 << 20


@dataclass
class HubRepo:
    files: dict[str, Path]  # path in repo -> file
    sha256_override: dict[str, str] = field(default_factory=dict)  # lie about a file's LFS oid
    page_size: int | None = None  # list the tree in pages of this many entries


@dataclass
class FakeHub:
    files: dict[str, Path] = field(default_factory=dict)
    repos: dict[str, HubRepo] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    cut_next_after: int | None = None
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # lowercase keys
    bytes_sent: int = 0
    server: ThreadingHTTPServer | None = None
    scheme: str = "http"

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, tls: ssl.SSLContext | None = None) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a test's client hung up mid-download on purpose
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = unquote(urlsplit(self.path).path)
        self.fake.requests.append((path, {k.lower(): v for k, v in self.headers.items()}))
        if path in self.fake.redirects:
            return self._send_redirect(self.fake.redirects[path])
        if path.startswith("/files/") and path[7:] in self.fake.files:
            return self._send_file(self.fake.files[path[7:]])
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/main", path)
        if tree and tree.group(1) in self.fake.repos:
            return self._send_tree(self.fake.repos[tree.group(1)], path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/main/(.+)", path)
        if resolve and resolve.group(1) in self.fake.repos:
            repo = self.fake.repos[resolve.group(1)]
            if resolve.group(2) in repo.files:
                return self._send_file(repo.files[resolve.group(2)])
        self._send_json(404, {"error": "Repository or file not found"})

    def _send_json(self, status: int, body: object, link: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        if link:
            self.send_header("Link", f'<{link}>; rel="next"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_tree(self, repo: HubRepo, tree_path: str) -> None:
        entries = []
        for name, path in repo.files.items():
            size = path.stat().st_size
            oid = repo.sha256_override.get(name) or _sha256(path)
            entries.append({"type": "file", "path": name, "size": size, "oid": "0" * 40,
                            "lfs": {"oid": oid, "size": size, "pointerSize": 134}})
        if repo.page_size is None:
            return self._send_json(200, entries)
        cursor = int(parse_qs(urlsplit(self.path).query).get("cursor", ["0"])[0])
        end = cursor + repo.page_size
        link = f"http://{self.headers['Host']}{tree_path}?recursive=true&cursor={end}" \
            if end < len(entries) else None
        self._send_json(200, entries[cursor:end], link)

    def _send_file(self, path: Path) -> None:
        size = path.stat().st_size
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        limit, self.fake.cut_next_after = self.fake.cut_next_after, None
        self._copy(path, start, size, limit)

    def _copy(self, path: Path, start: int, size: int, limit: int | None) -> None:
        sent = 0
        with open(path, "rb") as f:
            f.seek(start)
            while chunk := f.read(_CHUNK):
                if limit is not None and sent + len(chunk) > limit:
                    self.wfile.write(chunk[:limit - sent])
                    self.fake.bytes_sent += limit - sent
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                self.fake.bytes_sent += len(chunk)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]
