"""B3: uploads of mixed sizes, half duplicates: DedupStorageProvider vs synapse-s3-storage-provider 1.7.

Two Synapses side by side on one SeaweedFS, each with its own bucket. 500 uploads (50
in quick mode) of random content from 1 KiB to 4 MiB (log-uniform); half of them repeat
an earlier content. Uploads alternate between the servers one by one.
Goals: bytes in the dedup bucket = bytes of distinct content exactly; upload time <= 1.0x.
"""

from __future__ import annotations

import http.client
import math
import random
import time
from pathlib import Path

from bench.media import DEDUP, S3SP, start_provider_contenders, upload_bytes
from bench.report import Report
from tests.harness import SeaweedFS, Synapse

MIB = 1024 * 1024


def _bucket_bytes(weed: SeaweedFS, bucket: str) -> tuple[int, int]:
    total = count = 0
    for page in weed.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            total += int(obj["Size"])
            count += 1
    return total, count


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    uploads = 50 if quick else 500
    rng = random.Random(3916)
    distinct = [
        rng.randbytes(int(math.exp(rng.uniform(math.log(1024), math.log(4 * MIB)))))
        for _ in range(uploads // 2)
    ]
    # every content once, then each of them again, in a shuffled order
    sequence = list(range(len(distinct))) * 2
    rng.shuffle(sequence)
    distinct_bytes = sum(len(c) for c in distinct)
    logical_bytes = sum(len(distinct[i]) for i in sequence)

    workdir.mkdir(parents=True, exist_ok=True)
    weed = SeaweedFS(workdir / "seaweedfs")
    servers: dict[str, Synapse] = {}
    conns: list[http.client.HTTPConnection] = []
    try:
        weed.start()
        tokens = start_provider_contenders(workdir, weed, "b3", servers)
        conn = {}
        for name, hs in servers.items():
            conn[name] = http.client.HTTPConnection("127.0.0.1", hs.port, timeout=120)
            conns.append(conn[name])
        spent = dict.fromkeys(servers, 0.0)
        order = [DEDUP, S3SP]
        for n, content in enumerate(sequence):
            for name in order if n % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                upload_bytes(conn[name], tokens[name], distinct[content], f"f{n}.bin")
                spent[name] += time.perf_counter() - start

        stored = {DEDUP: _bucket_bytes(weed, "b3-dedup"), S3SP: _bucket_bytes(weed, "b3-s3sp")}
        case = f"{uploads} uploads, 50% duplicates"
        for name in (S3SP, DEDUP):
            is_ref = name == S3SP
            ratio = spent[DEDUP] / spent[S3SP]
            report.add(
                "B3", f"{case}: time", name,
                ratio="" if is_ref else f"{ratio:.2f}x",
                goal="reference" if is_ref else "<= 1.0x",
                met=None if is_ref else ratio <= 1.0,
                **{"total s": f"{spent[name]:.2f}", "uploads/s": f"{uploads / spent[name]:.1f}",
                   "MiB/s": f"{logical_bytes / MIB / spent[name]:.1f}"},
            )
        for name in (S3SP, DEDUP):
            is_ref = name == S3SP
            written, objects = stored[name]
            report.add(
                "B3", f"{case}: bytes in bucket", name,
                ratio=f"{written / distinct_bytes:.4f}x distinct",
                goal="" if is_ref else "= distinct bytes",
                met=None if is_ref else written == distinct_bytes,
                **{"objects": str(objects), "bucket bytes": str(written),
                   "distinct bytes": str(distinct_bytes), "uploaded bytes": str(logical_bytes)},
            )
        report.note(
            "B3",
            f"{uploads} uploads through `/_matrix/media/v3/upload` on one keep-alive connection per "
            f"server ({len(distinct)} distinct contents, {logical_bytes / MIB:.0f} MiB uploaded, "
            f"{distinct_bytes / MIB:.0f} MiB distinct). Bucket bytes are measured by listing each "
            "bucket and summing object sizes. Thumbnails are excluded by construction: the uploads "
            "are `application/octet-stream`, so Synapse generates none and both buckets hold "
            "originals only. Time is the sum of per-upload latencies (client sends until Synapse "
            "answers; both providers run with `store_synchronous: true`, so it includes the S3 write).",
        )
    finally:
        for c in conns:
            c.close()
        for hs in servers.values():
            hs.stop()
        weed.stop()
