"""Pure logic, without servers: config parsing, the route table and the freeze policy."""

from __future__ import annotations

import asyncio
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synapse.module_api.errors import ConfigError

from synapse_msc3916.config import FreezeConfig, ModuleConfig, StorageConfig, parse_instant
from synapse_msc3916.freeze import ContentTime, Decision, FreezePolicy
from synapse_msc3916.routes import Action, Family, find_route


def test_parse_instant_forms() -> None:
    expected = int(datetime.datetime(2024, 9, 4, tzinfo=datetime.UTC).timestamp() * 1000)
    assert parse_instant("2024-09-04T00:00:00Z", "k") == expected
    assert parse_instant("2024-09-04T02:00:00+02:00", "k") == expected
    assert parse_instant("2024-09-04", "k") == expected
    assert parse_instant(datetime.date(2024, 9, 4), "k") == expected
    with pytest.raises(ConfigError, match="time zone"):
        parse_instant("2024-09-04T00:00:00", "k")


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["unstable_msc3916", "msc1902", "freeze", "freeze_cache_size", "other"]),
        yaml_values | st.fixed_dictionaries({"after": yaml_values, "mode": yaml_values}),
        max_size=4,
    )
)
def test_module_config_fuzz(block: dict) -> None:
    """Whatever YAML holds, parsing gives a config or a ConfigError naming a key."""
    try:
        ModuleConfig.parse(block)
    except ConfigError as e:
        assert str(e).startswith("synapse_msc3916: ")


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["backend", "directory", "bucket", "threadpool_size", "endpoint_url",
                         "storage_class", "legacy_prefix", "read_timeout", "delete_after", "nonsense"]),
        yaml_values | st.sampled_from(["s3", "file", "media-bucket", "/tmp/x", "http://127.0.0.1:1"]),
        max_size=6,
    )
)
def test_storage_config_fuzz(block: dict) -> None:
    try:
        StorageConfig.parse(block)
    except ConfigError as e:
        assert str(e).startswith("synapse_msc3916: ")


@pytest.mark.parametrize(
    ("path", "family", "action"),
    [
        ("/_matrix/client/unstable/org.matrix.msc3916/media/download/s/m", Family.MSC3916, Action.REWRITE),
        ("/_matrix/client/unstable/org.matrix.msc3916/media/config", Family.MSC3916, Action.REWRITE),
        ("/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/m", Family.MSC3916, Action.REWRITE),
        ("/_matrix/federation/unstable/org.matrix.msc3916/media/thumbnail/m", Family.MSC3916, Action.REWRITE),
        ("/_matrix/federation/unstable/org.matrix.msc3916/media/download/o/m", Family.MSC3916,
         Action.FEDERATION_ORIGIN),
        ("/_matrix/client/r0/media/thumbnail/s/m", Family.MSC1902, Action.REWRITE),
        ("/_matrix/client/unstable/org.matrix.msc1902/media/upload", Family.MSC1902, Action.REWRITE),
        ("/_matrix/federation/v1/remote_media/download/o/m/f", Family.MSC1902, Action.SIGNED_LEGACY),
        ("/_matrix/media/v3/download/s/m", Family.LEGACY, Action.OBSERVE),
        ("/_matrix/client/v1/media/thumbnail/s/m", Family.STABLE, Action.OBSERVE),
        ("/_matrix/client/versions", Family.STABLE, Action.VERSIONS),
    ],
)
def test_route_table(path: str, family: Family, action: Action) -> None:
    found = find_route(path)
    assert found is not None
    route, _ = found
    assert (route.family, route.action) == (family, action)


@pytest.mark.parametrize(
    "path",
    [
        "/_matrix/client/unstable/org.matrix.msc3916/media/upload",
        "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/o/m",
        "/_matrix/client/v3/sync",
        "/_matrix/client/r0/media/create",
    ],
)
def test_route_table_leaves_other_paths_alone(path: str) -> None:
    found = find_route(path)
    assert found is None or found[0].action is Action.OBSERVE


