"""The Grafana dashboard uses only metrics a live Synapse with the module exports.

``contrib/grafana/synapse-msc3916.json`` must import as it is (datasource and instance
variables) and every PromQL expression in it must name metrics that appear on
``/_synapse/metrics`` once there has been traffic on every endpoint family, an upload, a
dedup hit, a storage fetch, a storage error, a missing object found and a redirect.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse
from tests.storage_helpers import provider_entry, s3_config, wipe_local_media

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "synapse-msc3916.json"
METRIC_NAME = re.compile(r"\bsynapse_msc3916_[a-z0-9_]+\b")


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def test_dashboard_is_importable_as_is() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    assert "__inputs" not in dashboard  # nothing to fill in on import
    titles = " / ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("legacy", "client family", "freeze decisions", "dedup", "bytes saved",
                   "fetch latency", "storage errors", "deletion job", "damaged objects", "heals",
                   "redirects"):
        assert wanted in titles, wanted
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def _exposed(hs: Synapse) -> set[str]:
    names = set()
    for line in hs.metrics().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_metric_is_exported(
    synapse_factory: Callable[..., Synapse], tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    store = tmp_path / "blobs"
    hs = synapse_factory(
        # A freeze date in the past: legacy reads of new media give freeze decisions.
        module_config={"freeze": {"after": "2000-01-01T00:00:00Z", "mode": "enforce"}},
        storage_providers=[provider_entry({"backend": "file", "directory": str(store)})],
    )
    hs.start()
    token = hs.register("alice")
    sn = hs.server_name
    data, broken, lost = os.urandom(50_000), os.urandom(20_000), os.urandom(10_000)
    first = hs.upload(token, data, "application/octet-stream")
    hs.upload(token, data, "application/octet-stream")  # a dedup hit
    unreadable = hs.upload(token, broken, "application/octet-stream")
    missing = hs.upload(token, lost, "application/octet-stream")

    auth = {"Authorization": f"Bearer {token}"}
    for path, headers in [
        (f"/_matrix/media/v3/download/{sn}/{first}", {"User-Agent": "curl/8.5.0"}),
        (f"/_matrix/client/r0/media/download/{sn}/{first}", {}),
        (f"/_matrix/client/v1/media/download/{sn}/{first}", auth),
        (f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{first}", auth),
    ]:
        assert hs.get(path, **headers).status in (200, 404), path
    # Reads from the provider: one served, one failing on an unreadable object.
    wipe_local_media(hs)
    assert hs.get(f"/_matrix/client/v1/media/download/{sn}/{first}", token).status == 200
    blob = store / blob_name(hashlib.sha256(broken).hexdigest())
    assert blob.is_file(), sorted(store.rglob("*"))
    blob.unlink()
    blob.mkdir()  # reading a directory fails: a storage error, not a missing object
    try:
        assert hs.get(f"/_matrix/client/v1/media/download/{sn}/{unreadable}", token).status >= 500
    finally:
        shutil.rmtree(blob)
    # An indexed object that is gone: a damaged object found at fetch time.
    (store / blob_name(hashlib.sha256(lost).hexdigest())).unlink()
    assert hs.get(f"/_matrix/client/v1/media/download/{sn}/{missing}", token).status == 404
    exposed = _exposed(hs)

    # Redirects need S3: a second server on the session's SeaweedFS, one redirected read.
    bucket = "dashboard"
    seaweedfs.create_bucket(bucket)
    s3 = synapse_factory(storage_providers=[provider_entry(
        s3_config(seaweedfs, bucket, redirect={"enabled": True, "min_size": 1000}))])
    s3.start()
    token = s3.register("bob")
    media_id = s3.upload(token, os.urandom(5000), "application/octet-stream")
    assert s3.get(f"/_matrix/client/v1/media/download/{s3.server_name}/{media_id}", token).status == 307
    exposed |= _exposed(s3)
    dashboard = json.loads(DASHBOARD.read_text())
    names = {name for expr in _exprs(dashboard) for name in METRIC_NAME.findall(expr)}
    assert len(names) >= 10, names
    missing = sorted(names - exposed)
    assert not missing, missing
