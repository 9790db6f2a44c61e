"""B2: cold reads through Synapse from S3: DedupStorageProvider vs synapse-s3-storage-provider 1.7.

Two Synapses side by side on one SeaweedFS, each with its own bucket; the same bytes are
uploaded to both. Before every read the local media store is emptied, so Synapse must
stream the file from its storage provider. A direct boto3 GET of the same object is the
limit. Contenders alternate read by read, starting with a different one each round.
Goals: >= 1.5x synapse-s3-storage-provider on 100 MiB and 1 GiB, >= 1.0x on small files,
>= 70% of the direct download; Synapse's RSS grows by <= 64 MiB while streaming 1 GiB.
Quick mode (CI's smoke run) stops at 100 MiB, read once, and reports the RSS growth there.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.load import median
from bench.media import (
    DEDUP,
    S3SP,
    RssSampler,
    make_file,
    start_provider_contenders,
    timed_download,
    timed_s3_download,
    upload_file,
)
from bench.report import Report
from tests.harness import SeaweedFS, Synapse
from tests.storage_helpers import wipe_local_media

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
DIRECT = "boto3 direct GET (limit)"
LOCAL = "Synapse local disk, no provider"

WHY = (
    "**Why goals are missed** (profiled with `py-spy record --threads` on the Synapse process "
    "during 300 MiB cold reads). *70% of direct, large files*: the direct GET is SeaweedFS (Go) "
    "streaming straight to the client, while everything Synapse serves passes its one Twisted "
    "reactor thread, which sends at most 128 KiB per `send()` (Twisted's "
    "`FileDescriptor.SEND_LIMIT`) and, with the dedup provider, spent over half of its samples "
    "in `send()` and most of the rest in epoll. Synapse serving the same file from its own local "
    "disk, with no provider at all (the local-disk rows), is itself far below the direct GET, "
    "and the dedup provider is close to that ceiling on large files (\"% of local\" in the "
    "ratio), so no provider can come near 70% of the direct GET through Synapse on this "
    "machine. *70% of direct, small files*: a provider's cold read is a Synapse request (about "
    "as long as the direct GET itself, see the local-disk row) followed by an S3 GET with the "
    "same boto3 client as the direct row, so it cannot take less than about twice the direct "
    "time. *1.5x synapse-s3-storage-provider on large files*: that provider already reaches "
    "roughly 60-80% of the same ceiling (it reads 16 KiB at a time on a pool thread and hands "
    "each chunk to the reactor), so 1.5x over it would mean beating Synapse's own local-disk "
    "speed; runs measured between about 1.15x and 1.6x. Before this benchmark the dedup "
    "provider did *not* beat it on large files: the reactor spent about half of its samples "
    "in `hashlib` (the SHA-256 verification), and reading and sending alternated. Both were "
    "fixed in the storage code: each chunk is now hashed on the pool thread next to its read, "
    "and one chunk is read ahead while the previous one is sent (memory stays bounded at two "
    "1 MiB chunks, see the RSS row). *Small files*: the dedup provider adds one index lookup "
    "(a transaction on Synapse's database pool) before its S3 GET, which "
    "synapse-s3-storage-provider does not need (it GETs by path), so small files sit at "
    "parity, 0.9x-1.15x across runs, inside the noise of this shared machine. Objects of up "
    "to 1 MiB are now read and hashed in the same pool call that opens them, which took one "
    "thread hop off each small read (1 KiB: 2.71 -> 2.59 ms median in a 300-read A/B, "
    "synapse-s3-storage-provider 2.44 ms). botocore's CRC32 response validation (its default) "
    "also runs on the dedup provider's reads; it is redundant with the SHA-256 check but cost "
    "under 5% of samples, on the pool thread, so it is left on."
)


def _local_path(media_id: str) -> str:
    return f"local_content/{media_id[0:2]}/{media_id[2:4]}/{media_id[4:]}"


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    # (label, size, rounds, reads per contender per round)
    cases = [
        ("1 KiB", KIB, 2 if quick else 5, 8 if quick else 20),
        ("1 MiB", MIB, 2 if quick else 5, 3 if quick else 10),
        ("100 MiB", 100 * MIB, 1 if quick else 3, 1),
    ]
    if not quick:
        cases.append(("1 GiB", GIB, 2, 1))
    workdir.mkdir(parents=True, exist_ok=True)
    weed = SeaweedFS(workdir / "seaweedfs")
    servers: dict[str, Synapse] = {}
    try:
        weed.start()
        tokens = start_provider_contenders(workdir, weed, "b2", servers)
        client = weed.client()
        order = [DEDUP, S3SP, DIRECT, LOCAL]
        for label, size, rounds, reads in cases:
            source = workdir / "source.bin"
            sha = make_file(source, size)
            ids = {name: upload_file(hs, tokens[name], source) for name, hs in servers.items()}
            source.unlink()
            # Keep a hard link to the dedup server's local copy, to put it back for LOCAL reads.
            local_copy = servers[DEDUP].media_store / _local_path(ids[DEDUP])
            kept = workdir / "kept.bin"
            os.link(local_copy, kept)
            direct_key = _local_path(ids[S3SP])
            verify = size <= MIB  # bigger reads check the length; the bench must not eat the CPU
            times: dict[str, list[float]] = {k: [] for k in order}
            rss: dict[str, list[float]] = {DEDUP: [], S3SP: []}
            for r in range(rounds):
                turn = order[r % len(order):] + order[: r % len(order)]
                for _ in range(reads):
                    for name in turn:
                        if name == DIRECT:
                            seconds, got, digest = timed_s3_download(client, "b2-s3sp", direct_key, verify)
                        elif name == LOCAL:
                            wipe_local_media(servers[DEDUP])
                            local_copy.parent.mkdir(parents=True, exist_ok=True)
                            os.link(kept, local_copy)
                            seconds, got, digest = timed_download(servers[DEDUP], tokens[DEDUP], ids[DEDUP], verify)
                        else:
                            hs = servers[name]
                            wipe_local_media(hs)
                            assert hs.proc is not None
                            with RssSampler(hs.proc.pid) as sampler:
                                seconds, got, digest = timed_download(hs, tokens[name], ids[name], verify)
                            rss[name].append(sampler.growth_mib)
                        assert got == size, (name, label, got)
                        assert not verify or digest == sha, (name, label)
                        times[name].append(seconds)
            kept.unlink()
            med = {k: median(v) for k, v in times.items()}
            ref_goal = 1.5 if size >= 100 * MIB else 1.0

            def figures(name: str, med: dict[str, float] = med, size: int = size,
                        times: dict[str, list[float]] = times) -> dict[str, str]:
                return {
                    "median s": f"{med[name]:.4f}" if size < MIB else f"{med[name]:.3f}",
                    "MiB/s": f"{size / MIB / med[name]:.1f}",
                    "reads": str(len(times[name])),
                }

            report.add("B2", f"cold read {label}", S3SP, goal="reference", **figures(S3SP))
            vs_s3sp = med[S3SP] / med[DEDUP]
            vs_direct = med[DIRECT] / med[DEDUP]
            report.add(
                "B2", f"cold read {label}", DEDUP,
                ratio=f"{vs_s3sp:.2f}x; {vs_direct:.0%} of direct; {med[LOCAL] / med[DEDUP]:.0%} of local",
                goal=f">= {ref_goal}x, >= 70% of direct",
                met=vs_s3sp >= ref_goal and vs_direct >= 0.70,
                **figures(DEDUP),
            )
            report.add("B2", f"cold read {label}", DIRECT, goal="limit", **figures(DIRECT))
            report.add("B2", f"cold read {label}", LOCAL, ratio=f"{med[S3SP] / med[LOCAL]:.2f}x vs s3sp",
                       goal="Synapse's own ceiling", **figures(LOCAL))
            if size == cases[-1][1]:
                for name in (DEDUP, S3SP):
                    growth = max(rss[name])
                    report.add(
                        "B2", f"RSS growth streaming {label}", name,
                        goal="<= 64 MiB" if name == DEDUP else "",
                        met=growth <= 64 if name == DEDUP else None,
                        **{"RSS +MiB": f"{growth:.1f}"},
                    )
        report.note("B2", WHY)
        report.note(
            "B2",
            "Each Synapse read is a cold read: `local_content` etc. are deleted before it, so the "
            "file is streamed from the provider. Reads go through "
            "`/_matrix/client/v1/media/download` with a keep-alive-free `http.client` GET that "
            "reads 1 MiB at a time and discards the bytes (files <= 1 MiB are also SHA-256 "
            "checked, larger ones by length). The direct row is `boto3 get_object` of the "
            "synapse-s3-storage-provider object, read the same way. The local-disk row is "
            "not a contender but Synapse's own ceiling: the dedup server serving the same file "
            "from its local media store (page cache warm, no provider involved). Ratios are "
            "median-time ratios (higher is better for the dedup provider). RSS growth is the "
            "peak VmRSS of the Synapse process (from /proc/<pid>/status, sampled every 10 ms "
            "during the read) minus its VmRSS just before the read; worst of the rounds.",
        )
    finally:
        for hs in servers.values():
            hs.stop()
        weed.stop()
