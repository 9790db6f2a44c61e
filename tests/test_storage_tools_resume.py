"""The parallel tools killed with SIGKILL half-way, restarted, and run twice at once.

Each tool is killed at a chosen moment by its own test hook (``MSC3916_TEST_KILL_AT=k``:
the process SIGKILLs itself at the k-th ``parallel.kill_point()``, which sit between the
steps whose interruption matters: after a claim or a mark, after an object write or a
batch delete, before a legacy source is deleted), at three seeded points one after the
other, then run to the end. Between kills the safety properties are checked on the
real bucket and database: no source deleted without a verified copy, no object deleted
that a path still names; at the end every acknowledged media reads back byte-identical
through Synapse. Real Synapse (SQLite, or PostgreSQL in the workers topology), real
SeaweedFS.

How they failed before this work (run against the unchanged code): the migrate and
scrub/gc tests with ``synapse-msc3916: error: unrecognized arguments: --jobs 4`` (and,
without that option, ``assert 0 >= 2``: no run could be interrupted at a chosen point,
a killed run started over from the first object), the third with ``AttributeError:
module 'synapse_msc3916.storage.index' has no attribute 'TOOL_RUNS'`` (no record of a
run, so nothing to refuse a second run with; ``--max-rate`` did not exist either).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse, request
from tests.storage_helpers import (
    download,
    provider_entry,
    run_tool,
    s3_config,
    s3_legacy_entry,
    sha,
    wipe_local_media,
)

SEEDS = (1, 2, 3)


def tool(hs: Synapse, *args: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**hs.env(), "MSC3916_CHECKPOINT_SECONDS": "0"}
    if kill_at:
        env["MSC3916_TEST_KILL_AT"] = str(kill_at)
    return subprocess.run(
        [sys.executable, "-m", "synapse_msc3916", *args, "-c", str(hs.config_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


def object_bytes(seaweedfs: SeaweedFS, bucket: str, key: str) -> bytes | None:
    client = seaweedfs.client()
    try:
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return None


def local_path(media_id: str) -> str:
    return f"local_content/{media_id[0:2]}/{media_id[2:4]}/{media_id[4:]}"


def test_migrate_killed_at_random_points_resumes_and_never_loses_a_source(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "resume-migrate"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[s3_legacy_entry(seaweedfs, bucket, "legacy/")])
    hs.start()
    token = hs.register("alice")
    rng = random.Random(20)
    contents = [rng.randbytes(rng.randint(1000, 20_000)) for _ in range(12)]
    media = {hs.upload(token, data): data for data in contents + contents[:4]}  # 4 duplicates
    hs.stop()
    hs.config["media_storage_providers"] = [
        provider_entry(s3_config(seaweedfs, bucket, prefix="blobs/", legacy_prefix="legacy/"))
    ]
    hs.write_config()
    wipe_local_media(hs)
    hs.start()

    def check_no_source_lost() -> None:
        left = set(seaweedfs.list_keys(bucket, "legacy/"))
        for media_id, data in media.items():
            if "legacy/" + local_path(media_id) in left:
                continue
            # Source gone: its copy must be there, whole, and indexed.
            assert object_bytes(seaweedfs, bucket, "blobs/" + blob_name(sha(data))) == data
            assert hs.sql(
                f"SELECT sha256 FROM {index.PATHS} WHERE path = ?", (local_path(media_id),)
            ) == [(sha(data),)]

    kills, stderr = 0, ""
    for seed in SEEDS:
        # Paced: server-side copies are so quick that four workers reached the kill
        # point before the coordinating thread had checkpointed the first object done
        # (no run then resumed: every kill landed before any checkpoint).
        result = tool(hs, "migrate", "--from-legacy-prefix", "--jobs", "4", "--json",
                      "--max-rate", "50", kill_at=random.Random(seed).randint(12, 24))
        kills += killed(result)
        stderr += result.stderr
        assert killed(result) or result.returncode == 0, result.stderr
        check_no_source_lost()
    assert kills >= 2  # the hook really interrupted runs

    final = tool(hs, "migrate", "--from-legacy-prefix", "--json")
    assert final.returncode == 0, final.stderr
    # A restarted run went on after the cursor of the killed one (before: every run
    # started from the first object).
    assert "migrate: resuming an interrupted run after legacy" not in stderr  # names, not keys
    assert "migrate: resuming an interrupted run after local_content/" in stderr + final.stderr
    check_no_source_lost()
    assert seaweedfs.list_keys(bucket, "legacy/") == []
    wipe_local_media(hs)
    for media_id, data in media.items():
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == data, media_id
    # One object per content, nothing more.
    assert sorted(seaweedfs.list_keys(bucket, "blobs/")) == sorted(
        "blobs/" + blob_name(sha(d)) for d in contents
    )


def test_scrub_repair_and_gc_apply_killed_at_random_points_lose_nothing(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "resume-scrub-gc"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after=None))]
    ).start()
    admin = hs.register("admin", admin=True)
    rng = random.Random(7)
    contents = [rng.randbytes(rng.randint(1000, 20_000)) for _ in range(20)]
    media = {hs.upload(admin, data): data for data in contents + contents[:4]}
    client = seaweedfs.client()

    # scrub --repair: a third of the objects lost, a third truncated; the media store
    # still has every file, so all can be repaired.
    broken = contents[:14]
    for n, data in enumerate(broken):
        if n % 2:
            client.delete_object(Bucket=bucket, Key=blob_name(sha(data)))
        else:
            client.put_object(Bucket=bucket, Key=blob_name(sha(data)), Body=data[:-10])
    kills = 0
    for seed in SEEDS:
        result = tool(hs, "scrub", "--hash", "--repair", "--jobs", "4", "--json",
                      kill_at=random.Random(seed).randint(1, 12))
        kills += killed(result)
    assert kills >= 2
    final = tool(hs, "scrub", "--hash", "--repair", "--json")
    assert final.returncode == 0, final.stderr
    report = json.loads(final.stdout)
    assert report["checked"] == len(contents) and report["still_broken"] == 0, report
    assert tool(hs, "scrub", "--hash").returncode == 0  # a fresh run agrees
    for data in contents:
        assert object_bytes(seaweedfs, bucket, blob_name(sha(data))) == data

    # gc --apply: half of the media deleted by an admin (their contents unshared).
    gone = {m: d for m, d in media.items() if contents.index(d) >= 12}
    kept = {m: d for m, d in media.items() if m not in gone}
    for media_id in gone:
        resp = request("DELETE", hs.base_url,
                       f"/_synapse/admin/v1/media/{hs.server_name}/{media_id}",
                       {"Authorization": f"Bearer {admin}"})
        assert resp.status == 200, resp

    def check_named_objects_exist() -> None:
        for (path_sha,) in hs.sql(f"SELECT DISTINCT sha256 FROM {index.PATHS}"):
            assert blob_name(path_sha) in keys(), path_sha

    def keys() -> set[str]:
        return set(seaweedfs.list_keys(bucket))

    kills = 0
    for seed in SEEDS:
        # Each chunk passes two kill points (marked, deleted), so a run that finds any
        # candidate is killed at point 1 or 2: after marking, or after a delete.
        result = tool(hs, "gc", "--grace", "0s", "--apply", "--jobs", "4", "--json",
                      kill_at=random.Random(seed).randint(1, 2))
        kills += killed(result)
        assert killed(result) or result.returncode == 0, result.stderr
        check_named_objects_exist()
        # The restart comes after the killed run's marks went stale (DELETING_STALE_MS),
        # as a real one would: its marked objects are candidates again, so every seeded
        # run has work (without this, whether a run found any depended on timing).
        hs.sql(
            f"UPDATE {index.BLOBS} SET deleting_ts = deleting_ts - ? WHERE deleting_ts IS NOT NULL",
            (index.DELETING_STALE_MS + 1000,),
        )
    assert kills == len(SEEDS)
    final = tool(hs, "gc", "--grace", "0s", "--apply", "--json")
    assert final.returncode == 0, final.stderr
    check_named_objects_exist()
    # What a killed run had marked but not deleted stays until its mark is stale
    # (index.DELETING_STALE_MS); everything else unreferenced is gone.
    marked = {r[0] for r in hs.sql(
        f"SELECT sha256 FROM {index.BLOBS} WHERE deleting_ts IS NOT NULL")}
    left = {blob_name(sha(d)) for d in gone.values()} & keys()
    assert left <= {blob_name(s) for s in marked}
    assert len(left) < len(set(gone.values()))
    wipe_local_media(hs)
    for media_id, data in kept.items():
        resp = download(hs, admin, media_id)
        assert resp.status == 200 and resp.body == data, media_id


def _insert_blobs(hs: Synapse, seaweedfs: SeaweedFS, bucket: str, count: int) -> None:
    """``count`` small objects and their blob rows, written directly (fast)."""
    client = seaweedfs.client()
    now = int(time.time() * 1000)
    rows = []
    for n in range(count):
        data = b"%d" % n
        client.put_object(Bucket=bucket, Key=blob_name(sha(data)), Body=data)
        rows.append((sha(data), len(data), now, now))
    for row in rows:
        hs.sql(
            f"INSERT INTO {index.BLOBS} (sha256, length, stored, corrupt, created_ts,"
            " last_ref_ts) VALUES (?, ?, 1, 0, ?, ?)",
            row,
        )


def test_a_second_run_refuses_while_one_runs_and_max_rate_holds(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "resume-rate"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    assert tool(hs, "stats").returncode == 0  # creates the index tables
    _insert_blobs(hs, seaweedfs, bucket, 200)

    env = {**hs.env(), "MSC3916_CHECKPOINT_SECONDS": "0"}
    first = subprocess.Popen(
        [sys.executable, "-m", "synapse_msc3916", "scrub", "--max-rate", "20",
         "-c", str(hs.config_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        # Wait for the observable state "first owns the scrub row and has checked some".
        while time.monotonic() < deadline:
            row: list[Any] = hs.sql(
                f"SELECT owner, done FROM {index.TOOL_RUNS} WHERE tool = 'scrub'"
            )
            if row and f":{first.pid}:" in row[0][0] and row[0][1] > 0:
                break
            assert first.poll() is None, "the first run ended before the second started"
            time.sleep(0.05)
        else:
            raise AssertionError("the first scrub never started")
        second = run_tool(hs, "scrub", "--json")
        assert second.returncode == 1
        # Before: no such guard, the second scrub ran alongside the first (exit 0).
        assert "another scrub run is in progress" in second.stderr, second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # it really was running meanwhile
    finally:
        first.kill()
        first.wait()

    # The first run's process is gone: the next run takes its row over at once and
    # resumes after its cursor.
    resumed = tool(hs, "scrub", "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed_from"] is not None and report["checked"] == 200
    assert "resuming an interrupted run" in resumed.stderr

    # --max-rate: 200 objects at 100/s over 16 workers; the tool's own count/elapsed.
    limited = tool(hs, "scrub", "--max-rate", "100", "--json")
    assert limited.returncode == 0, limited.stderr
    report = json.loads(limited.stdout)
    assert report["checked"] == 200 and report["resumed_from"] is None
    assert 80 <= report["objects_per_second"] <= 120, report
