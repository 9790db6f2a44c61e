"""Remote media cached through federation is stored (and deduplicated) by the provider."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse, request
from tests.storage_helpers import provider_entry, s3_config, wipe_local_media
from tests.test_storage_s3 import index_rows, run_tool, sha


def test_remote_media_is_stored_once_and_served_when_origin_is_down(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "dedup-federation"
    seaweedfs.create_bucket(bucket)
    a = synapse_factory(name="origin", tls=True).start()
    b = synapse_factory(
        name="cache",
        tls=True,
        # delete_after: null leaves deletions to gc, which this test runs.
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after=None))],
    ).start()
    alice, bob = a.register("alice"), b.register("bob")
    data = os.urandom(180_000)
    remote_id = a.upload(alice, data, "application/pdf", "report.pdf")
    path = f"/_matrix/client/v1/media/download/{a.server_name}/{remote_id}"

    first = b.get(path, bob)
    assert first.status == 200 and first.body == data
    rows = index_rows(b, "media_origin = ?", (a.server_name,))
    assert [r[1] for r in rows] == [sha(data)]
    assert rows[0][0].startswith(f"remote_content/{a.server_name}/")

    # The same bytes uploaded locally on B cost no second object.
    b.upload(bob, data, "application/pdf", "copy.pdf")
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(data))]

    # With the origin gone and B's local cache wiped, B still serves it from S3.
    a.stop()
    wipe_local_media(b)
    again = b.get(path, bob)
    assert again.status == 200 and again.body == data
    assert (again.header("content-type") or "").startswith("application/pdf")

    # Purging B's remote media cache drops the remote index row at the next gc; the
    # object stays because the local copy still references it.
    admin = b.register("admin", admin=True)
    purge = request(
        "POST",
        b.base_url,
        f"/_synapse/admin/v1/purge_media_cache?before_ts={int(time.time() * 1000) + 1000}",
        {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        b"{}",
    )
    assert purge.status == 200 and purge.json()["deleted"] == 1, purge
    gc = run_tool(b, "gc", "--grace", "0s", "--apply", "--json")
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert report["paths_removed"] == 1 and report["deleted"] == []
    assert index_rows(b, "media_origin IS NOT NULL") == []
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(data))]
