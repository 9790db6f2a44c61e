"""B5: the offline tools' throughput, --jobs 1 against the default, with and without latency.

A Synapse creates its database and is stopped; then local media are written straight
into its media store and `local_media_repository`, as Synapse would have left them
(including the `sha256` column Synapse records): small media (1-32 KiB, one in five
repeating an earlier content) and big ones (8 MiB). A copy of that database is restored
before each configuration, and each configuration writes into a bucket of its own.

Each configuration runs `migrate`, `scrub --hash` and (small media) `gc --grace 0s
--apply` after deleting the rows of half the media, with `--jobs 1` and with the
backend's default, on bare loopback and through a loopback proxy adding 20 ms of
round-trip time in front of SeaweedFS (`bench/latency_proxy.py`). For the big media a
raw parallel S3 read of every object (boto3, as many threads as the tool's default
jobs, through the same endpoint) is the limit `scrub --hash` is compared with.

Sizes: `B5_SMALL` / `B5_BIG` (environment) override the defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.latency_proxy import LatencyProxy
from bench.report import Report
from synapse_msc3916.storage.blobstore import blob_name
from synapse_msc3916.storage.parallel import DEFAULT_JOBS
from tests.harness import REPO_ROOT, SeaweedFS, Synapse
from tests.storage_helpers import provider_entry, s3_config

MIB = 1024 * 1024
RTT = 0.020


def _tool(hs: Synapse, *args: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "synapse_msc3916.cli", *args, "-c", str(hs.config_path), "--json"],
        cwd=REPO_ROOT, env=hs.env(), capture_output=True, text=True, timeout=7200,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"synapse-msc3916 {args[0]} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)


def _create_media(hs: Synapse, count: int, sizes: tuple[int, int], dup_every: int, seed: int,
                  tag: str) -> tuple[list[str], int]:
    """Files in the media store plus their rows; returns the media ids and total bytes."""
    import sqlite3

    rng = random.Random(seed)
    contents: list[bytes] = []
    ids: list[str] = []
    total = 0
    now = int(time.time() * 1000)
    columns = {row[1] for row in hs.sql("PRAGMA table_info(local_media_repository)")}
    rows = []
    for n in range(count):
        if contents and dup_every and n % dup_every == dup_every - 1:
            data = rng.choice(contents)
        else:
            data = rng.randbytes(rng.randint(*sizes))
            if dup_every:
                contents.append(data)
        media_id = tag + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(22))
        path = hs.media_store / "local_content" / media_id[0:2] / media_id[2:4] / media_id[4:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        row = {
            "media_id": media_id, "media_type": "application/octet-stream", "media_length": len(data),
            "created_ts": now, "upload_name": f"f{n}.bin", "user_id": f"@bench:{hs.server_name}",
            "last_access_ts": now, "sha256": hashlib.sha256(data).hexdigest(), "authenticated": True,
        }
        rows.append({k: v for k, v in row.items() if k in columns})
        ids.append(media_id)
        total += len(data)
    conn = sqlite3.connect(hs.dir / "homeserver.db")
    try:
        keys = list(rows[0])
        conn.executemany(
            f"INSERT INTO local_media_repository ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
            [tuple(r[k] for k in keys) for r in rows],
        )
        conn.commit()
    finally:
        conn.close()
    return ids, total


def _raw_read(weed: SeaweedFS, endpoint: str, bucket: str, keys: list[str], jobs: int) -> float:
    """MiB/s of reading every object once with ``jobs`` threads: the store's limit."""
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=weed.ACCESS_KEY, aws_secret_access_key=weed.SECRET_KEY,
        config=Config(max_pool_connections=jobs),
    )

    def read(key: str) -> int:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        n = 0
        while chunk := body.read(1 << 20):
            n += len(chunk)
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        total = sum(pool.map(read, keys))
    return total / MIB / (time.perf_counter() - start)


def _rate(report: dict[str, Any], count: int) -> float:
    return count / max(float(report["elapsed_seconds"]), 1e-6)


