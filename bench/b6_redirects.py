"""B6: presigned redirects: the client follows a 307 to S3 vs Synapse streaming from S3.

Two Synapses with the dedup provider on one SeaweedFS (which checks signatures), one with
`redirect.enabled`, one without; the same bytes uploaded to both. Every read is cold (the
local media store is emptied first). Contenders per size, alternating read by read:
redirect mode (GET on Synapse, then the Location, timed end to end), streaming mode, and a
direct presigned GET of the same object (the limit). Then 16 concurrent 100 MiB downloads
per mode, and Synapse's CPU seconds per GiB served (utime + stime from /proc/<pid>/stat).
Goals: redirect >= 90% of direct at 100 MiB and 1 GiB; Synapse CPU per GiB <= 5% of
streaming; 16-concurrent aggregate >= 2x streaming.
Quick mode (CI's smoke run) stops at 100 MiB, read once, with 4 concurrent downloads.
"""

from __future__ import annotations

import http.client
import itertools
import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from bench.load import median
from bench.media import CHUNK, make_file, upload_file
from bench.report import Report
from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import Synapse
from tests.storage_helpers import SignedSeaweedFS, provider_entry, s3_config, wipe_local_media

MIB, GIB = 1024 * 1024, 1024 * 1024 * 1024
REDIRECT = "redirect (client follows the 307)"
STREAM = "streaming through Synapse"
DIRECT = "direct presigned GET (limit)"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _read_all(resp: http.client.HTTPResponse) -> int:
    received = 0
    while chunk := resp.read(CHUNK):
        received += len(chunk)
    return received


