"""A loopback HTTP server for the ``xmx.data get`` tests: plain files (``url`` sources, with Range requests for
resumption) and a Hugging Face Hub-shaped endpoint (``HF_ENDPOINT``): ``HEAD``/``GET /<repo>/resolve/<rev>/<file>``
(``/datasets/<repo>/...`` for dataset repositories) with the headers ``hf_hub_download`` reads (``X-Repo-Commit``,
``X-Linked-Etag`` = the file's sha256, ``X-Linked-Size``) and ``/api/{models,datasets}/<repo>/revision/<rev>``.
Binds 127.0.0.1 only; every request is logged in ``server.log`` as ``(method, path, range header)``."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeSources:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # "/host/path" -> bytes (url sources)
        self.hub: dict[tuple[str, str], bytes] = {}  # (repo, path) -> bytes
        self.hub_etag: dict[tuple[str, str], str] = {}  # overrides (a wrong published sha256)
        self.dead: set[str] = set()  # path prefixes answered with 404 (a dead link; 5xx would be retried with backoff)
        self.log: list[tuple[str, str, str | None]] = []
        self.truncate_once: set[str] = set()  # paths whose next GET sends half the body, then closes
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        src = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self):
                path = self.path.split("?")[0]
                src.log.append((self.command, path, self.headers.get("Range")))
                if any(path.startswith(p) for p in src.dead):
                    return 404, {"X-Error-Code": "EntryNotFound"}, b"gone"
                m = re.match(r"^/api/(models|datasets)/(.+?)/revision/([^/]+)$", path)
                if m:
                    repo = m.group(2)
                    sib = [{"rfilename": p} for (r, p) in src.hub if r == repo]
                    return 200, {"Content-Type": "application/json"}, json.dumps(
                        {"id": repo, "sha": COMMIT, "siblings": sib}).encode()
                m = re.match(r"^/(?:datasets/)?(.+?)/resolve/([^/]+)/(.+)$", path)
                if m and (m.group(1), m.group(3)) in src.hub:
                    key = (m.group(1), m.group(3))
                    data = src.hub[key]
                    etag = src.hub_etag.get(key, hashlib.sha256(data).hexdigest())
                    return 200, {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{etag}"', "ETag": f'"{etag}"',
                                 "X-Linked-Size": str(len(data))}, data
                if path in src.files:
                    return 200, {}, src.files[path]
                return 404, {"X-Error-Code": "EntryNotFound"}, b"not found"

            def _send(self, head_only: bool):
                code, headers, data = self._body()
                start = 0
                rng = self.headers.get("Range")
                if code == 200 and rng:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    code = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head_only:
                    return
                path = self.path.split("?")[0]
                if path in src.truncate_once:
                    src.truncate_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_GET(self):
                self._send(False)

            def do_HEAD(self):
                self._send(True)

        return H