def _deletion_job(report: Report, hs: Synapse, weed: SeaweedFS, networks: dict[str, str],
                  ready: Path, ids: list[str]) -> None:
    """The deletion job inside Synapse, ``delete_jobs: 1`` against the default.

    For each case: the small media migrated into a bucket of their own (setup, straight
    to SeaweedFS), the rows of half the media deleted with Synapse stopped (the triggers
    turn them into tombstones), then Synapse started with ``delete_after: 0s`` and the
    endpoint under test; waited for until the job deleted every due object. The rate is
    objects over the seconds the job's log lines say its ticks spent deleting (the tick's
    start, up to 5 s after Synapse's, and the tombstones' application are left out).
    """
    import re

    default = DEFAULT_JOBS["s3"]
    db = hs.dir / "homeserver.db"
    gone = set(ids[::2])
    base: dict[str, float] = {}
    for net, endpoint in networks.items():
        for jobs in (1, default):
            shutil.copy(ready, db)
            rows = hs.sql("SELECT media_id, sha256 FROM local_media_repository")
            due = len({sha for m, sha in rows if m in gone} - {sha for m, sha in rows if m not in gone})
            bucket = f"b5-d-{'l' if net == 'loopback' else 'p'}-{jobs}"
            weed.create_bucket(bucket)
            config = s3_config(weed, bucket, delete_after="0s", delete_jobs=jobs)
            hs.config["media_storage_providers"] = [provider_entry(config)]
            hs.write_config()
            _s, migrated = _tool(hs, "migrate", "--min-age", "0s")
            assert migrated["files"] == len(ids), migrated
            part = sorted(gone)
            for start in range(0, len(part), 500):
                chunk = part[start:start + 500]
                hs.sql(f"DELETE FROM local_media_repository WHERE media_id IN ({', '.join('?' * len(chunk))})",
                       tuple(chunk))
            config["endpoint_url"] = endpoint
            hs.config["media_storage_providers"] = [provider_entry(config)]
            hs.write_config()
            offset = hs.log_file.stat().st_size if hs.log_file.exists() else 0
            hs.start()
            try:
                deadline = time.monotonic() + 1800
                deleted, seconds = 0, 0.0
                while deleted < due:  # the ticks' log lines, once every due object is gone
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"deletion job: {deleted} of {due} objects deleted")
                    time.sleep(0.5)
                    with open(hs.log_file, "rb") as f:
                        f.seek(offset)
                        lines = re.findall(rb"deleted (\d+) object\(s\) in ([\d.]+)s", f.read())
                    deleted = sum(int(n) for n, _ in lines)
                    seconds = sum(float(t) for n, t in lines if int(n))
            finally:
                hs.stop()
            assert deleted == due, (deleted, due)
            assert len(weed.list_keys(bucket)) == len({sha for _m, sha in rows}) - due
            rate = due / max(seconds, 1e-6)
            ratio = ""
            if jobs == 1:
                base[net] = rate
            else:
                ratio = f"{rate / base[net]:.1f}x delete_jobs 1"
            report.add(
                "B5", f"deletion job, small, {net}", f"delete_jobs: {jobs}", ratio=ratio,
                **{"objects": f"{due:,}", "seconds": f"{seconds:.2f}", "objects/s": f"{rate:.0f}"},
            )
    report.note(
        "B5",
        "Deletion job: a real Synapse (`delete_after: 0s`) deletes the objects of the half of the "
        "small media whose rows were deleted; objects/s over the seconds its ticks spent deleting "
        "(their log lines), batches of up to 100 keys per DeleteObjects call, `delete_jobs` of "
        "them at once. `delete_jobs: 1` already batches, so the 10x goal of the tools' `--jobs 1` "
        "applies to the job before batches: one DeleteObject call and two transactions per object "
        "(about 3 round trips, 20-40 objects/s behind 20 ms).",
    )


