"""B5: the offline tools' throughput, --jobs 1 against the default, with and without latency.

A Synapse creates its database and is stopped; then local media are written straight
into its media store and `local_media_repository`, as Synapse would have left them
(including the `sha256` column Synapse records): small media (1-32 KiB, one in five
repeating an earlier content) and big ones (8 MiB). A copy of that database is restored
before each migration, and each migration writes into a bucket of its own (deleted
once measured, so that 8 GiB per configuration never pile up).

On bare loopback and through a loopback proxy adding 20 ms of round-trip time in front
of SeaweedFS (`bench/latency_proxy.py`), per network:

- `migrate --jobs 1`, then `migrate` with the backend's default jobs (from the same
  seeded database, into another bucket);
- `scrub --hash` with the default jobs, then with `--jobs 1` (read only, same bucket);
- small media: the rows of a quarter of the media are deleted and `gc --grace 0s
  --apply --jobs 1` runs, then another quarter and `gc` with the default jobs; and the
  issue's baseline, one `DeleteObject` per key on one thread (what `gc` did before it
  batched, without its database work: an upper bound of the former code's rate), on
  throwaway objects of the same sizes;
- small media: the deletion job inside Synapse (`delete_after: 0s`), `delete_jobs: 1`
  against the default, each on its own quarter of the media (the two the `gc` runs
  left);
- big media: a raw parallel S3 read of every object (boto3, as many threads as the
  tool's default jobs, through the same endpoint), the limit `scrub --hash` is
  compared with.

A `--jobs 1` run that would take long (a 10^5-media `migrate` behind the proxy: about
1.5 hours) is stopped after `B5_WINDOW` seconds with SIGINT, as an admin's Ctrl-C
would, and its rate is taken from the run's own progress in the database
(`msc3916_storage_tool_runs`: objects done at its last checkpoint, which the
interrupted run writes as it stops, over the time from the run's start to its stop).

`B5_PARTS=deletion` runs only the deletion job (and the migrate it needs).
Sizes: `B5_SMALL` / `B5_BIG` / `B5_WINDOW` (environment) override the defaults (the
issue's 10^5 small media and 1,000 of 8 MiB; `--quick`: 300 and 8, which every run
finishes within its window).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attr

from bench.latency_proxy import LatencyProxy
from bench.report import Report
from synapse_msc3916.storage.blobstore import blob_name
from synapse_msc3916.storage.index import TOOL_RUNS
from synapse_msc3916.storage.parallel import DEFAULT_JOBS
from tests.harness import REPO_ROOT, SeaweedFS, Synapse
from tests.storage_helpers import provider_entry, s3_config

MIB = 1024 * 1024
RTT = 0.020


@attr.s(auto_attribs=True)
class Measured:
    """One tool run: its objects, seconds and rate; ``stopped`` when the window ended
    it, then the figures are the run's recorded progress, ``summary`` is None."""

    objects: int
    seconds: float
    stopped: bool
    summary: dict[str, Any] | None

    @property
    def rate(self) -> float:
        return self.objects / max(self.seconds, 1e-6)


