"""Foundation: the module loads in a real Synapse, routes per listener and hands the rest back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.harness import Response, Synapse, free_port, request

IGNORED_HEADERS = {"date", "server"}


def comparable(resp: Response) -> tuple[int, list[tuple[str, str]], bytes]:
    headers = sorted((k.lower(), v) for k, v in resp.header_list if k.lower() not in IGNORED_HEADERS)
    return resp.status, headers, resp.body


def _listener(port: int, names: list[str]) -> dict:
    return {
        "port": port,
        "bind_addresses": ["127.0.0.1"],
        "type": "http",
        "tls": False,
        "resources": [{"names": names, "compress": False}],
    }


def two_listener_server(factory: Callable[..., Synapse], module: bool, **kw) -> tuple[Synapse, str, str]:
    client_port, federation_port = free_port(), free_port()
    hs = factory(
        listeners=[_listener(client_port, ["client"]), _listener(federation_port, ["federation"])],
        module_config={} if module else None,
        **kw,
    )
    hs.port = client_port
    hs.base_url = f"http://127.0.0.1:{client_port}"
    hs.start()
    return hs, hs.base_url, f"http://127.0.0.1:{federation_port}"


@pytest.mark.compat
def test_versions_advertises_the_unstable_features(synapse: Synapse) -> None:
    resp = synapse.get("/_matrix/client/versions")
    assert resp.status == 200
    features = resp.json()["unstable_features"]
    assert features["org.matrix.msc3916"] is True
    assert features["org.matrix.msc1902"] is True


@pytest.mark.compat
@pytest.mark.single_process
def test_each_listener_serves_only_its_own_families(synapse_factory) -> None:
    hs, client, federation = two_listener_server(synapse_factory, module=True)
    token = hs.register("alice")
    media_id = hs.upload(token, b"listener test\n", "text/plain", "a.txt")
    sn = hs.server_name
    auth = {"Authorization": f"Bearer {token}"}

    unstable_client = f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{media_id}"
    r = request("GET", client, unstable_client, auth)
    assert (r.status, r.body) == (200, b"listener test\n")
    r = request("GET", federation, unstable_client, auth)
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED"

    unstable_fed = f"/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/{media_id}"
    r = request("GET", federation, unstable_fed)
    assert r.status == 401 and r.json()["errcode"] == "M_UNAUTHORIZED"
    r = request("GET", client, unstable_fed)
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED"

    msc1902_fed = f"/_matrix/federation/v1/remote_media/download/{sn}/{media_id}"
    assert request("GET", client, msc1902_fed).status == 404
    assert request("GET", federation, msc1902_fed).status == 401

    # Federation-only resources never appear on the client listener, and vice versa.
    assert request("GET", client, "/_matrix/key/v2/server").status == 404
    assert request("GET", federation, "/_matrix/key/v2/server").status == 200
    assert request("GET", federation, "/_matrix/client/versions").status == 404


@pytest.mark.compat
@pytest.mark.single_process
def test_two_listeners_on_one_port_keep_their_own_families(synapse_factory) -> None:
    """Same port, two bind addresses (127.0.0.1 and ::1), different resources.

    Before the fix the listeners were keyed by port alone, so the second listener's
    names replaced the first's: the client listener on 127.0.0.1 answered the
    unstable client path with 404 M_UNRECOGNIZED (it had the federation listener's
    names)."""
    port = free_port()
    client_listener = _listener(port, ["client"])
    federation_listener = _listener(port, ["federation"])
    federation_listener["bind_addresses"] = ["::1"]
    hs = synapse_factory(listeners=[client_listener, federation_listener])
    hs.port, hs.base_url = port, f"http://127.0.0.1:{port}"
    hs.start()
    client, federation = hs.base_url, f"http://[::1]:{port}"
    token = hs.register("dual")
    media_id = hs.upload(token, b"one port, two listeners\n", "text/plain", "d.txt")
    sn = hs.server_name
    auth = {"Authorization": f"Bearer {token}"}

    unstable_client = f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{media_id}"
    r = request("GET", client, unstable_client, auth)
    assert (r.status, r.body) == (200, b"one port, two listeners\n"), r
    r = request("GET", federation, unstable_client, auth)
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED", r

    unstable_fed = f"/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/{media_id}"
    r = request("GET", federation, unstable_fed)
    assert r.status == 401 and r.json()["errcode"] == "M_UNAUTHORIZED", r
    r = request("GET", client, unstable_fed)
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED", r
    assert "media router installed on 2 listener(s)" in hs.output()


def test_listener_names_are_found_by_address_and_port() -> None:
    """The matching rules on their own: an address spelt differently matches, a port
    two listeners share never falls back to the other's names, a UNIX socket by path."""
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    from synapse_msc3916.synapse_adapter.listeners import _names_for

    class Port:
        def __init__(self, host: object) -> None:
            self.host = host

        def getHost(self) -> object:  # noqa: N802 (Twisted's name)
            return self.host

    client, federation, media = frozenset({"client"}), frozenset({"federation"}), frozenset({"media"})
    listeners = {
        ("127.0.0.1", 8008): client,
        ("::1", 8008): federation,
        ("0.0.0.0", 8448): media,
        (None, "/run/synapse.sock"): client,
    }
    assert _names_for(listeners, Port(IPv4Address("TCP", "127.0.0.1", 8008))) == client
    assert _names_for(listeners, Port(IPv6Address("TCP", "::1", 8008))) == federation
    # A host the configuration named otherwise: by port, only when one listener has it.
    assert _names_for(listeners, Port(IPv4Address("TCP", "10.0.0.1", 8448))) == media
    assert _names_for(listeners, Port(IPv4Address("TCP", "10.0.0.1", 8008))) is None
    assert _names_for(listeners, Port(UNIXAddress(b"/run/synapse.sock"))) == client


