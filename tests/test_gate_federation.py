"""Unauthenticated reads never use authenticated (signed) federation (issue 18, item 1).

Server A protects media X (uploaded with Synapse's ``enable_authenticated_media`` on, so
A's own legacy endpoint answers 404 for it). Server B runs the module in a configuration
where its gate lets legacy reads through to Synapse: ``enable_authenticated_media: false``
(the date alone decides), the freeze in enforce mode before its date, or
``reopen_flagged_media``. An anonymous read of X through B must get what Synapse alone
would give it: B fetches over A's legacy endpoint, A refuses, B answers 404 and caches
nothing. Only an authenticated read (client v1 or MSC3916 with a token) may fetch X over
A's authenticated federation endpoint, signed with B's key.

Before the fix, every anonymous path below answered 200 with X's bytes in the first two
cases and for the reopen case (B's gate set ``use_federation*`` to True for every remote
read, so B fetched X over signed federation and cached it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Synapse, make_synapse
from tests.test_endpoints import png
from tests.test_freeze import iso

DAY_MS = 24 * 3600 * 1000

# B's configurations: (extra homeserver config, module config), by case name.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "enable_authenticated_media false": ({"enable_authenticated_media": False}, {}),
    "enable_authenticated_media false, enforce before the date": (
        {"enable_authenticated_media": False},
        {"freeze": {"after": iso(int(time.time() * 1000) + DAY_MS), "mode": "enforce"}},
    ),
    "reopen_flagged_media, before the date": (
        {"enable_authenticated_media": True},
        {"freeze": {
            "after": iso(int(time.time() * 1000) + DAY_MS), "mode": "enforce", "reopen_flagged_media": True,
        }},
    ),
}


def anonymous_paths(sn: str, mid: str) -> list[str]:
    """Every unauthenticated path family: legacy and MSC1902 client download/thumbnail."""
    paths = []
    for prefix in ("/_matrix/media/v3", "/_matrix/media/r0", "/_matrix/client/r0/media",
                   "/_matrix/client/unstable/org.matrix.msc1902/media"):
        paths += [
            f"{prefix}/download/{sn}/{mid}",
            f"{prefix}/thumbnail/{sn}/{mid}?width=32&height=32&method=scale",
        ]
    return paths


class Pair:
    """A (Synapse's defaults) and B (reconfigured, and restarted, only between cases)."""

    def __init__(self, a: Synapse, b: Synapse, case: str):
        self.a, self.b, self.case = a, b, case
        self.a_token = a.register("alice")
        self.b_token = b.register("bob")

    def configure(self, case: str) -> None:
        if case == self.case:
            return
        extra, module = CASES[case]
        self.b.config.update(extra)
        self.b.config["modules"][0]["config"] = module
        self.b.restart()
        self.case = case


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("gatefed")
    first = next(iter(CASES))
    extra, module = CASES[first]
    a = make_synapse(base / "a", tls=True, name="a")
    b = make_synapse(base / "b", tls=True, name="b", module_config=module, extra_config=extra)
    try:
        a.start()
        b.start()
        yield Pair(a, b, first)
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_anonymous_read_of_protected_remote_media_is_refused_like_synapse(pair: Pair, case: str) -> None:
    pair.configure(case)
    a, b = pair.a, pair.b
    image = png(64, 48)
    mid = a.upload(pair.a_token, image, "image/png", "protected.png")
    # A protects it: its own legacy endpoint refuses it.
    assert a.get(f"/_matrix/media/v3/download/{a.server_name}/{mid}").status == 404

    for path in anonymous_paths(a.server_name, mid):
        r = b.get(path)
        assert r.status == 404, (case, path, r)
        assert r.json()["errcode"] == "M_NOT_FOUND", (case, path, r)
        assert b"PNG" not in r.body
    assert b.sql(
        "SELECT media_id FROM remote_media_cache WHERE media_origin = ? AND media_id = ?",
        (a.server_name, mid),
    ) == [], f"{case}: B cached media A protects"
    # B never asked A's authenticated federation endpoint for it.
    assert f"/_matrix/federation/v1/media/download/{mid}" not in a.log_file.read_text(errors="replace")

    # An authenticated read through B still works, over signed federation.
    for path in (
        f"/_matrix/client/v1/media/download/{a.server_name}/{mid}",
        f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{a.server_name}/{mid}",
    ):
        r = b.get(path, pair.b_token)
        assert r.status == 200 and r.body == image, (case, path, r)
    assert f"GET /_matrix/federation/v1/media/download/{mid}" in a.log_file.read_text(errors="replace")
