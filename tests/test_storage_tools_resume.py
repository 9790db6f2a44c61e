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
from pathlib import Path
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
    switch_to_dedup,
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


def start_tool(hs: Synapse, *args: str) -> subprocess.Popen:
    """A tool run in the background (slowed by --max-rate in ``args``, so that a kill or
    an outage lands while it works); its checkpoints are written at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "synapse_msc3916", *args, "-c", str(hs.config_path)],
        env={**hs.env(), "MSC3916_CHECKPOINT_SECONDS": "0"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def recorded_done(hs: Synapse, tool_name: str) -> int:
    """Objects the tool's current or last run recorded as done (its own row)."""
    rows: list[Any] = hs.sql(f"SELECT done FROM {index.TOOL_RUNS} WHERE tool = ?", (tool_name,))
    return rows[0][0] if rows else 0


def wait_for_progress(done: Callable[[], int], proc: subprocess.Popen, at_least: int) -> int:
    """Wait until the run has recorded ``at_least`` finished objects (its own row)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            count = done()
        except Exception:  # the row or the table is not there yet
            count = 0
        if count >= at_least:
            return count
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run recorded no progress")


def kill_after_progress(hs: Synapse, tool_name: str, at_least: int, *args: str) -> None:
    """Start ``tool_name`` with ``args`` and SIGKILL it once it recorded ``at_least``
    finished objects, half-way: not after its end."""
    proc = start_tool(hs, tool_name, *args)
    try:
        wait_for_progress(lambda: recorded_done(hs, tool_name), proc, at_least)
        assert proc.poll() is None  # killed half-way, not after its end
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


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
    switch_to_dedup(hs, seaweedfs, bucket)

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


def _insert_rows(hs: Synapse, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Rows written by SQL, 100 to a statement (fast in both topologies)."""
    marks = "(" + ", ".join("?" * len(columns)) + ")"
    for start in range(0, len(rows), 100):
        chunk = rows[start:start + 100]
        hs.sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            + ", ".join([marks] * len(chunk)),
            tuple(v for row in chunk for v in row),
        )