class Times:
    def __init__(self, times: dict) -> None:
        self.times = times
        self.calls = 0

    async def __call__(self, server: str | None, media_id: str) -> ContentTime | None:
        """Local times with content are final; remote ones and pending (None) are not."""
        self.calls += 1
        key = (server, media_id)
        if key not in self.times:
            return None
        arrived = self.times[key]
        return ContentTime(arrived, final=server is None and arrived is not None)


def decide(policy: FreezePolicy, server: str | None, media_id: str) -> Decision:
    return asyncio.run(policy.decide(server, media_id))


def test_freeze_policy() -> None:
    times = Times({(None, "old"): 999, (None, "new"): 1000, ("r.org", "cached"): 500})
    now = [2000]
    config = FreezeConfig(after_ms=1000, enforce=True, exempt=frozenset({("me.org", "icon")}))
    policy = FreezePolicy(config, times, lambda: now[0], frozenset({("me.org", "sso")}), "me.org")
    assert decide(policy, None, "old") is Decision.SERVE
    assert decide(policy, None, "new") is Decision.REFUSE
    assert decide(policy, None, "unknown") is Decision.SERVE  # Synapse answers 404 itself
    assert decide(policy, "r.org", "cached") is Decision.SERVE
    assert decide(policy, "r.org", "uncached") is Decision.REFUSE  # would be cached now
    now[0] = 500
    assert decide(policy, "r.org", "uncached") is Decision.SERVE  # before the date
    assert decide(policy, None, "icon") is Decision.EXEMPT
    assert decide(policy, None, "sso") is Decision.EXEMPT
    # Creation times never change: the second decision costs no lookup.
    calls = times.calls
    assert decide(policy, None, "new") is Decision.REFUSE
    assert times.calls == calls


def test_freeze_judges_current_remote_copy_and_pending_uploads() -> None:
    """Issue 18 items 2 and 3: remote times are not kept; empty reservations are judged now."""
    times = Times({("r.org", "x"): 500, (None, "pending"): None})
    now = [2000]
    policy = FreezePolicy(FreezeConfig(after_ms=1000, enforce=True), times, lambda: now[0], frozenset(), "me")
    assert decide(policy, "r.org", "x") is Decision.SERVE
    times.times[("r.org", "x")] = 1500  # purged, then fetched again after the date
    assert decide(policy, "r.org", "x") is Decision.REFUSE
    assert decide(policy, None, "pending") is Decision.REFUSE  # content can only come now
    now[0] = 900
    assert decide(policy, None, "pending") is Decision.SERVE
    times.times[(None, "pending")] = 950  # its content came before the date
    now[0] = 2000
    assert decide(policy, None, "pending") is Decision.SERVE
    # Kept: local media with content, and a frozen remote copy (any later copy is later
    # still); the remote copy from before the date was not.
    assert dict(policy._cache) == {("r.org", "x"): 1500, (None, "pending"): 950}


def test_freeze_report_mode() -> None:
    times = Times({(None, "new"): 1000})
    policy = FreezePolicy(FreezeConfig(after_ms=1000, enforce=False), times, lambda: 5000, frozenset(), "me")
    assert decide(policy, None, "new") is Decision.WOULD_REFUSE


def test_freeze_cache_is_bounded() -> None:
    times = Times({(None, f"m{i}"): i for i in range(100)})
    policy = FreezePolicy(FreezeConfig(after_ms=50, enforce=True), times, lambda: 0, frozenset(), "me",
                          cache_size=10)
    for i in range(100):
        decide(policy, None, f"m{i}")
    assert len(policy._cache) == 10


@settings(max_examples=500)
@given(
    kind=st.sampled_from(["download", "thumbnail"]),
    rest=st.text(max_size=80).map(lambda s: s.replace("\x00", "")) | st.text(alphabet="%/.:aF0", max_size=30),
)
def test_media_path_checks_only_raise_matrix_errors(kind: str, rest: str) -> None:
    from synapse.api.errors import SynapseError

    from synapse_msc3916 import media_ids

    try:
        media_ids.check_media_path(kind, rest)
    except SynapseError as e:
        assert e.code == 400 and e.errcode == "M_INVALID_PARAM"
