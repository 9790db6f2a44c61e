"""The ``file`` backend through a real Synapse, and start-up config validation."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import Synapse
from tests.storage_helpers import download, provider_entry, wipe_local_media


def _blobs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_file_backend_round_trip_dedups(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    store = tmp_path / "blobs"
    hs = synapse_factory(
        storage_providers=[provider_entry({"backend": "file", "directory": str(store)})]
    )
    hs.start()
    alice, bob = hs.register("alice"), hs.register("bob")
    data = os.urandom(300_000)
    a = hs.upload(alice, data, "application/octet-stream", "a.bin")
    b = hs.upload(bob, data, "text/plain", "other-name.txt")
    other = hs.upload(alice, b"different content", "text/plain", "c.txt")
    blobs = _blobs(store)
    assert len(blobs) == 2, blobs
    assert {p.read_bytes() for p in blobs} == {data, b"different content"}

    wipe_local_media(hs)
    ra, rb, rc = download(hs, alice, a), download(hs, bob, b), download(hs, alice, other)
    assert ra.status == rb.status == rc.status == 200
    assert ra.body == rb.body == data and rc.body == b"different content"
    assert ra.header("content-type") == "application/octet-stream"
    assert (rb.header("content-type") or "").startswith("text/plain")
    assert "other-name.txt" in (rb.header("content-disposition") or "")
    assert hs.metric_value("synapse_msc3916_storage_dedup_hits_total") >= 1
    assert hs.metric_value("synapse_msc3916_storage_bytes_saved_total") >= len(data)


def test_bad_config_stops_synapse_naming_the_key(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backend": "tape"}, "backend"),
        ({"backend": "file"}, "directory"),
        ({"backend": "s3", "bucket": "ok-bucket", "threadpool_size": "many"}, "threadpool_size"),
        ({"backend": "s3", "bucket": "ok-bucket", "bogus_key": 1}, "bogus_key"),
    ]
    for config, key in cases:
        hs = synapse_factory(storage_providers=[provider_entry(config)])
        code, output = hs.start_expecting_failure()
        assert code != 0
        assert key in output, output[-2000:]
