"""The provider's lookups of remote media use Synapse's unique (media_origin, media_id)
index, on a real Synapse on PostgreSQL with a large remote media cache.

Remote media paths name a ``filesystem_id``, which Synapse does not index: a lookup by
(media_origin, filesystem_id) reads every cached media of that origin (millions for
matrix.org) on every remote store and every tombstone.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Synapse, request, wait_for
from tests.harness_workers import PostgreSQL, postgres_for_module
from tests.storage_helpers import provider_entry

FILLER = 20_000  # cached media of the same origin: enough for the planner to want an index
REMOTE_TABLES = ("remote_media_cache", "remote_media_cache_thumbnails")
_LOG_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.M)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgreSQL]:
    """The workers topology's server when there is one, else one of this module's own."""
    with postgres_for_module() as server:
        yield server


def _statements(log: Path) -> list[str]:
    """Every statement PostgreSQL logged (``log_statement = all``), whole."""
    text = log.read_text(errors="replace")
    out = []
    for entry in _LOG_ENTRY.split(text):
        _, found, statement = entry.partition("LOG:  statement: ")
        if found:
            out.append(statement.strip())
    return out


def _remote_scans(plan: Any) -> Iterator[dict[str, Any]]:
    if isinstance(plan, dict):
        if plan.get("Relation Name") in REMOTE_TABLES:
            yield plan
        for value in plan.values():
            yield from _remote_scans(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from _remote_scans(value)


@pytest.mark.single_process  # starts its own PostgreSQL; the workers run covers PostgreSQL too
def test_remote_store_and_tombstone_lookups_use_the_media_id_index(
    synapse_factory: Callable[..., Synapse], postgres: PostgreSQL, tmp_path: Path
) -> None:
    """Every statement the provider ran on Synapse's remote media tables while B cached
    a remote media and then followed its purge is planned as an index lookup on
    (media_origin, media_id), not a scan of the origin's media.

    Before the fix the remote store looked up ``remote_media_cache`` by
    ``filesystem_id`` and the tombstone check did too: both were planned as a ``Seq
    Scan`` on ``remote_media_cache`` (``Filter: media_origin = ... AND filesystem_id =
    ...``; the tombstone's as a hashed subplan over all 20 000 rows), and the node-type
    assertion failed, first for the store's statement and, with only the store fixed,
    for the tombstone's.
    """
    postgres.create_database("remote_idx")
    postgres.query("postgres", "ALTER DATABASE remote_idx SET log_statement = 'all'")
    a = synapse_factory(name="origin", tls=True).start()
    b = synapse_factory(
        name="cache",
        tls=True,
        storage_providers=[
            provider_entry({"backend": "file", "directory": str(tmp_path / "blobs"),
                            "delete_after": "0s"})
        ],
        extra_config={"database": postgres.database_config("remote_idx")},
    ).start()
    far = int(time.time() * 1000) + 10**10  # never purged
    postgres.query(
        "remote_idx",
        "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts,"
        " media_length, filesystem_id, last_access_ts)"
        " SELECT %s, 'filler' || g, 'image/png', %s, 10, 'fs' || g, %s"
        " FROM generate_series(1, %s) g",
        (a.server_name, far, far, FILLER),
    )
    postgres.query(
        "remote_idx",
        "INSERT INTO remote_media_cache_thumbnails (media_origin, media_id, thumbnail_width,"
        " thumbnail_height, thumbnail_method, thumbnail_type, thumbnail_length, filesystem_id)"
        " SELECT %s, 'filler' || g, 32, 32, 'crop', 'image/png', 10, 'fs' || g"
        " FROM generate_series(1, %s) g",
        (a.server_name, FILLER),
    )
    postgres.query("remote_idx", "ANALYZE remote_media_cache")
    postgres.query("remote_idx", "ANALYZE remote_media_cache_thumbnails")
    log = postgres.dir / "postgres.log"
    start = len(_statements(log))

    alice, bob = a.register("alice"), b.register("bob")
    data = os.urandom(10_000)
    remote_id = a.upload(alice, data)
    got = b.get(f"/_matrix/client/v1/media/download/{a.server_name}/{remote_id}", bob)
    assert got.status == 200 and got.body == data
    remote_paths = "SELECT COUNT(*) FROM msc3916_storage_paths WHERE media_origin IS NOT NULL"
    assert postgres.query("remote_idx", remote_paths) == [(1,)]
    admin = b.register("admin", admin=True)
    purge = request(
        "POST",
        b.base_url,
        f"/_synapse/admin/v1/purge_media_cache?before_ts={int(time.time() * 1000) + 1000}",
        {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        b"{}",
    )
    assert purge.status == 200 and purge.json()["deleted"] == 1, purge
    # The deletion job follows the purge: the tombstone removes the remote path.
    wait_for(
        lambda: postgres.query("remote_idx", remote_paths) == [(0,)],
        60,
        "the deletion job applied the tombstone",
    )

    ours = [
        s for s in _statements(log)[start:]
        if any(t in s for t in REMOTE_TABLES)
        and ("msc3916" in s or s.startswith("SELECT sha256, media_length FROM remote_media_cache"))
        and not s.startswith(("CREATE", "ALTER", "DROP"))
    ]
    assert any("msc3916_storage_paths" in s for s in ours), ours  # the tombstone check ran
    for statement in ours:
        plan = postgres.query("remote_idx", "EXPLAIN (FORMAT JSON) " + statement.replace("%", "%%"))
        scans = list(_remote_scans(plan[0][0]))
        assert scans, json.dumps(plan[0][0])
        for scan in scans:
            cond = scan.get("Index Cond") or scan.get("Recheck Cond") or ""
            assert scan["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), (
                statement, json.dumps(scan))
            assert "media_origin" in cond and "media_id" in cond, (statement, json.dumps(scan))