def get_url(url: str) -> int:
    """GET a full URL (the presigned one) with no token; return the bytes received."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""))
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read()[:300])
        return _read_all(resp)
    finally:
        conn.close()


def download(hs: Synapse, token: str, media_id: str, follow: bool,
             to_307: list[float] | None = None) -> int:
    """The stable authenticated download; with ``follow`` the 307 is expected and followed.

    ``to_307`` gets the seconds from the request to the 307 read in full, so the Synapse
    half of a redirected read can be told from its S3 half.
    """
    conn = http.client.HTTPConnection("127.0.0.1", hs.port, timeout=600)
    start = time.perf_counter()
    try:
        conn.request("GET", f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}",
                     headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        if not follow:
            assert resp.status == 200, (resp.status, resp.read()[:300])
            return _read_all(resp)
        assert resp.status == 307, (resp.status, resp.read()[:300])
        location = resp.getheader("Location")
        resp.read()
    finally:
        conn.close()
    if to_307 is not None:
        to_307.append(time.perf_counter() - start)
    assert location
    return get_url(location)


def _local_path(media_id: str) -> str:
    return f"local_content/{media_id[0:2]}/{media_id[2:4]}/{media_id[4:]}"


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    # (label, size, rounds, reads per contender per round). Each round takes the next
    # order of the three contenders (all six orders in turn), so over 6 or 12 rounds each
    # reads first, second and last equally often, and redirect precedes direct as often
    # as it follows it.
    cases = [
        ("1 MiB", MIB, 2 if quick else 6, 3 if quick else 8),
        ("100 MiB", 100 * MIB, 1 if quick else 12, 1),
    ]
    if not quick:
        cases.append(("1 GiB", GIB, 6, 1))
    concurrent = 4 if quick else 16
    workdir.mkdir(parents=True, exist_ok=True)
    weed = SignedSeaweedFS(workdir / "seaweedfs")
    servers: dict[str, Synapse] = {}
    # Synapse CPU seconds and bytes served, per mode, over the 100 MiB and 1 GiB reads.
    cpu = {REDIRECT: 0.0, STREAM: 0.0}
    served = {REDIRECT: 0, STREAM: 0}
    try:
        weed.start()
        weed.create_bucket("b6-redirect")
        weed.create_bucket("b6-stream")
        servers[REDIRECT] = Synapse(workdir / "redirect", storage_providers=[provider_entry(
            s3_config(weed, "b6-redirect", redirect={"enabled": True}))])
        servers[STREAM] = Synapse(workdir / "stream", storage_providers=[provider_entry(
            s3_config(weed, "b6-stream"))])
        tokens = {}
        for name, hs in servers.items():
            hs.start()
            tokens[name] = hs.register("bench")
        signer: Any = None
        orders = list(itertools.permutations([REDIRECT, STREAM, DIRECT]))
        load = [os.getloadavg()[0]]
        concurrent_id: dict[str, str] = {}
        for label, size, rounds, reads in cases:
            source = workdir / "source.bin"
            make_file(source, size)
            ids = {name: upload_file(hs, tokens[name], source) for name, hs in servers.items()}
            source.unlink()
            if size == 100 * MIB:
                concurrent_id = ids
            if signer is None:
                import boto3
                from botocore.config import Config

                signer = boto3.client(
                    "s3", endpoint_url=weed.endpoint_url, region_name="us-east-1",
                    aws_access_key_id=weed.ACCESS_KEY, aws_secret_access_key=weed.SECRET_KEY,
                    config=Config(signature_version="s3v4"),
                )
            row = servers[STREAM].sql(
                "SELECT sha256 FROM msc3916_storage_paths WHERE path = ?", (_local_path(ids[STREAM]),)
            )
            sha = row[0][0]
            key = blob_name(sha)
            # The first read of an object SeaweedFS has just stored is markedly slower than
            # the next ones (1 GiB, four fresh objects: a median of 2.1 s, then 1.7 s).
            # Without this, the contender that reads first in round 0 pays for it alone: one untimed read
            # of each object (the redirect bucket's through a redirect, which also fills
            # Synapse's signed-URL cache, as in steady state; the streaming bucket's straight
            # from S3, which is what Synapse reads) before any timing.
            assert download(servers[REDIRECT], tokens[REDIRECT], ids[REDIRECT], follow=True) == size
            assert get_url(signer.generate_presigned_url(
                "get_object", Params={"Bucket": "b6-stream", "Key": key}, ExpiresIn=300)) == size
            times: dict[str, list[float]] = {k: [] for k in (REDIRECT, STREAM, DIRECT)}
            to_307: list[float] = []
            for r in range(rounds):
                turn = orders[r % len(orders)]
                for _ in range(reads):
                    for name in turn:
                        if name == DIRECT:
                            start = time.perf_counter()
                            url = signer.generate_presigned_url(
                                "get_object", Params={"Bucket": "b6-redirect", "Key": key}, ExpiresIn=300)
                            got = get_url(url)
                        else:
                            hs = servers[name]
                            wipe_local_media(hs)
                            assert hs.proc is not None
                            cpu_before = cpu_seconds(hs.proc.pid)
                            start = time.perf_counter()
                            got = download(hs, tokens[name], ids[name], follow=name == REDIRECT,
                                           to_307=to_307 if name == REDIRECT else None)
                            if size >= 100 * MIB:
                                cpu[name] += cpu_seconds(hs.proc.pid) - cpu_before
                                served[name] += got
                        times[name].append(time.perf_counter() - start)
                        assert got == size, (name, label, got)
            load.append(os.getloadavg()[0])
            med = {k: median(v) for k, v in times.items()}

            def figures(name: str, med: dict[str, float] = med, size: int = size,
                        times: dict[str, list[float]] = times) -> dict[str, str]:
                return {"median s": f"{med[name]:.3f}", "MiB/s": f"{size / MIB / med[name]:.1f}",
                        "reads": str(len(times[name]))}

            vs_direct = med[DIRECT] / med[REDIRECT]
            report.add(
                "B6", f"cold read {label}", REDIRECT,
                ratio=f"{vs_direct:.0%} of direct; {med[STREAM] / med[REDIRECT]:.2f}x streaming",
                goal=">= 90% of direct" if size >= 100 * MIB else "(reported, no goal)",
                met=vs_direct >= 0.9 if size >= 100 * MIB else None,
                **figures(REDIRECT), **{"to 307 ms": f"{median(to_307) * 1000:.1f}"},
            )
            report.add("B6", f"cold read {label}", STREAM,
                       ratio=f"{med[DIRECT] / med[STREAM]:.0%} of direct", goal="reference",
                       **figures(STREAM))
            report.add("B6", f"cold read {label}", DIRECT, goal="limit", **figures(DIRECT))

        # `concurrent` (16) downloads of the 100 MiB media at once, per mode, alternating.
        aggregate: dict[str, list[float]] = {REDIRECT: [], STREAM: []}
        for r in range(1 if quick else 2):
            for name in ([REDIRECT, STREAM] if r % 2 == 0 else [STREAM, REDIRECT]):
                hs = servers[name]
                wipe_local_media(hs)
                results: list[int] = []
                errors: list[BaseException] = []

                def one(hs: Synapse = hs, name: str = name, results: list[int] = results,
                        errors: list[BaseException] = errors) -> None:
                    try:
                        results.append(download(hs, tokens[name], concurrent_id[name],
                                                follow=name == REDIRECT))
                    except BaseException as e:  # reported after the join
                        errors.append(e)

                threads = [threading.Thread(target=one) for _ in range(concurrent)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                seconds = time.perf_counter() - start
                assert not errors, errors[:1]
                assert results == [100 * MIB] * concurrent
                aggregate[name].append(concurrent * 100 / seconds)
        best = {k: median(v) for k, v in aggregate.items()}
        report.add("B6", f"{concurrent} concurrent 100 MiB", STREAM, goal="reference",
                   **{"aggregate MiB/s": f"{best[STREAM]:.1f}"})
        report.add("B6", f"{concurrent} concurrent 100 MiB", REDIRECT,
                   ratio=f"{best[REDIRECT] / best[STREAM]:.2f}x streaming", goal=">= 2x streaming",
                   met=best[REDIRECT] >= 2 * best[STREAM],
                   **{"aggregate MiB/s": f"{best[REDIRECT]:.1f}"})

        per_gib = {k: cpu[k] / (served[k] / GIB) for k in cpu}
        report.add("B6", "Synapse CPU per GiB served", STREAM, goal="reference",
                   **{"CPU s/GiB": f"{per_gib[STREAM]:.3f}"})
        report.add("B6", "Synapse CPU per GiB served", REDIRECT,
                   ratio=f"{per_gib[REDIRECT] / per_gib[STREAM]:.1%} of streaming",
                   goal="<= 5% of streaming", met=per_gib[REDIRECT] <= 0.05 * per_gib[STREAM],
                   **{"CPU s/GiB": f"{per_gib[REDIRECT]:.3f}"})
        report.note(
            "B6",
            "Every Synapse read is cold (the local media store is emptied before it). Redirect "
            "mode is timed from the request to Synapse to the last byte from S3: the 307 (auth, "
            "the media lookups, one index lookup, a cached or fresh SigV4 signature) plus a new "
            "connection to S3 for the presigned URL; *to 307 ms* is its Synapse half (median). "
            "The direct row presigns (boto3, in the bench process) and GETs the very object "
            "redirect mode is sent to, read the same way (`http.client`, 1 MiB reads, bytes "
            "discarded). Each object is read once, untimed, before the timed reads (SeaweedFS "
            "serves the first read of a fresh object markedly slower), and each round takes the "
            "next of the six orders of the three contenders. SeaweedFS runs with an S3 identity, so it checks every "
            "signature. CPU per GiB is the Synapse process's utime + stime (all threads, "
            "/proc/<pid>/stat) over the 100 MiB and 1 GiB cold reads of each mode, divided by "
            "the GiB those reads delivered; the concurrent downloads are not counted. The "
            f"{concurrent} concurrent downloads read one 100 MiB media {concurrent} times at once (threads in the "
            f"bench process); aggregate = {concurrent * 100} MiB / wall time, median of the rounds. The "
            "machine (2 cores) is shared with other jobs, and the bench client, SeaweedFS and "
            "Synapse share those cores, so absolute figures are noisy: read the ratios. Load "
            "average (1 min) before the cold reads and after each size: "
            + ", ".join(f"{x:.1f}" for x in load) + ".",
        )
    finally:
        for hs in servers.values():
            hs.stop()
        weed.stop()