@pytest.mark.compat
@pytest.mark.single_process
def test_router_hands_everything_else_back_unchanged(synapse_factory) -> None:
    """Same answers, to the byte, as a Synapse without the module on the same layout."""
    with_module, c1, f1 = two_listener_server(synapse_factory, module=True)
    without, c2, f2 = two_listener_server(synapse_factory, module=False)
    for hs in (with_module, without):
        hs.token = hs.register("bob")  # type: ignore[attr-defined]
        hs.media = hs.upload(hs.token, b"same bytes", "text/plain", "x.txt")  # type: ignore[attr-defined]

    def paths(hs: Synapse) -> list[tuple[str, bool]]:
        sn, mid = hs.server_name, hs.media  # type: ignore[attr-defined]
        return [
            ("/_matrix/client/v3/capabilities", True),
            ("/_matrix/client/v1/media/config", True),
            (f"/_matrix/client/v1/media/download/{sn}/{mid}", True),
            (f"/_matrix/client/v1/media/download/{sn}/nonexistent", True),
            (f"/_matrix/media/v3/download/{sn}/{mid}", False),
            ("/_matrix/client/unknown/endpoint", False),
            ("/_matrix/unknown", False),
            ("/_matrix/federation/v1/version", False),
            ("/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/a/b", False),
        ]

    for (p1, auth), (p2, _) in zip(paths(with_module), paths(without), strict=True):
        for base1, base2 in ((c1, c2), (f1, f2)):
            h1 = {"Authorization": f"Bearer {with_module.token}"} if auth else {}  # type: ignore[attr-defined]
            h2 = {"Authorization": f"Bearer {without.token}"} if auth else {}  # type: ignore[attr-defined]
            r1 = request("GET", base1, p1, h1)
            r2 = request("GET", base2, p2, h2)
            s1, hd1, b1 = comparable(r1)
            s2, hd2, b2 = comparable(r2)
            # Bodies that name the path or server differ only by those names.
            b1 = b1.replace(with_module.server_name.encode(), b"SN").replace(with_module.media.encode(), b"MID")  # type: ignore[attr-defined]
            b2 = b2.replace(without.server_name.encode(), b"SN").replace(without.media.encode(), b"MID")  # type: ignore[attr-defined]
            assert (s1, b1) == (s2, b2), p1
            assert hd1 == hd2, p1

    # Key server answers are per-server, but both are valid and of the same shape.
    k1 = request("GET", f1, "/_matrix/key/v2/server").json()
    k2 = request("GET", f2, "/_matrix/key/v2/server").json()
    assert sorted(k1) == sorted(k2)


