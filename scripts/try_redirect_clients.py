"""Try HTTP clients against a redirecting Synapse: do they follow, and do they leak the token?

Starts a SeaweedFS that checks signatures, a recording pass-through in front of it (the
``public_endpoint_url`` Synapse signs for, so every request a client sends "to S3" is seen),
and a Synapse with the dedup provider and ``redirect.enabled``. Then downloads one 2 MiB
media with each client, sending ``Authorization: Bearer`` to Synapse, and prints whether
the client followed the 307, got the right bytes, and sent the Authorization header on to
the S3 host (AWS S3 refuses such a request: one authentication mechanism only).

    .venv/bin/python scripts/try_redirect_clients.py     (curl; requests; aiohttp if installed)
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import http.server
import os
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Synapse, free_port  # noqa: E402
from tests.storage_helpers import SignedSeaweedFS, provider_entry, s3_config  # noqa: E402

seen_auth: list[str | None] = []


def recorder(target_port: int) -> tuple[http.server.ThreadingHTTPServer, int]:
    """Forwards GETs to SeaweedFS unchanged (Host included: the signature covers it)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen_auth.append(self.headers.get("Authorization"))
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            conn.request("GET", self.path, headers=dict(self.headers.items()))
            resp = conn.getresponse()
            body = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="msc3916-clients-") as tmp:
        weed = SignedSeaweedFS(Path(tmp) / "weed").start()
        rec, rec_port = recorder(weed.s3_port)
        hs = None
        try:
            weed.create_bucket("clients")
            hs = Synapse(Path(tmp) / "hs", storage_providers=[provider_entry(s3_config(
                weed, "clients",
                redirect={"enabled": True, "public_endpoint_url": f"http://127.0.0.1:{rec_port}"},
            ))]).start()
            token = hs.register("client")
            data = os.urandom(2 * 1024 * 1024)
            media_id = hs.upload(token, data, "application/octet-stream", "c.bin")
            url = f"{hs.base_url}/_matrix/client/v1/media/download/{hs.server_name}/{media_id}"
            auth = {"Authorization": f"Bearer {token}"}

            def curl() -> bytes:
                out = subprocess.run(["curl", "-sfL", "-H", f"Authorization: Bearer {token}", url],
                                     capture_output=True, check=True)
                return out.stdout

            def requests_get() -> bytes:
                import requests

                return bytes(requests.get(url, headers=auth, timeout=60).content)

            def aiohttp_get() -> bytes:
                import aiohttp

                async def go() -> bytes:
                    async with aiohttp.ClientSession() as s, s.get(url, headers=auth) as r:
                        return await r.read()

                return asyncio.run(go())

            def urllib_get() -> bytes:
                with urllib.request.urlopen(urllib.request.Request(url, headers=auth)) as r:
                    return bytes(r.read())

            version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
            clients = [(version.split()[0] + " " + version.split()[1] + " -L", curl),
                       ("python-requests", requests_get), ("aiohttp", aiohttp_get),
                       ("python urllib.request", urllib_get)]
            for name, fetch in clients:
                del seen_auth[:]
                try:
                    body = fetch()
                except Exception as e:  # a missing library, a refused request
                    print(f"{name}: failed: {e!r}")
                    continue
                ok = hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
                leaked = any(a is not None for a in seen_auth)
                print(f"{name}: followed={bool(seen_auth)} bytes_ok={ok} "
                      f"authorization_sent_to_s3={leaked}")
        finally:
            if hs is not None:
                hs.stop()
            rec.shutdown()
            weed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
