"""Property-based: generated paths and X-Matrix headers never get a 500 or a non-JSON error."""

from __future__ import annotations

import string
import urllib.parse
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Synapse, make_synapse, request

SAFE = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%"

segment = st.one_of(
    st.text(max_size=40).map(lambda s: urllib.parse.quote(s, safe="")),
    st.text(alphabet=SAFE, max_size=40),
    st.sampled_from(["..", ".", "", "%2F", "%2f", "%00", "%", "%zz", "a" * 400, "localhost:1", "[::1]:8"]),
)

PREFIXES = [
    "/_matrix/client/unstable/org.matrix.msc3916/media/download/",
    "/_matrix/client/unstable/org.matrix.msc3916/media/thumbnail/",
    "/_matrix/client/r0/media/download/",
    "/_matrix/client/unstable/org.matrix.msc1902/media/thumbnail/",
    "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/",
    "/_matrix/federation/unstable/org.matrix.msc3916/media/thumbnail/",
    "/_matrix/federation/v1/remote_media/download/",
    "/_matrix/federation/unstable/org.matrix.msc1902/remote_media/thumbnail/",
    "/_matrix/media/v3/download/",
]

query = st.one_of(
    st.just(""),
    st.builds(
        lambda w, h, m, t: f"?width={w}&height={h}&method={m}&timeout_ms={t}",
        st.one_of(st.integers(-10, 10**12), st.text(alphabet=SAFE, max_size=5)),
        st.one_of(st.integers(-10, 10**12), st.just("")),
        st.sampled_from(["scale", "crop", "x", ""]),
        st.one_of(st.integers(-1, 10**9), st.just("abc")),
    ),
)


@pytest.fixture(scope="module")
def hs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    server = make_synapse(tmp_path_factory.mktemp("fuzz")).start()
    server.token = server.register("fuzz")  # type: ignore[attr-defined]
    yield server
    server.stop()


def assert_clean(resp, what: str) -> None:
    assert resp.status < 500 or resp.status in (502, 504), (what, resp)
    if resp.status >= 400:
        body = resp.json()
        assert isinstance(body.get("errcode"), str) and isinstance(body.get("error"), str), (what, resp)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(prefix=st.sampled_from(PREFIXES), segments=st.lists(segment, min_size=0, max_size=4), q=query)
def test_generated_paths(hs: Synapse, prefix: str, segments: list[str], q: str) -> None:
    path = prefix + "/".join(segments) + q
    resp = request("GET", hs.base_url, path, {"Authorization": f"Bearer {hs.token}"}, timeout=60)  # type: ignore[attr-defined]
    assert_clean(resp, path)
    assert b"Traceback" not in resp.body


header_text = st.text(alphabet=string.printable.replace("\n", "").replace("\r", ""), max_size=120)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prefix=st.sampled_from([p for p in PREFIXES if "federation" in p]),
    header=st.one_of(
        header_text.map(lambda s: "X-Matrix " + s),
        st.builds(
            lambda o, k, s, d: f'X-Matrix origin="{o}",key="{k}",sig="{s}",destination="{d}"',
            header_text, header_text, header_text, header_text,
        ),
        header_text,
    ),
)
def test_generated_xmatrix_headers(hs: Synapse, prefix: str, header: str) -> None:
    path = prefix + f"{hs.server_name}/abcdef"
    resp = request("GET", hs.base_url, path, {"Authorization": header.strip() or "X"}, timeout=60)
    assert_clean(resp, f"{path} {header!r}")
    assert resp.status in (400, 401, 403, 404), (header, resp)
