"""The parallel tools interrupted by an outage instead of a kill: S3 going away, the
database restarting (#20: "a run killed at any moment (kill -9, S3 outage, DB restart)
and started again continues where it stopped").

A run that loses its S3 endpoint or its database half-way must end by itself, with a
message an admin can act on (not a traceback, not a hang), having deleted no source it
had not verified; the next run, once the outage is over, resumes after the cursor of the
interrupted one and finishes with every media readable. Real Synapse, real SeaweedFS
(a private one, which these tests crash), real PostgreSQL (restarted with a fast
shutdown, which cuts every client's connection as a crash or a failover does).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse, request, wait_for
from tests.harness_workers import PostgreSQL
from tests.storage_helpers import (
    crash,
    download,
    private_seaweedfs_at,
    provider_entry,
    s3_config,
    s3_legacy_entry,
    sha,
    switch_to_dedup,
    wipe_local_media,
)
from tests.test_storage_tools_resume import (
    local_path,
    object_bytes,
    recorded_done,
    start_tool,
    tool,
    wait_for_progress,
)


@pytest.fixture
def private_seaweedfs(tmp_path: Path) -> Iterator[SeaweedFS]:
    """One for each test: a test may end with it crashed."""
    with private_seaweedfs_at(tmp_path / "seaweedfs") as server:
        yield server


def _ended_cleanly(proc: subprocess.Popen) -> str:
    """The interrupted run ends by itself, with exit status 1 and a message, no traceback."""
    try:
        _out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run hung after the outage: {proc.communicate()[1][-3000:]}") from None
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


def test_migrate_through_an_s3_outage_stops_cleanly_and_resumes(
    synapse_factory: Callable[..., Synapse], private_seaweedfs: SeaweedFS
) -> None:
    sw = private_seaweedfs
    bucket = "outage-migrate"
    sw.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[s3_legacy_entry(sw, bucket, "legacy/")]).start()
    token = hs.register("alice")
    rng = random.Random(31)
    media = {hs.upload(token, data): data
             for data in (rng.randbytes(rng.randint(1000, 20_000)) for _ in range(40))}
    switch_to_dedup(hs, sw, bucket)

    proc = start_tool(hs, "migrate", "--from-legacy-prefix", "--jobs", "2", "--max-rate", "8")
    before = wait_for_progress(lambda: recorded_done(hs, "migrate"), proc, 5)
    crash(sw)
    err = _ended_cleanly(proc)
    assert "storage" in err.lower() or "s3" in err.lower(), err[-3000:]
    sw.start()

    # Nothing lost: every source is still there, or its verified copy is indexed.
    left = set(sw.list_keys(bucket, "legacy/"))
    migrated = [m for m in media if "legacy/" + local_path(m) not in left]
    assert before <= len(migrated) < len(media)  # the outage really came half-way
    for media_id in migrated:
        data = media[media_id]
        assert object_bytes(sw, bucket, "blobs/" + blob_name(sha(data))) == data

    again = tool(hs, "migrate", "--from-legacy-prefix", "--json")
    assert again.returncode == 0, again.stderr
    assert "migrate: resuming an interrupted run after local_content/" in again.stderr
    report = json.loads(again.stdout)
    assert report["resumed_from"] is not None, report
    assert sw.list_keys(bucket, "legacy/") == []
    wipe_local_media(hs)
    for media_id, data in media.items():
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == data, media_id


@pytest.mark.single_process  # a PostgreSQL of its own, restarted: not the workers' shared one
def test_scrub_through_a_database_restart_stops_cleanly_and_resumes(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    postgres = PostgreSQL().start()
    try:
        postgres.create_database("restarted")
        bucket = "outage-scrub-db"
        seaweedfs.create_bucket(bucket)
        hs = synapse_factory(
            storage_providers=[provider_entry(s3_config(seaweedfs, bucket))],
            extra_config={"database": postgres.database_config("restarted")},
        ).start()
        token = hs.register("alice")
        contents = [os.urandom(2000 + n) for n in range(40)]
        for data in contents:
            hs.upload(token, data)

        def done() -> int:
            rows = postgres.query(
                "restarted", f"SELECT done FROM {index.TOOL_RUNS} WHERE tool = 'scrub'"
            )
            return rows[0][0] if rows else 0

        proc = start_tool(hs, "scrub", "--hash", "--jobs", "2", "--max-rate", "8")
        wait_for_progress(done, proc, 5)
        postgres.restart()
        err = _ended_cleanly(proc)
        assert "database" in err.lower(), err[-3000:]

        again = tool(hs, "scrub", "--hash", "--json")
        assert again.returncode == 0, again.stderr
        assert "resuming an interrupted run" in again.stderr
        report = json.loads(again.stdout)
        assert report["resumed_from"] is not None and report["checked"] == len(contents), report
        assert report["still_broken"] == 0, report
        # Synapse went through the restart too (its first queries on the cut connections
        # fail, then its pool reconnects) and stores and serves through the provider.
        uploaded: list[str] = []
        wait_for(lambda: uploaded.append(hs.upload(token, b"after the restart")) is None,
                 30, "an upload after the database restart")
        wipe_local_media(hs)
        assert download(hs, token, uploaded[0]).body == b"after the restart"
        hs.stop()
    finally:
        postgres.stop()


def test_gc_apply_with_s3_down_stops_cleanly_and_the_next_run_deletes(
    synapse_factory: Callable[..., Synapse], private_seaweedfs: SeaweedFS
) -> None:
    sw = private_seaweedfs
    bucket = "outage-gc"
    sw.create_bucket(bucket)
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(sw, bucket, delete_after=None))]
    ).start()
    admin = hs.register("admin", admin=True)
    kept = {hs.upload(admin, data): data for data in (os.urandom(3000 + n) for n in range(5))}
    gone = [hs.upload(admin, os.urandom(4000 + n)) for n in range(20)]
    for media_id in gone:
        resp = request("DELETE", hs.base_url,
                       f"/_synapse/admin/v1/media/{hs.server_name}/{media_id}",
                       {"Authorization": f"Bearer {admin}"})
        assert resp.status == 200, resp
    assert len(sw.list_keys(bucket)) == 25

    crash(sw)
    down = tool(hs, "gc", "--grace", "0s", "--apply", "--json")
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr[-3000:]
    # It got as far as the delete (its candidates marked), which is what failed.
    assert "DeleteObjects" in down.stderr, down.stderr
    sw.start()
    # Every object is still there, and none is left marked as being deleted by the
    # failed run (a mark would hold its content back from uploads for a while).
    assert len(sw.list_keys(bucket)) == 25
    assert hs.sql(f"SELECT COUNT(*) FROM {index.BLOBS} WHERE deleting_ts IS NOT NULL") == [(0,)]

    again = tool(hs, "gc", "--grace", "0s", "--apply", "--json")
    assert again.returncode == 0, again.stderr
    assert sorted(sw.list_keys(bucket)) == sorted(blob_name(sha(d)) for d in kept.values())
    wipe_local_media(hs)
    for media_id, data in kept.items():
        resp = download(hs, admin, media_id)
        assert resp.status == 200 and resp.body == data, media_id