def _legacy_copy(report: Report, hs: Synapse, weed: SeaweedFS, networks: dict[str, str],
                 small: int, big: int) -> None:
    """`migrate --from-legacy-prefix`, default jobs: server-side copy (CopyObject, then a
    read-back, as SeaweedFS returns no SHA-256 for a copy) against download + upload
    (`--no-server-side-copy`), side by side, each run on its own bucket holding the same
    synapse-s3-storage-provider objects under `legacy/`."""
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=weed.endpoint_url, region_name="us-east-1",
        aws_access_key_id=weed.ACCESS_KEY, aws_secret_access_key=weed.SECRET_KEY,
    )
    db, empty = hs.dir / "homeserver.db", hs.dir / "legacy-empty.db"
    shutil.copy(db, empty)
    for kind, count, sizes, dup in (("small", small, (1024, 32 * 1024), 5),
                                    ("8 MiB", big, (8 * MIB, 8 * MIB), 0)):
        shutil.copy(empty, db)
        hs.sql("DELETE FROM local_media_repository")
        shutil.rmtree(hs.media_store / "local_content", ignore_errors=True)
        ids, total = _create_media(hs, count, sizes, dup, 7, "l")
        ready = hs.dir / "legacy-ready.db"
        shutil.copy(db, ready)
        paths = [f"local_content/{i[0:2]}/{i[2:4]}/{i[4:]}" for i in ids]
        base: dict[str, float] = {}
        for net, endpoint in networks.items():
            for contender, flags in (("download + upload", ["--no-server-side-copy"]),
                                     ("server-side copy", [])):
                shutil.copy(ready, db)
                bucket = f"b5-legacy-{'s' if kind == 'small' else 'b'}-{'l' if net == 'loopback' else 'p'}-{len(flags)}"
                weed.create_bucket(bucket)
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(lambda p, b=bucket: client.put_object(
                        Bucket=b, Key="legacy/" + p,
                        Body=(hs.media_store / p).read_bytes()), paths))
                config = s3_config(weed, bucket, prefix="blobs/", legacy_prefix="legacy/")
                config["endpoint_url"] = endpoint
                hs.config["media_storage_providers"] = [provider_entry(config)]
                hs.write_config()
                _s, data = _tool(hs, "migrate", "--from-legacy-prefix", *flags)
                assert data["files"] == count and data["legacy_deleted"] == count, data
                # (duplicates migrated at the same moment are downloaded: a copy is made
                # only where nobody else stores the content)
                assert (data["copied_server_side"] > 0) != bool(flags), data
                rate = _rate(data, count)
                ratio = ""
                if flags:
                    base[net] = rate
                else:
                    ratio = f"{rate / base[net]:.1f}x download + upload"
                seconds = float(data["elapsed_seconds"])
                report.add(
                    "B5", f"migrate --from-legacy-prefix, {kind}, {net}", contender, ratio=ratio,
                    **{"objects": f"{count:,}", "seconds": f"{seconds:.1f}",
                       "objects/s": f"{rate:.0f}", "MiB/s": f"{total / MIB / seconds:.1f}"},
                )


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    small = int(os.environ.get("B5_SMALL", 300 if quick else 5000))
    big = int(os.environ.get("B5_BIG", 8 if quick else 50))
    default = DEFAULT_JOBS["s3"]
    workdir.mkdir(parents=True, exist_ok=True)
    weed = SeaweedFS(workdir / "seaweedfs")
    hs = Synapse(workdir / "hs", storage_providers=[provider_entry(s3_config(weed, "b5-setup"))])
    proxy: LatencyProxy | None = None
    try:
        weed.start()
        weed.create_bucket("b5-setup")
        hs.start()
        hs.stop()  # the database exists now; the tools run against it with Synapse stopped
        port = int(weed.endpoint_url.rsplit(":", 1)[1])
        proxy = LatencyProxy("127.0.0.1", port, RTT).start()
        networks = {"loopback": weed.endpoint_url, "20 ms RTT": f"http://127.0.0.1:{proxy.port}"}
        db = hs.dir / "homeserver.db"
        empty = hs.dir / "empty.db"
        shutil.copy(db, empty)
        media_store = hs.media_store

        for kind, count, sizes, dup in (
            ("small", small, (1024, 32 * 1024), 5),
            ("8 MiB", big, (8 * MIB, 8 * MIB), 0),
        ):
            shutil.copy(empty, db)
            shutil.rmtree(media_store / "local_content", ignore_errors=True)
            ids, total = _create_media(hs, count, sizes, dup, 5, "s" if kind == "small" else "b")
            ready = hs.dir / f"{kind[0]}.db"
            shutil.copy(db, ready)
            base: dict[tuple[str, str], float] = {}
            for net, endpoint in networks.items():
                for jobs in (1, default):
                    shutil.copy(ready, db)
                    bucket = f"b5-{'s' if kind == 'small' else 'b'}-{'l' if net == 'loopback' else 'p'}-{jobs}"
                    weed.create_bucket(bucket)
                    config = s3_config(weed, bucket)
                    config["endpoint_url"] = endpoint
                    hs.config["media_storage_providers"] = [provider_entry(config)]
                    hs.write_config()
                    label = f"{kind}, {net}"
                    j = ["--jobs", str(jobs)]
                    _s, migrated = _tool(hs, "migrate", "--min-age", "0s", *j)
                    assert migrated["files"] == count, migrated
                    _s, scrubbed = _tool(hs, "scrub", "--hash", *j)
                    assert scrubbed["still_broken"] == 0, scrubbed
                    objects = scrubbed["checked"]
                    cases = [("migrate", migrated, count, total),
                             ("scrub --hash", scrubbed, objects, None)]
                    if kind == "small":
                        gone = ids[::2]
                        for start in range(0, len(gone), 500):
                            part = gone[start:start + 500]
                            hs.sql(f"DELETE FROM local_media_repository WHERE media_id IN"
                                   f" ({', '.join('?' * len(part))})", tuple(part))
                        _s, collected = _tool(hs, "gc", "--grace", "0s", "--apply", *j)
                        deleted = collected["objects_deleted"] + collected["orphan_objects_deleted"]
                        cases.append(("gc --apply", collected, deleted, collected["bytes_freed"]))
                    for tool, data, n, nbytes in cases:
                        rate = _rate(data, n)
                        key = (tool, net)
                        ratio, goal, met = "", "", None
                        if jobs == 1:
                            base[key] = rate
                        else:
                            ratio = f"{rate / base[key]:.1f}x --jobs 1"
                            if kind == "small" and net != "loopback":
                                goal, met = ">= 10x --jobs 1", rate >= 10 * base[key]
                        mib = "" if nbytes is None else f"{nbytes / MIB / float(data['elapsed_seconds']):.1f}"
                        if tool == "scrub --hash" and kind != "small":
                            mib = f"{count * 8 / float(data['elapsed_seconds']):.1f}"
                        report.add(
                            "B5", f"{tool}, {label}", f"--jobs {jobs}", ratio=ratio, goal=goal,
                            met=met, **{"objects": f"{n:,}", "seconds": f"{float(data['elapsed_seconds']):.1f}",
                                        "objects/s": f"{rate:.0f}", "MiB/s": mib},
                        )
                        if kind != "small" and tool == "scrub --hash" and jobs == default:
                            keys = [blob_name(str(r[0])) for r in hs.sql(
                                "SELECT DISTINCT sha256 FROM local_media_repository")]
                            raw = _raw_read(weed, endpoint, bucket, keys, default)
                            scrub_mib = count * 8 / float(data["elapsed_seconds"])
                            report.add(
                                "B5", f"{tool}, {label}", f"raw parallel S3 read ({default} threads)",
                                **{"objects": f"{len(keys):,}", "MiB/s": f"{raw:.1f}"},
                            )
                            report.add(
                                "B5", f"{tool}, {label}", f"--jobs {jobs} vs raw read",
                                ratio=f"{scrub_mib / raw:.0%} of raw", goal=">= 80% of raw",
                                met=scrub_mib >= 0.8 * raw,
                            )
            if kind == "small":
                _deletion_job(report, hs, weed, networks, ready, ids)
            report.note(
                "B5",
                f"{kind}: {count:,} media, {total / MIB:.0f} MiB"
                + (", one in five a duplicate of an earlier content." if dup else "."),
            )
        _legacy_copy(report, hs, weed, networks, small, big)
        report.note(
            "B5",
            "Rates are the tool's own `objects_per_second` basis: objects / `elapsed_seconds` of "
            "the `--json` summary (the work, without the Python start-up). `gc` objects = objects "
            "deleted (DeleteObjects, up to 1,000 keys a call, chunks shared by the workers). "
            f"Default jobs = {default} (S3). The proxy delays every chunk by 10 ms each way "
            "(20 ms round trip), as a real S3 region does per request.",
        )
    finally:
        if proxy is not None:
            proxy.stop()
        hs.stop()
        weed.stop()
