"""Helpers shared by the storage benchmarks (B2, B3, B5): files, streaming HTTP, RSS."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
from pathlib import Path
from typing import Any

from tests.harness import SeaweedFS, Synapse
from tests.storage_helpers import provider_entry, s3_config, s3_legacy_entry

DEDUP = "DedupStorageProvider"
S3SP = "synapse-s3-storage-provider 1.7"

CHUNK = 1 << 20


def make_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` in 1 MiB chunks; return the SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(CHUNK, left))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def upload_file(hs: Synapse, token: str, path: Path, content_type: str = "application/octet-stream") -> str:
    """Upload a file from disk, streamed (never held in memory); return the media id."""
    import json

    conn = http.client.HTTPConnection("127.0.0.1", hs.port, timeout=600, blocksize=CHUNK)
    try:
        with open(path, "rb") as body:
            conn.request(
                "POST", "/_matrix/media/v3/upload?filename=" + path.name, body=body,
                headers={"Authorization": f"Bearer {token}", "Content-Type": content_type,
                         "Content-Length": str(path.stat().st_size)},
            )
            resp = conn.getresponse()
            data = resp.read()
        assert resp.status == 200, (resp.status, data[:300])
        return str(json.loads(data)["content_uri"].rsplit("/", 1)[1])
    finally:
        conn.close()


def upload_bytes(conn: http.client.HTTPConnection, token: str, data: bytes, name: str) -> str:
    """One upload on a kept-alive connection; return the media id."""
    import json

    conn.request(
        "POST", "/_matrix/media/v3/upload?filename=" + name, body=data,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
    )
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, (resp.status, body[:300])
    return str(json.loads(body)["content_uri"].rsplit("/", 1)[1])


def timed_download(hs: Synapse, token: str, media_id: str, verify: bool) -> tuple[float, int, str]:
    """GET the media on the stable authenticated path, reading and discarding 1 MiB chunks.

    Returns (seconds until the last byte, bytes received, SHA-256 or "" if not verified).
    """
    digest = hashlib.sha256() if verify else None
    conn = http.client.HTTPConnection("127.0.0.1", hs.port, timeout=600)
    try:
        start = time.perf_counter()
        conn.request("GET", f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}",
                     headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read()[:300])
        received = 0
        while chunk := resp.read(CHUNK):
            received += len(chunk)
            if digest is not None:
                digest.update(chunk)
        return time.perf_counter() - start, received, digest.hexdigest() if digest else ""
    finally:
        conn.close()


def timed_s3_download(client: Any, bucket: str, key: str, verify: bool) -> tuple[float, int, str]:
    """The same object straight from S3 with boto3, read the same way."""
    digest = hashlib.sha256() if verify else None
    start = time.perf_counter()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    received = 0
    while chunk := body.read(CHUNK):
        received += len(chunk)
        if digest is not None:
            digest.update(chunk)
    body.close()
    return time.perf_counter() - start, received, digest.hexdigest() if digest else ""


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Samples a process's VmRSS every few ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid = pid
        self.interval = interval
        self.baseline = proc_status_kib(pid, "VmRSS")
        self.hwm_before = proc_status_kib(pid, "VmHWM")
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status_kib(self.pid, "VmRSS"))
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status_kib(self.pid, "VmRSS"))
        self.hwm_after = proc_status_kib(self.pid, "VmHWM")

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


def start_provider_contenders(
    workdir: Path, weed: SeaweedFS, tag: str, servers: dict[str, Synapse]
) -> dict[str, str]:
    """Two Synapses on one SeaweedFS, one per S3 provider (ours, synapse-s3-storage-provider).

    ``servers`` is filled before anything starts, so the caller's cleanup stops whatever did
    start. Returns an access token per contender.
    """
    weed.create_bucket(f"{tag}-dedup")
    weed.create_bucket(f"{tag}-s3sp")
    servers[DEDUP] = Synapse(workdir / "dedup", storage_providers=[provider_entry(s3_config(weed, f"{tag}-dedup"))])
    servers[S3SP] = Synapse(
        workdir / "s3sp", storage_providers=[s3_legacy_entry(weed, f"{tag}-s3sp", threadpool_size=4)]
    )
    tokens = {}
    for name, hs in servers.items():
        hs.start()
        tokens[name] = hs.register("bench")
    return tokens