def test_scrub_resumed_after_a_kill_reports_and_exits_for_the_whole_run(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """Problems found before a SIGKILL are in the resumed run's ``broken`` list, counts
    and exit code, and are listed again by it.

    Before (lists were this process's only, not kept with the cursor): the resumed run
    exited 1 with ``missing == 3`` but ``assert set() == {...}``: its ``broken`` was empty.
    """
    bucket = "resume-report"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    assert tool(hs, "stats").returncode == 0  # creates the index tables
    _insert_blobs(hs, seaweedfs, bucket, 40)
    # The first three in hash order (what a scrub checks first) lose their objects.
    lost = sorted(r[0] for r in hs.sql(f"SELECT sha256 FROM {index.BLOBS}"))[:3]
    client = seaweedfs.client()
    for sha256 in lost:
        client.delete_object(Bucket=bucket, Key=blob_name(sha256))

    # Killed once it has checked (and checkpointed) more than the lost objects.
    kill_after_progress(hs, "scrub", 10, "--max-rate", "10", "--jobs", "1", "--json")

    resumed = tool(hs, "scrub", "--json")
    assert resumed.returncode == 1, resumed.stderr  # still broken: the exit code says so
    report = json.loads(resumed.stdout)
    assert report["resumed_from"] is not None, report
    assert (report["checked"], report["missing"], report["still_broken"]) == (40, 3, 3), report
    assert {b["sha256"] for b in report["broken"]} == set(lost)
    assert report["broken_truncated"] is False
    assert resumed.stderr.count("(found before the resume)") == 3, resumed.stderr

    # A run from the beginning finds the same.
    fresh = tool(hs, "scrub", "--json", "--restart")
    assert fresh.returncode == 1
    again = json.loads(fresh.stdout)
    assert again["resumed_from"] is None and {b["sha256"] for b in again["broken"]} == set(lost)


def test_gc_apply_resumed_after_a_kill_lists_what_the_killed_run_deleted(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """``gc --apply``'s ``deleted`` list and counts cover the whole run, the part before a
    SIGKILL included: what the killed run deleted is gone from the bucket, so the resumed
    run would not find it again, and an admin reading its report must still see it."""
    bucket = "resume-gc-report"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    assert tool(hs, "stats").returncode == 0  # creates the index tables
    _insert_blobs(hs, seaweedfs, bucket, 40)  # unreferenced: all garbage
    garbage = sorted(r[0] for r in hs.sql(f"SELECT sha256 FROM {index.BLOBS}"))

    # --jobs 4: chunks of 10 objects, each costing 10 of --max-rate's 10 objects/s, so
    # the run takes about four seconds and checkpoints after each chunk.
    kill_after_progress(
        hs, "gc", 10, "--grace", "0s", "--apply", "--max-rate", "10", "--jobs", "4", "--json"
    )
    keys = set(seaweedfs.list_keys(bucket))
    deleted_before = [s for s in garbage if blob_name(s) not in keys]
    assert 10 <= len(deleted_before) < len(garbage)  # the kill really came half-way

    # The killed run's marks on chunks in flight go stale first, as a real restart's do.
    hs.sql(
        f"UPDATE {index.BLOBS} SET deleting_ts = deleting_ts - ? WHERE deleting_ts IS NOT NULL",
        (index.DELETING_STALE_MS + 1000,),
    )
    resumed = tool(hs, "gc", "--grace", "0s", "--apply", "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed_from"] is not None, report
    assert report["objects_deleted"] == len(garbage), report
    assert sorted(report["deleted"]) == garbage and report["deleted_truncated"] is False
    assert not set(seaweedfs.list_keys(bucket))
    assert hs.sql(f"SELECT COUNT(*) FROM {index.BLOBS}") == [(0,)]


def test_scrub_and_gc_list_the_first_100_and_count_everything(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    """More problems and deletions than the reports list: the lists stop at 100 (and say
    so), the counts are exact, and scrub prints every problem as it finds it.

    Before (every problem and every deleted hash in memory until the end; 475 MiB at 10^6
    missing objects): ``assert 250 == 100`` on the length of scrub's ``broken``.
    """
    listed = 100  # tools.EXAMPLES
    store = tmp_path / "blobs"
    hs = synapse_factory(
        storage_providers=[provider_entry({"backend": "file", "directory": str(store)})]
    ).start()
    assert tool(hs, "stats").returncode == 0  # creates the index tables
    old = int(time.time() * 1000) - 2 * 24 * 3600 * 1000
    # 250 blob rows that say "stored", no object behind them, nothing referencing them.
    missing = [sha(b"missing %d" % n) for n in range(250)]
    _insert_rows(hs, index.BLOBS, ("sha256", "length", "stored", "corrupt", "created_ts",
                                   "last_ref_ts"), [(s, 10, 1, 0, old, old) for s in missing])

    scrub = tool(hs, "scrub", "--json")
    assert scrub.returncode == 1, scrub.stderr
    report = json.loads(scrub.stdout)
    assert len(report["broken"]) == listed
    assert report["broken_truncated"] is True
    assert (report["checked"], report["missing"], report["still_broken"]) == (250, 250, 250)
    # Every problem printed as found (on stderr: stdout is the JSON document).
    assert scrub.stderr.count("missing: ") == 250, scrub.stderr[-2000:]
    text = tool(hs, "scrub", "--restart")
    assert text.returncode == 1 and text.stdout.count("missing: ") == 250

    dry = json.loads(tool(hs, "gc", "--json").stdout)
    assert (dry["objects_deleted"], len(dry["deleted"]), dry["deleted_truncated"]) == (250, listed, True)
    assert dry["deleted"] == sorted(missing)[:listed]  # the first, in hash order

    # 150 paths Synapse has no media row for (indexed two days ago), each the only
    # path of its content: gc removes them, which leaves their contents unreferenced.
    orphans = [sha(b"orphan %d" % n) for n in range(150)]
    _insert_rows(hs, index.BLOBS, ("sha256", "length", "stored", "corrupt", "created_ts",
                                   "last_ref_ts"), [(s, 10, 1, 0, old, old) for s in orphans])
    _insert_rows(hs, index.PATHS, ("path", "sha256", "length", "file_id", "created_ts"), [
        (f"local_content/or/ph/an{n:04d}", s, 10, f"orphan{n:04d}", old)
        for n, s in enumerate(orphans)
    ])
    dry = json.loads(tool(hs, "gc", "--json").stdout)
    assert (dry["paths_removed"], dry["objects_deleted"]) == (150, 250), dry
    dry = json.loads(tool(hs, "gc", "--grace", "0s", "--json").stdout)
    assert (dry["paths_removed"], dry["objects_deleted"]) == (150, 400), dry
    assert dry["deleted"] == sorted(missing + orphans)[:listed] and dry["deleted_truncated"]

    applied = tool(hs, "gc", "--grace", "0s", "--apply", "--json")
    assert applied.returncode == 0, applied.stderr
    done = json.loads(applied.stdout)
    assert (done["paths_removed"], done["objects_deleted"]) == (150, 400), done
    assert len(done["deleted"]) == listed and done["deleted_truncated"] is True
    assert hs.sql(f"SELECT COUNT(*) FROM {index.BLOBS}") == [(0,)]