def test_versions_untouched_when_the_families_are_off(synapse_factory) -> None:
    on = synapse_factory(module_config={"unstable_msc3916": False, "msc1902": False}).start()
    off = synapse_factory(module_config=None).start()
    r1, r2 = on.get("/_matrix/client/versions"), off.get("/_matrix/client/versions")
    assert comparable(r1) == comparable(r2)
    sn, token = on.server_name, on.register("carol")
    mid = on.upload(token, b"x", "text/plain")
    r = on.get(f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}", token)
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED"
    r = on.get(f"/_matrix/client/r0/media/download/{sn}/{mid}", token)
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED"


@pytest.mark.single_process
@pytest.mark.parametrize(
    ("module_config", "providers", "needle"),
    [
        ({"unstable_msc3916": "yes"}, None, "unstable_msc3916"),
        ({"freeze": {"after": "yesterday"}}, None, "freeze.after"),
        ({"freeze": {"after": "2024-09-04T00:00:00Z", "mode": "maybe"}}, None, "freeze.mode"),
        ({"freeze": {"after": "2024-09-04T00:00:00Z", "exempt": ["http://x"]}}, None, "freeze.exempt"),
        ({"no_such_option": 1}, None, "no_such_option"),
        ({}, [{"module": "synapse_msc3916.DedupStorageProvider", "config": {"backend": "tape"}}], "backend"),
        ({}, [{"module": "synapse_msc3916.DedupStorageProvider", "config": {"backend": "file"}}], "directory"),
        (
            {},
            [{"module": "synapse_msc3916.DedupStorageProvider",
              "config": {"backend": "s3", "bucket": "b", "threadpool_size": 0}}],
            "bucket",
        ),
        (
            {},
            [{"module": "synapse_msc3916.DedupStorageProvider",
              "config": {"backend": "s3", "bucket": "media", "threadpool_size": 0}}],
            "threadpool_size",
        ),
    ],
)
def test_bad_config_stops_synapse_naming_the_key(synapse_factory, module_config, providers, needle) -> None:
    hs = synapse_factory(module_config=module_config, storage_providers=providers)
    code, output = hs.start_expecting_failure()
    assert code != 0
    lines = [line for line in output.splitlines() if "synapse_msc3916:" in line]
    assert len(lines) == 1, output
    assert needle in lines[0]
    assert "Traceback" not in output


@pytest.mark.compat
@pytest.mark.single_process
def test_compressed_listener(synapse_factory) -> None:
    """`compress: true` gzips module answers exactly as it gzips Synapse's own."""
    port = free_port()
    listener = _listener(port, ["client", "federation"])
    listener["resources"][0]["compress"] = True
    hs = synapse_factory(listeners=[listener])
    hs.port, hs.base_url = port, f"http://127.0.0.1:{port}"
    hs.start()
    token = hs.register("gz")
    mid = hs.upload(token, b"zip me " * 100, "text/plain", "z.txt")
    gz = {"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip"}
    for path in (
        "/_matrix/client/versions",
        f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{hs.server_name}/{mid}",
        f"/_matrix/client/v1/media/download/{hs.server_name}/{mid}",
    ):
        r = request("GET", hs.base_url, path, gz)
        assert r.status == 200 and r.header("content-encoding") == "gzip", path
