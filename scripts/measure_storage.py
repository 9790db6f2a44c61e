"""Measure the dedup provider on a real Synapse + SeaweedFS (not part of the test suite).

Prints upload times (new content vs dedup hit), download throughput, and Synapse's
memory and thread count while clients download a large file slowly, to check that the
responder's memory is bounded and that slow clients hold no thread.

    PYTHONPATH=. python scripts/measure_storage.py [size_mib]
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.harness import SeaweedFS, Synapse, request
from tests.storage_helpers import provider_entry, s3_config, wipe_local_media


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.max_rss = 0
        self.max_threads = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            s = proc_status(self.pid)
            self.max_rss = max(self.max_rss, s["VmRSS"])
            self.max_threads = max(self.max_threads, s["Threads"])
            time.sleep(0.05)


def slow_download(hs: Synapse, token: str, media_id: str, seconds: float, got: list[int]) -> None:
    sock = socket.create_connection(("127.0.0.1", hs.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    path = f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}"
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    total = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = sock.recv(16 * 1024)
        if not data:
            break
        total += len(data)
        time.sleep(0.05)  # about 320 KiB/s
    got.append(total)
    sock.close()


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    base = Path(tempfile.mkdtemp(prefix="msc3916-measure-"))
    sw = SeaweedFS(base / "s3").start()
    sw.create_bucket("measure")
    hs = Synapse(
        base / "hs",
        storage_providers=[provider_entry(s3_config(sw, "measure", threadpool_size=8))],
    )
    try:
        hs.start()
        token = hs.register("alice")
        data = os.urandom(size << 20)
        idle = proc_status(hs.proc.pid)
        print(f"Synapse idle: RSS {idle['VmRSS'] // 1024} MiB, {idle['Threads']} threads")

        for label in ("new content", "dedup hit"):
            t = time.monotonic()
            media_id = hs.upload(token, data)
            print(f"upload {size} MiB ({label}): {time.monotonic() - t:.2f}s")
        small = os.urandom(100_000)
        t = time.monotonic()
        for _ in range(20):
            hs.upload(token, small)
        print(
            f"upload 100 KB x20 (1 new, 19 dedup): {(time.monotonic() - t) / 20 * 1000:.0f} ms each"
        )

        wipe_local_media(hs)
        before = proc_status(hs.proc.pid)
        sampler = Sampler(hs.proc.pid)
        sampler.start()
        t = time.monotonic()
        resp = request(
            "GET",
            hs.base_url,
            f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}",
            {"Authorization": f"Bearer {token}"},
            timeout=300,
        )
        elapsed = time.monotonic() - t
        assert resp.status == 200 and resp.body == data
        print(
            f"download {size} MiB from S3 (verified): {elapsed:.2f}s,"
            f" {size / elapsed:.0f} MiB/s; RSS {before['VmRSS'] // 1024} ->"
            f" max {sampler.max_rss // 1024} MiB"
        )
        sampler.running = False
        sampler.join()

        sampler = Sampler(hs.proc.pid)
        sampler.start()
        before = proc_status(hs.proc.pid)
        got: list[int] = []
        clients = [
            threading.Thread(target=slow_download, args=(hs, token, media_id, 8.0, got))
            for _ in range(20)
        ]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        sampler.running = False
        sampler.join()
        print(
            f"20 slow clients for 8 s (got {min(got) >> 10}-{max(got) >> 10} KiB each):"
            f" RSS {before['VmRSS'] // 1024} -> max {sampler.max_rss // 1024} MiB,"
            f" threads {before['Threads']} -> max {sampler.max_threads}"
            f" (storage pool max 8)"
        )
        fetches = hs.metric_value("synapse_msc3916_storage_fetches_total", result="hit")
        print(f"fetch hits counted: {fetches:.0f}")
    finally:
        hs.stop()
        sw.stop()


if __name__ == "__main__":
    main()
