"""The freeze is never weaker than Synapse's own ``authenticated`` flag (issue 13).

One server with Synapse's default ``enable_authenticated_media: true``: media uploaded
there carries the flag, and Synapse's legacy endpoints refuse it. Whatever the ``freeze``
block says (none, enforce on either side of the date, report mode), every unauthenticated
path must refuse it too; only ``reopen_flagged_media: true`` with a date after the upload
serves it. The same server, reconfigured between cases, also checks who is counted:
``synapse_msc3916_unauthenticated_requests_total{client, decision}``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from synapse_msc3916.clients import FAMILIES, MAX_LENGTH, RULES
from tests.harness import Synapse, make_synapse
from tests.test_endpoints import png
from tests.test_freeze import assert_frozen, authenticated_paths, iso, legacy_paths

DAY_MS = 24 * 3600 * 1000
METRIC = "synapse_msc3916_unauthenticated_requests_total"


class Server:
    """A started Synapse with one flagged upload, reconfigured only when a case needs it."""

    def __init__(self, hs: Synapse):
        self.hs = hs
        self.token = hs.register("alice")
        self.before_upload = int(time.time() * 1000) - DAY_MS
        self.media = hs.upload(self.token, png(), "image/png", "flagged.png")
        self.after_upload = int(time.time() * 1000) + DAY_MS
        self.freeze: dict[str, Any] | None = None

    def configure(self, freeze: dict[str, Any] | None) -> None:
        if freeze == self.freeze:
            return
        self.hs.config["modules"][0]["config"] = {} if freeze is None else {"freeze": freeze}
        self.hs.restart()
        self.freeze = freeze

    def count(self, **labels: str) -> float:
        return self.hs.metric_value(METRIC, **labels)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    hs = make_synapse(tmp_path_factory.mktemp("flagged"), module_config={})
    hs.start()
    try:
        yield Server(hs)
    finally:
        hs.stop()


def _freeze(server: Server, case: str) -> dict[str, Any] | None:
    before, after = iso(server.before_upload), iso(server.after_upload)
    return {
        "no freeze block": None,
        "enforce, date after the upload": {"after": after, "mode": "enforce"},
        "enforce, date before the upload": {"after": before, "mode": "enforce"},
        "report, date before the upload": {"after": before, "mode": "report"},
        "report, date after the upload, reopen_flagged_media": {
            "after": after, "mode": "report", "reopen_flagged_media": True,
        },
        "enforce, date after the upload, reopen_flagged_media": {
            "after": after, "mode": "enforce", "reopen_flagged_media": True,
        },
    }[case]


REFUSED_CASES = [
    "no freeze block",
    "enforce, date after the upload",
    "enforce, date before the upload",
    "report, date before the upload",
    "report, date after the upload, reopen_flagged_media",
]


@pytest.mark.parametrize("case", REFUSED_CASES)
def test_flagged_media_refused_on_every_unauthenticated_path(server: Server, case: str) -> None:
    server.configure(_freeze(server, case))
    hs, sn = server.hs, server.hs.server_name
    paths = legacy_paths(sn, server.media)
    refused, would = server.count(decision="refused"), server.count(decision="would_refuse")
    for path in paths:
        r = hs.get(path)
        assert r.status == 404, (case, path, r)
        assert b"PNG" not in r.body
        assert r.json()["errcode"] == "M_NOT_FOUND"
    for path in authenticated_paths(sn, server.media):
        assert hs.get(path, server.token).status == 200, (case, path)
    assert server.count(decision="refused") - refused == len(paths)
    # A signed federation read (MSC1902 remote_media) is served like Synapse's stable
    # federation endpoints, and counted as exempt.
    exempt = server.count(decision="exempt")
    signed = hs.federation_get(
        f"/_matrix/federation/v1/remote_media/download/{sn}/{server.media}", sn, hs.signing_key()
    )
    assert signed.status == 200 and signed.body == png(), (case, signed)
    assert server.count(decision="exempt") - exempt == 1
    # Report mode counts only what enforce would refuse *beyond* Synapse: nothing here.
    assert server.count(decision="would_refuse") == would


def test_reopen_flagged_media_serves_before_the_date(server: Server) -> None:
    server.configure(_freeze(server, "enforce, date after the upload, reopen_flagged_media"))
    hs, sn = server.hs, server.hs.server_name
    paths = legacy_paths(sn, server.media)
    served = server.count(decision="served")
    for path in paths:
        r = hs.get(path)
        assert r.status == 200, (path, r)
        assert r.header("content-type") == "image/png"
    for path in authenticated_paths(sn, server.media):
        assert hs.get(path, server.token).status == 200, path
    assert server.count(decision="served") - served == len(paths)


def test_reopen_never_opens_media_at_or_after_the_date(server: Server) -> None:
    freeze = dict(_freeze(server, "enforce, date before the upload") or {}, reopen_flagged_media=True)
    server.configure(freeze)
    sn = server.hs.server_name
    for path in legacy_paths(sn, server.media):
        assert_frozen(server.hs.get(path), path)
    # The enforce-mode log line names the client family.
    server.hs.get(f"/_matrix/media/v3/download/{sn}/{server.media}", **{"User-Agent": "curl/8.5.0"})
    log = server.hs.log_file.read_text()
    assert f"refused mxc://{sn}/{server.media} on an unauthenticated endpoint (client: cli)" in log


ADVERSARIAL: list[tuple[dict[str, Any], str]] = [
    ({}, "none"),
    ({"User-Agent": "curl/8.5.0 " + "x" * 10_000}, "other"),
    ({"User-Agent": "Synapse/1.0\x01\x02"}, "other"),
    ({"User-Agent": bytes([0x80 + i % 120 for i in range(300)])}, "other"),
    ({"User-Agent": "definitely not a known client"}, "other"),
]


def test_client_families_on_metrics(server: Server) -> None:
    """Real User-Agents from the clients' own source land in their family; junk in other/none."""
    server.configure(None)
    sn = server.hs.server_name
    path = f"/_matrix/media/v3/download/{sn}/{server.media}"
    cases = [({"User-Agent": rule.example}, rule.family) for rule in RULES] + ADVERSARIAL
    assert len(RULES) >= 10
    expected: dict[str, int] = {}
    for _headers, family in cases:
        expected[family] = expected.get(family, 0) + 1
    before = {family: server.count(client=family, decision="refused") for family in expected}
    for headers, _family in cases:
        assert server.hs.get(path, **headers).status == 404
    for family, n in expected.items():
        assert server.count(client=family, decision="refused") - before[family] == n, family
    # The label never holds anything but a family, whatever the header held.
    seen = set()
    for line in server.hs.metrics().splitlines():
        if line.startswith(METRIC + "{"):
            seen.add(line.split('client="', 1)[1].split('"', 1)[0])
    assert seen <= set(FAMILIES), seen - set(FAMILIES)
    assert MAX_LENGTH < 10_000


