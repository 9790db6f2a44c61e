"""``migrate --from-legacy-prefix`` copies inside the bucket (S3 ``CopyObject``) when
Synapse recorded the media's SHA-256, and still deletes no source before its copy is
verified. Real Synapse, real SeaweedFS; a recording pass-through in front of SeaweedFS
shows what the tool really sent.

How they failed before server-side copy existed (run against the unchanged code): both
with ``KeyError: 'copied_server_side'`` (the old code downloads every source; the rotten
one it hashes and never writes, so the second test's kill between a copy and its
verification, the window the new path must make safe, could not even happen).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable

from synapse_msc3916.storage import index
from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse
from tests.storage_helpers import (
    download,
    png,
    provider_entry,
    run_tool,
    s3_config,
    s3_legacy_entry,
    sha,
    switch_to_dedup,
    wipe_local_media,
)
from tests.test_storage_tools_resume import killed, local_path, object_bytes, tool
from tests.web_client import RecordingProxy, Seen


def _legacy_server(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS, bucket: str
) -> Synapse:
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[s3_legacy_entry(seaweedfs, bucket, "legacy/")])
    hs.start()
    return hs


def test_legacy_migration_copies_server_side_and_falls_back_without_a_sha256(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "copy-legacy"
    hs = _legacy_server(synapse_factory, seaweedfs, bucket)
    token = hs.register("alice")
    same, other, old, image = os.urandom(150_000), os.urandom(90_000), os.urandom(40_000), png()
    media = {hs.upload(token, d, "application/octet-stream"): d for d in (same, same, other, old)}
    img_id = hs.upload(token, image, "image/png", "pic.png")
    media[img_id] = image
    old_id = next(m for m, d in media.items() if d == old)
    # As Synapse < 1.128 leaves it: no SHA-256 recorded, so nothing to name a copy by.
    hs.sql("UPDATE local_media_repository SET sha256 = NULL WHERE media_id = ?", (old_id,))
    thumbs = [k for k in seaweedfs.list_keys(bucket, "legacy/") if "thumbnails" in k]
    assert thumbs  # thumbnails have no recorded SHA-256 either: downloaded too

    proxy = RecordingProxy(seaweedfs.endpoint_url).start()
    try:
        via_proxy = SeaweedFS(seaweedfs.dir)
        via_proxy.endpoint_url = proxy.url
        switch_to_dedup(hs, via_proxy, bucket)
        mark = len(proxy.seen())
        # One at a time: the second `same` is then a dedup hit (run alongside the first,
        # it would be downloaded: a copy is only made where nobody else stores it).
        result = run_tool(hs, "migrate", "--from-legacy-prefix", "--jobs", "1", "--json")
        assert result.returncode == 0, result.stderr
        seen = proxy.seen()[mark:]
        _check_copied(hs, seaweedfs, bucket, token, media, old_id, result, seen)
    finally:
        proxy.stop()
    _check_forced_download(hs, seaweedfs, bucket, token)


def _check_copied(
    hs: Synapse, seaweedfs: SeaweedFS, bucket: str, token: str, media: dict[str, bytes],
    old_id: str, result: subprocess.CompletedProcess, seen: list[Seen],
) -> None:
    report = json.loads(result.stdout)
    # `same`, `other` and the image copied (the second `same` is a dedup hit: no copy),
    # each verified by reading it back: SeaweedFS returns no SHA-256 for a copy.
    assert report["copied_server_side"] == 3, report
    assert (report["verified_by_read_back"], report["verified_by_checksum"]) == (3, 0), report
    # (identical thumbnails of the small image are dedup hits too)
    assert report["deduplicated"] >= 1 and report["legacy_deleted"] == report["files"], report
    gets = [s.path for s in seen if s.method == "GET" and "/legacy/local_content/" in s.path]
    old_key = f"/{bucket}/legacy/{local_path(old_id)}"
    # Only the source without a recorded SHA-256 was downloaded.
    assert [g.split("?")[0] for g in gets] == [old_key], f"the sources were downloaded: {gets}"
    assert any(s.method == "GET" and "/legacy/local_thumbnails/" in s.path for s in seen)
    assert seaweedfs.list_keys(bucket, "legacy/") == []
    assert hs.sql(f"SELECT COUNT(*) FROM {index.PATHS} WHERE thumbnail_width IS NULL") == [
        (len(media),)
    ]

    wipe_local_media(hs)
    for media_id, data in media.items():
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == data, media_id



def _check_forced_download(hs: Synapse, seaweedfs: SeaweedFS, bucket: str, token: str) -> None:
    """The old way on request: every source downloaded and uploaded."""
    hs.stop()
    hs.config["media_storage_providers"] = [s3_legacy_entry(seaweedfs, bucket, "legacy2/")]
    hs.write_config()
    hs.start()
    forced_id = hs.upload(token, os.urandom(30_000), "application/octet-stream")
    hs.stop()
    hs.config["media_storage_providers"] = [
        provider_entry(s3_config(seaweedfs, bucket, prefix="blobs/", legacy_prefix="legacy2/"))
    ]
    hs.write_config()
    hs.start()
    forced = run_tool(hs, "migrate", "--from-legacy-prefix", "--no-server-side-copy", "--json")
    assert forced.returncode == 0, forced.stderr
    report = json.loads(forced.stdout)
    assert (report["written"], report["copied_server_side"]) == (1, 0), report
    assert hs.sql(f"SELECT 1 FROM {index.PATHS} WHERE file_id = ?", (forced_id,)) == [(1,)]


def test_a_rotten_source_is_kept_and_its_copy_never_served(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "copy-rotten"
    hs = _legacy_server(synapse_factory, seaweedfs, bucket)
    token = hs.register("alice")
    good, rotten = os.urandom(100_000), os.urandom(70_000)
    good_id = hs.upload(token, good, "application/octet-stream")
    rotten_id = hs.upload(token, rotten, "application/octet-stream")
    key = "legacy/" + local_path(rotten_id)
    blob = "blobs/" + blob_name(sha(rotten))
    # Bit rot: other bytes of the same length under the legacy key.
    tampered = bytearray(rotten)
    tampered[100] ^= 0xFF
    client = seaweedfs.client()
    client.put_object(Bucket=bucket, Key=key, Body=bytes(tampered))
    switch_to_dedup(hs, seaweedfs, bucket)

    result = run_tool(hs, "migrate", "--from-legacy-prefix", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert (report["copied_server_side"], report["hash_mismatch"]) == (2, 1), report
    assert "Synapse recorded" in result.stderr
    assert seaweedfs.list_keys(bucket, "legacy/") == [key]  # kept, the good one gone
    assert hs.sql(f"SELECT 1 FROM {index.PATHS} WHERE file_id = ?", (rotten_id,)) == []
    assert object_bytes(seaweedfs, bucket, blob) is None  # the bad copy was deleted
    assert hs.sql(f"SELECT 1 FROM {index.BLOBS} WHERE sha256 = ?", (sha(rotten),)) == []

    # Killed between the copy and its verification: the bad copy stays under the
    # name of content it is not. Nothing may trust it: no path names it, and the
    # next upload of that content rewrites it instead of being a dedup hit on it.
    solo = "solo/" + local_path(rotten_id)
    client.copy_object(Bucket=bucket, Key=solo, CopySource={"Bucket": bucket, "Key": key})
    result = tool(hs, "migrate", "--from-legacy-prefix", "solo/", "--jobs", "1",
                  "--keep-source", kill_at=2)  # 1: after the claim, 2: after the copy
    assert killed(result), result.stderr
    assert object_bytes(seaweedfs, bucket, blob) == bytes(tampered)
    assert seaweedfs.list_keys(bucket, "solo/") == [solo]
    assert hs.sql(f"SELECT 1 FROM {index.PATHS} WHERE sha256 = ?", (sha(rotten),)) == []
    assert hs.sql(f"SELECT corrupt FROM {index.BLOBS} WHERE sha256 = ?", (sha(rotten),)) == [
        (1,)
    ]
    again = hs.upload(hs.register("bob"), rotten, "application/octet-stream")
    wipe_local_media(hs)
    resp = download(hs, token, again)
    assert resp.status == 200 and resp.body == rotten
    assert object_bytes(seaweedfs, bucket, blob) == rotten
    resp = download(hs, token, good_id)
    assert resp.status == 200 and resp.body == good