def _tool(hs: Synapse, window: float | None, *args: str) -> Measured:
    """Run a tool to its end, or for ``window`` seconds at most (then SIGINT)."""
    command = [sys.executable, "-m", "synapse_msc3916.cli", *args, "-c", str(hs.config_path), "--json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=hs.env(), stdout=out, stderr=err)
        stopped = False
        try:
            proc.wait(timeout=window if window is not None else 7200)
        except subprocess.TimeoutExpired:
            if window is None:
                proc.kill()
                raise
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=300)
            stopped = True
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if stopped and stdout.strip().endswith("}"):  # it finished as the window ended
        summary = json.loads(stdout)
        return Measured(0, float(summary["elapsed_seconds"]), False, summary)
    if stopped and proc.returncode == 130:
        (done, started, stopped_ts), = hs.sql(
            f"SELECT done, started_ts, heartbeat_ts FROM {TOOL_RUNS} WHERE tool = ?", (args[0],))
        return Measured(int(done), (int(stopped_ts) - int(started)) / 1000, True, None)
    if proc.returncode != 0:
        raise RuntimeError(f"synapse-msc3916 {args[0]} failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    return Measured(0, float(summary["elapsed_seconds"]), False, summary)


def _create_media(hs: Synapse, count: int, sizes: tuple[int, int], dup_every: int, seed: int,
                  tag: str) -> tuple[list[str], int]:
    """Files in the media store plus their rows; returns the media ids and total bytes."""
    import sqlite3

    rng = random.Random(seed)
    contents: list[Path] = []  # files of distinct contents (10^5 contents in memory: 1.3 GiB)
    ids: list[str] = []
    total = 0
    now = int(time.time() * 1000)
    columns = {row[1] for row in hs.sql("PRAGMA table_info(local_media_repository)")}
    rows = []
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for n in range(count):
        duplicate = bool(contents) and dup_every and n % dup_every == dup_every - 1
        data = rng.choice(contents).read_bytes() if duplicate else rng.randbytes(rng.randint(*sizes))
        media_id = tag + "".join(rng.choices(letters, k=22))
        path = hs.media_store / "local_content" / media_id[0:2] / media_id[2:4] / media_id[4:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if dup_every and not duplicate:
            contents.append(path)
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


def _delete_rows(hs: Synapse, ids: list[str]) -> None:
    """Synapse deleting these media: their rows go (the triggers write tombstones)."""
    for start in range(0, len(ids), 500):
        part = ids[start:start + 500]
        hs.sql(f"DELETE FROM local_media_repository WHERE media_id IN ({', '.join('?' * len(part))})",
               tuple(part))


def _client(weed: SeaweedFS, endpoint: str, jobs: int, crc: bool = True) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=weed.ACCESS_KEY, aws_secret_access_key=weed.SECRET_KEY,
        config=Config(max_pool_connections=jobs,
                      response_checksum_validation="when_supported" if crc else "when_required"),
    )


def _raw_read(endpoint: str, bucket: str, keys: list[str], jobs: int, crc: bool) -> float:
    """MiB/s of reading every object once with ``jobs`` threads: the store's limit.

    In a process of its own, as the tools run: in this one it would share the GIL with
    the latency proxy's event loop. ``crc``: botocore's default CRC32 check of each
    response (``scrub --hash`` skips it)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.b5_tools", "raw-read", endpoint, bucket, str(jobs), str(int(crc))],
        input="\n".join(keys), cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600, check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def _raw_read_here(endpoint: str, bucket: str, keys: list[str], jobs: int, crc: bool) -> float:
    client = _client(SeaweedFS, endpoint, jobs, crc)

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


def _one_key_per_call(weed: SeaweedFS, endpoint: str, bucket: str, count: int, window: float) -> tuple[int, float]:
    """The issue's baseline for ``gc``: one ``DeleteObject`` per key on one thread, on
    ``count`` throwaway 1-32 KiB objects (written beforehand over bare loopback), for at
    most ``window`` seconds. (objects deleted, seconds)."""
    rng = random.Random(7)
    keys = [f"b5-one-by-one/{n:06d}" for n in range(count)]
    setup = _client(weed, weed.endpoint_url, 16)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: setup.put_object(Bucket=bucket, Key=k, Body=rng.randbytes(rng.randint(1024, 32768))),
                      keys))
    client = _client(weed, endpoint, 1)
    start = time.perf_counter()
    done = 0
    for key in keys:
        client.delete_object(Bucket=bucket, Key=key)
        done += 1
        if time.perf_counter() - start >= window:
            break
    seconds = time.perf_counter() - start
    for key in keys[done:]:
        setup.delete_object(Bucket=bucket, Key=key)
    return done, seconds


def _configure(hs: Synapse, weed: SeaweedFS, bucket: str, endpoint: str) -> None:
    weed.create_bucket(bucket)
    config = s3_config(weed, bucket)
    config["endpoint_url"] = endpoint
    hs.config["media_storage_providers"] = [provider_entry(config)]
    hs.write_config()


def _row(report: Report, case: str, contender: str, m: Measured, nbytes: int | None = None,
         **extra: Any) -> None:
    figures = {"objects": f"{m.objects:,}", "seconds": f"{m.seconds:.1f}", "objects/s": f"{m.rate:.0f}",
               "MiB/s": "" if nbytes is None else f"{nbytes / MIB / max(m.seconds, 1e-6):.1f}",
               "run": "stopped after the window" if m.stopped else "complete"}
    report.add("B5", case, contender, **figures, **extra)


def _versus(fast: Measured, slow: Measured, goal: bool) -> dict[str, Any]:
    """The ratio cells of ``fast``'s row against ``slow``, the 10x goal where it applies."""
    ratio = f"{fast.rate / slow.rate:.1f}x --jobs 1" if slow.rate else "(--jobs 1: no object done)"
    return {"ratio": ratio, "goal": ">= 10x --jobs 1" if goal else "",
            "met": (fast.rate >= 10 * slow.rate) if goal else None}


def _weed_delete_bucket(weed: SeaweedFS, bucket: str) -> None:
    """SeaweedFS drops a bucket with its objects (its collection's volumes): in one call
    that, for the 10^5 objects of a full run on a loaded machine, takes longer than the
    harness client's default 10 s read timeout (a full run once crashed there, its rows
    lost)."""
    weed.client(read_timeout=900).delete_bucket(Bucket=bucket)


def _deletion_job(report: Report, hs: Synapse, weed: SeaweedFS, bucket: str, endpoint: str, net: str,
                  quarters: tuple[list[str], list[str]]) -> None:
    """The deletion job inside Synapse, ``delete_jobs: 1`` against the default.

    On the bucket and database the tools just used: for each contender the rows of its
    own quarter of the media are deleted with Synapse stopped (the triggers turn them
    into tombstones), then Synapse starts with ``delete_after: 0s`` and the endpoint
    under test, and is waited for until the job deleted every due object. The rate is
    objects over the seconds the job's log lines say its ticks spent deleting (the
    tick's start, up to 5 s after Synapse's, and the tombstones' application are left
    out).
    """
    import re

    default = DEFAULT_JOBS["s3"]
    base = 0.0
    for jobs, gone_ids in zip((1, default), quarters, strict=True):
        gone = set(gone_ids)
        rows = hs.sql("SELECT media_id, sha256 FROM local_media_repository")
        due = len({sha for m, sha in rows if m in gone} - {sha for m, sha in rows if m not in gone})
        _delete_rows(hs, gone_ids)
        config = s3_config(weed, bucket, delete_after="0s", delete_jobs=jobs)
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
        m = Measured(due, seconds, False, None)
        extra: dict[str, Any] = {}
        if jobs == 1:
            base = m.rate
        else:
            extra["ratio"] = f"{m.rate / max(base, 1e-6):.1f}x delete_jobs 1"
        report.add("B5", f"deletion job, small, {net}", f"delete_jobs: {jobs}",
                   **{"objects": f"{due:,}", "seconds": f"{seconds:.2f}", "objects/s": f"{m.rate:.0f}"},
                   **extra)


def _legacy_copy(report: Report, hs: Synapse, weed: SeaweedFS, networks: dict[str, str],
                 empty: Path, small: int, big: int) -> None:
    """`migrate --from-legacy-prefix`, default jobs: server-side copy (CopyObject, then a
    read-back, as SeaweedFS returns no SHA-256 for a copy) against download + upload
    (`--no-server-side-copy`), side by side, each run on its own bucket holding the same
    synapse-s3-storage-provider objects under `legacy/`. At sizes of its own
    (`B5_LEGACY_SMALL` / `B5_LEGACY_BIG`): every contender first uploads its legacy
    objects."""
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=weed.endpoint_url, region_name="us-east-1",
        aws_access_key_id=weed.ACCESS_KEY, aws_secret_access_key=weed.SECRET_KEY,
    )
    db = hs.dir / "homeserver.db"
    for kind, count, sizes, dup in (("small", small, (1024, 32 * 1024), 5),
                                    ("8 MiB", big, (8 * MIB, 8 * MIB), 0)):
        shutil.copy(empty, db)
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
                m = _tool(hs, None, "migrate", "--from-legacy-prefix", *flags)
                data = m.summary
                assert data is not None and data["files"] == count, data
                assert data["legacy_deleted"] == count, data
                # (duplicates migrated at the same moment are downloaded: a copy is made
                # only where nobody else stores the content)
                assert (data["copied_server_side"] > 0) != bool(flags), data
                m.objects = count
                ratio = ""
                if flags:
                    base[net] = m.rate
                else:
                    ratio = f"{m.rate / base[net]:.1f}x download + upload"
                _row(report, f"migrate --from-legacy-prefix, {kind}, {net}", contender, m, total,
                     ratio=ratio)
                _weed_delete_bucket(weed, bucket)
        shutil.rmtree(hs.media_store / "local_content", ignore_errors=True)
        report.note("B5", f"legacy prefix, {kind}: {count:,} media, {total / MIB:,.0f} MiB.")


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    small = int(os.environ.get("B5_SMALL", 300 if quick else 100_000))
    big = int(os.environ.get("B5_BIG", 8 if quick else 1000))
    window = float(os.environ.get("B5_WINDOW", 60))
    # B5_PARTS=deletion: only the deletion job (after the default-jobs migrate it needs).
    tools = "tools" in os.environ.get("B5_PARTS", "tools,deletion").split(",")
    deletion = "deletion" in os.environ.get("B5_PARTS", "tools,deletion").split(",")
    one_by_one = 200 if quick else 2000
    default = DEFAULT_JOBS["s3"]
    report.note("B5", f"Load average at the start: {os.getloadavg()[0]:.1f} (2 shared cores).")
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
        j1, jd = ("--jobs", "1"), ("--jobs", str(default))

        for kind, count, sizes, dup in (
            ("small", small, (1024, 32 * 1024), 5),
            ("8 MiB", big, (8 * MIB, 8 * MIB), 0),
        )[:2 if tools else 1]:
            k = "s" if kind == "small" else "b"
            shutil.copy(empty, db)
            shutil.rmtree(media_store / "local_content", ignore_errors=True)
            seeded = time.perf_counter()
            ids, total = _create_media(hs, count, sizes, dup, 5, k)
            print(f"   B5 {kind}: {count:,} media seeded in {time.perf_counter() - seeded:.0f}s", flush=True)
            ready = hs.dir / f"{k}.db"
            shutil.copy(db, ready)
            for net, endpoint in networks.items():
                n = "l" if net == "loopback" else "p"
                label = f"{kind}, {net}"
                # migrate: --jobs 1 into a bucket of its own, then the default jobs.
                m1 = Measured(0, 0.0, False, None)
                if tools:
                    shutil.copy(ready, db)
                    _configure(hs, weed, f"b5-{k}-{n}-1", endpoint)
                    m1 = _tool(hs, window, "migrate", "--min-age", "0s", *j1)
                    _weed_delete_bucket(weed, f"b5-{k}-{n}-1")
                shutil.copy(ready, db)
                bucket = f"b5-{k}-{n}"
                _configure(hs, weed, bucket, endpoint)
                md = _tool(hs, None, "migrate", "--min-age", "0s", *jd)
                assert md.summary is not None and md.summary["files"] == count, md.summary
                md.objects = count
                if not tools:
                    _deletion_job(report, hs, weed, bucket, endpoint, net, (ids[1::4], ids[3::4]))
                    _weed_delete_bucket(weed, bucket)
                    continue
                if m1.summary is not None:
                    m1.objects = int(m1.summary["files"])
                avg = total / count
                _row(report, f"migrate, {label}", "--jobs 1", m1, int(m1.objects * avg))
                _row(report, f"migrate, {label}", f"--jobs {default}", md, total,
                     **_versus(md, m1, kind == "small" and net != "loopback"))
                # scrub --hash: read only, both on the same bucket.
                sd = _tool(hs, None, "scrub", "--hash", *jd)
                assert sd.summary is not None and sd.summary["still_broken"] == 0, sd.summary
                sd.objects = int(sd.summary["checked"])
                s1 = _tool(hs, window, "scrub", "--hash", "--restart", *j1)
                if s1.summary is not None:
                    s1.objects = int(s1.summary["checked"])
                size = None if kind == "small" else 8 * MIB
                _row(report, f"scrub --hash, {label}", "--jobs 1", s1, size and s1.objects * size)
                _row(report, f"scrub --hash, {label}", f"--jobs {default}", sd, size and sd.objects * size,
                     **_versus(sd, s1, kind == "small" and net != "loopback"))
                if kind != "small":
                    keys = [blob_name(str(r[0])) for r in hs.sql(
                        "SELECT DISTINCT sha256 FROM local_media_repository")]
                    scrub_mib = sd.objects * 8 / sd.seconds
                    for crc in (True, False):
                        raw = _raw_read(endpoint, bucket, keys, default, crc)
                        what = "" if crc else ", no CRC32 check"
                        report.add("B5", f"scrub --hash, {label}", f"raw parallel S3 read ({default} threads{what})",
                                   **{"objects": f"{len(keys):,}", "MiB/s": f"{raw:.1f}"})
                        report.add("B5", f"scrub --hash, {label}", f"--jobs {default} vs raw read{what}",
                                   ratio=f"{scrub_mib / raw:.0%} of raw", goal=">= 80% of raw" if crc else "",
                                   met=scrub_mib >= 0.8 * raw if crc else None)
                else:
                    # gc: a quarter of the media deleted for each contender.
                    _delete_rows(hs, ids[0::4])
                    g1 = _tool(hs, window, "gc", "--grace", "0s", "--apply", *j1)
                    _delete_rows(hs, ids[2::4])
                    gd = _tool(hs, None, "gc", "--grace", "0s", "--apply", "--restart", *jd)
                    for g in (g1, gd):
                        if g.summary is not None:
                            g.objects = g.summary["objects_deleted"] + g.summary["orphan_objects_deleted"]
                    done, seconds = _one_key_per_call(weed, endpoint, bucket, one_by_one, window / 3)
                    gb = Measured(done, seconds, done < one_by_one, None)
                    case = f"gc --apply, {label}"
                    _row(report, case, "one DeleteObject per key, 1 thread (no DB work)", gb)
                    _row(report, case, "--jobs 1", g1)
                    _row(report, case, f"--jobs {default}", gd, **_versus(gd, g1, net != "loopback"))
                    report.add("B5", case, f"--jobs {default} vs one DeleteObject per key",
                               ratio=f"{gd.rate / max(gb.rate, 1e-6):.1f}x")
                    if deletion:  # the other two quarters of the media
                        _deletion_job(report, hs, weed, bucket, endpoint, net, (ids[1::4], ids[3::4]))
                _weed_delete_bucket(weed, bucket)
            report.note(
                "B5",
                f"{kind}: {count:,} media, {total / MIB:,.0f} MiB"
                + (", one in five a duplicate of an earlier content." if dup else "."),
            )
            shutil.rmtree(media_store / "local_content", ignore_errors=True)
        if tools:
            _legacy_copy(report, hs, weed, networks, empty,
                         int(os.environ.get("B5_LEGACY_SMALL", 300 if quick else 5000)),
                         int(os.environ.get("B5_LEGACY_BIG", 8 if quick else 50)))
        report.note(
            "B5",
            "Rates: objects / `elapsed_seconds` of the tool's `--json` summary (the work, "
            "without the Python start-up); for a run stopped after the window "
            f"({window:.0f} s), objects done at its last checkpoint / time from the run's "
            "start to its stop, both recorded by the run in `msc3916_storage_tool_runs`. "
            "`gc` objects = objects deleted (DeleteObjects, up to 1,000 keys a call); each "
            "`gc` contender collects the media of its own quarter of the rows. "
            f"Default jobs = {default} (S3). The proxy delays every chunk by 10 ms each way "
            "(20 ms round trip), as a real S3 region does per request.",
        )
        report.note("B5", f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    finally:
        if proxy is not None:
            proxy.stop()
        hs.stop()
        weed.stop()


if __name__ == "__main__":  # python -m bench.b5_tools raw-read ENDPOINT BUCKET JOBS CRC < keys
    _endpoint, _bucket, _jobs, _crc = sys.argv[2:6]
    print(_raw_read_here(_endpoint, _bucket, sys.stdin.read().split(), int(_jobs), _crc == "1"))
