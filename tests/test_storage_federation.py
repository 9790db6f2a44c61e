"""Remote media cached through federation is stored (and deduplicated) by the provider."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse, request
from tests.storage_helpers import png, provider_entry, s3_config, wipe_local_media
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


def test_remote_media_cached_before_the_provider_is_migrated_and_served(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """``migrate`` of a media store holding remote media and thumbnails that B cached
    before it had the provider: matched to Synapse's remote rows by filesystem_id (read
    in pages, ``tools.SynapseRows``), stored, and served by B with the origin gone."""
    bucket = "migrate-remote"
    seaweedfs.create_bucket(bucket)
    a = synapse_factory(name="origin", tls=True).start()
    b = synapse_factory(name="cache", tls=True).start()
    alice, bob = a.register("alice"), b.register("bob")
    files = {a.upload(alice, os.urandom(30_000 + n)): None for n in range(5)}
    image = png(320, 240, (10, 120, 200))
    image_id = a.upload(alice, image, "image/png")
    thumb_path = f"/_matrix/client/v1/media/thumbnail/{a.server_name}/{image_id}?width=32&height=32&method=scale"
    for media_id in [*files, image_id]:
        got = b.get(f"/_matrix/client/v1/media/download/{a.server_name}/{media_id}", bob)
        assert got.status == 200, got
        files[media_id] = got.body
    thumb = b.get(thumb_path, bob)
    assert thumb.status == 200 and thumb.body, thumb

    b.stop()
    b.config["media_storage_providers"] = [
        provider_entry(s3_config(seaweedfs, bucket, delete_after=None))
    ]
    b.write_config()
    b.start()
    result = run_tool(b, "migrate", "--min-age", "0s", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skipped_incomplete"] == 0, report
    paths = [r[0] for r in index_rows(b, "media_origin = ?", (a.server_name,))]
    assert len([p for p in paths if p.startswith("remote_content/")]) == 6, paths
    assert any(p.startswith("remote_thumbnail/") for p in paths), paths

    a.stop()
    wipe_local_media(b)
    for media_id, data in files.items():
        got = b.get(f"/_matrix/client/v1/media/download/{a.server_name}/{media_id}", bob)
        assert got.status == 200 and got.body == data, media_id
    again = b.get(thumb_path, bob)
    assert again.status == 200 and again.body == thumb.body
