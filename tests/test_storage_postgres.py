"""The index on PostgreSQL: concurrent schema creation, and Synapse + tools end to end."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator

import pytest

from synapse_msc3916.homeserver_config import Database
from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse, request, wait_for
from tests.harness_workers import PostgreSQL, postgres_for_module
from tests.storage_helpers import download, provider_entry, s3_config, wipe_local_media
from tests.test_storage_s3 import run_tool, sha


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgreSQL]:
    """The workers topology's server when there is one, else one of this module's own."""
    with postgres_for_module() as server:
        yield server


def test_many_processes_creating_the_schema_at_once(postgres: PostgreSQL) -> None:
    postgres.create_database("schema_race")
    barrier = threading.Barrier(8)
    errors: list[str] = []

    def start() -> None:
        db = Database(postgres.connect("schema_race"), "postgres")
        barrier.wait()
        try:
            index.run_tool_txn(db, index.ensure_schema_txn)
        except Exception as e:
            errors.append(str(e))
        finally:
            db.close()

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_synapse_on_postgres_dedups_and_gc_works(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS, postgres: PostgreSQL
) -> None:
    postgres.create_database("synapse_pg")
    bucket = "dedup-postgres"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket))],
        extra_config={"database": postgres.database_config("synapse_pg")},
    ).start()
    admin = hs.register("admin", admin=True)
    data, other = os.urandom(100_000), os.urandom(50_000)
    ids = [hs.upload(admin, data, filename=f"same{i}") for i in range(3)]
    gone = hs.upload(admin, other)
    assert sorted(seaweedfs.list_keys(bucket)) == sorted(blob_name(sha(d)) for d in (data, other))
    wipe_local_media(hs)
    for media_id in ids:
        assert download(hs, admin, media_id).body == data
    # The provider's heartbeat: its claims are held by this boot, not by its name.
    db = Database(postgres.connect("synapse_pg"), "postgres")
    try:

        # Every process that loads the provider: the main process, or (workers) each
        # media worker.
        workers = getattr(hs, "media_worker_count", 0)
        expected = {f"media{i + 1}" for i in range(workers)} if workers else {"master"}

        def booted() -> bool:
            rows = db.query(f"SELECT instance FROM {index.BOOTS}")
            db.commit()
            return {r[0] for r in rows} == expected and len(rows) == len(expected)

        wait_for(booted, 30, "the provider's boot row")
        assert db.query(f"SELECT COUNT(*) FROM {index.CLAIMS}") == [(0,)]
    finally:
        db.close()

    resp = request(
        "DELETE",
        hs.base_url,
        f"/_synapse/admin/v1/media/{hs.server_name}/{gone}",
        {"Authorization": f"Bearer {admin}"},
    )
    assert resp.status == 200, resp
    result = run_tool(hs, "gc", "--grace", "0s", "--apply", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["deleted"] == [sha(other)]
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(data))]

    stats = run_tool(hs, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    numbers = json.loads(stats.stdout)
    assert numbers["objects"] == 1 and numbers["paths"] == 3
    assert numbers["dedup_ratio"] == 3.0
