"""What the real-browser tests need besides Synapse and SeaweedFS.

* ``StaticSite``: serves ``tests/webclient/`` (a page and its service worker, modelled on
  Element Web's) on its own loopback origin, ``http://localhost:PORT``: a different origin
  from the homeserver and from S3 (both on ``127.0.0.1``), as app.example, matrix.example
  and the bucket are in a real deployment.
* ``RecordingProxy``: a pass-through HTTP proxy in front of SeaweedFS that records what
  reached it (method, path, ``Origin``, ``Authorization``, and the answer's
  ``Access-Control-Allow-Origin``). As the S3 ``endpoint_url`` it sees what the browser
  sent to "S3" after Synapse's 307; as ``public_endpoint_url`` it is the CDN form.

The request target and every header (``Host`` included) are forwarded untouched, so
SigV4 signatures, which cover both, still verify at SeaweedFS.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import attr

from tests.harness import free_port

WEBCLIENT_DIR = Path(__file__).resolve().parent / "webclient"


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a browser dropping a connection is not a test failure


class StaticSite:
    """The web client's own origin: ``http://localhost:PORT`` (bound to 127.0.0.1)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.origin = f"http://localhost:{self.port}"

    def start(self) -> StaticSite:
        class Handler(http.server.SimpleHTTPRequestHandler):
            def end_headers(self) -> None:
                self.send_header("Cache-Control", "no-store")
                super().end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        handler = functools.partial(Handler, directory=str(WEBCLIENT_DIR))
        self._server = _QuietServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Seen:
    """One request that reached the proxy, and the part of its answer CORS looks at."""

    method: str
    path: str
    origin: str | None
    authorization: str | None
    status: int
    allow_origin: str | None  # Access-Control-Allow-Origin of the answer
    keys: int = 0  # keys named in the request body (a DeleteObjects call's batch)

    @property
    def presigned(self) -> bool:
        """A presigned URL (a redirect followed), not the provider's own signed call."""
        return "X-Amz-Signature=" in urllib.parse.urlsplit(self.path).query


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection"}


class RecordingProxy:
    """A loopback pass-through to ``upstream`` (``http://127.0.0.1:PORT``) that records."""

    def __init__(self, upstream: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        up = urllib.parse.urlsplit(upstream)
        self._upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def presigned_since(self, mark: int) -> list[Seen]:
        """Presigned requests recorded after ``mark`` (a ``len(proxy.seen())``)."""
        return [s for s in self.seen()[mark:] if s.presigned]

    def start(self) -> RecordingProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else None

            def _forward(self) -> None:
                body = self._body()
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True,
                                    skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
                            continue
                        conn.putheader(name, value)
                    if body is not None:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    headers = resp.getheaders()
                finally:
                    conn.close()
                with proxy._lock:
                    proxy._seen.append(Seen(
                        self.command, self.path, self.headers.get("Origin"),
                        self.headers.get("Authorization"), resp.status,
                        resp.getheader("Access-Control-Allow-Origin"),
                        (body or b"").count(b"<Key>"),
                    ))
                self.send_response_only(resp.status, resp.reason)
                for name, value in headers:
                    if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
                        continue
                    self.send_header(name, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = _forward

        self._server = _QuietServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def cors_problem(seen: list[Seen], client_origin: str) -> str:
    """Why the browser got nothing from S3, from what reached S3 (for failure messages).

    The named case is the one the old docs caused: after the homeserver's cross-origin
    307, the request is *tainted* (Fetch standard, HTTP-redirect fetch), so the browser
    drops ``Authorization`` and sends ``Origin: null``; an answer that does not allow the
    origin ``null`` (a bucket rule for ``*``) is thrown away (``net::ERR_FAILED``).
    """
    followed = [s for s in seen if s.presigned]
    if not followed:
        return "the browser never reached S3 (no presigned request was recorded)"
    lines = []
    for s in followed:
        if s.origin == "null" and s.allow_origin not in ("*", "null"):
            lines.append(
                f"CORS: after the homeserver's cross-origin redirect the browser sent "
                f"Origin: null to S3 (tainted origin; the page's origin is {client_origin}) "
                f"and S3 answered {s.status} with Access-Control-Allow-Origin: "
                f"{s.allow_origin!r}, so the browser refused the answer. The bucket needs a "
                f"CORS rule with AllowedOrigins ['*'] (synapse-msc3916 s3 cors --apply)."
            )
        elif s.origin is not None and s.allow_origin not in ("*", s.origin):
            lines.append(f"CORS: S3 answered Origin: {s.origin} without allowing it "
                         f"(Access-Control-Allow-Origin: {s.allow_origin!r})")
        elif s.status >= 400:
            lines.append(f"S3 answered {s.status} to {s.method} {s.path[:80]}"
                         f" (Authorization sent: {s.authorization is not None})")
    return "; ".join(lines) or f"S3 answered every presigned request: {followed}"