def test_freeze_report_counts_flagged_media_and_what_reopen_would_open(server: Server) -> None:
    import json
    import subprocess
    import sys

    server.configure(_freeze(server, "enforce, date after the upload"))
    hs = server.hs
    base = [sys.executable, "-m", "synapse_msc3916", "freeze-report", "-c", str(hs.config_path)]
    out = subprocess.run(base + ["--json", "--histogram"], capture_output=True, text=True,
                         check=True, cwd=hs.dir, env=hs.env())
    report = json.loads(out.stdout)
    size = len(png())
    assert report["synapse_enforces_flag"] is True
    assert report["local"]["before"]["flagged"] == {"media": 1, "bytes": size}
    assert report["local"]["before"]["not_flagged"] == {"media": 0, "bytes": 0}
    assert report["local"]["frozen"]["media"] == 0
    assert report["reopen_flagged_media_would_open"]["total"] == {"media": 1, "bytes": size}
    months = report["histogram"]
    assert sum(row["local"] for row in months) == 1
    text = subprocess.run(base + ["--histogram"], capture_output=True, text=True, check=True,
                          cwd=hs.dir, env=hs.env()).stdout
    assert "reopen_flagged_media: true would open 1 media" in text
    assert "freeze.after" in text.split("Media per month", 1)[1]
    assert "#" in text


def test_reopen_flagged_media_config() -> None:
    from synapse.module_api.errors import ConfigError

    from synapse_msc3916.config import FreezeConfig

    base = {"after": "2024-09-04T00:00:00Z"}
    assert FreezeConfig.parse(base).reopen_flagged_media is False  # type: ignore[union-attr]
    assert FreezeConfig.parse({**base, "reopen_flagged_media": True}).reopen_flagged_media  # type: ignore[union-attr]
    with pytest.raises(ConfigError) as e:
        FreezeConfig.parse({**base, "reopen_flagged_media": "yes"})
    assert str(e.value) == "synapse_msc3916: freeze.reopen_flagged_media: must be true or false, not 'yes'"


def test_router_does_not_import_the_module() -> None:
    """router.py gets a RouterContext; the module<->router import circle is gone."""
    import ast
    from pathlib import Path

    import synapse_msc3916.router as router

    tree = ast.parse(Path(router.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "synapse_msc3916.module" not in imported
