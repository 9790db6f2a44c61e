"""Running on many Synapse releases: start-up probes, fallbacks, fail-closed paths.

The module relies on Synapse internals (see ``synapse_msc3916/synapse_adapter/``). These
tests show what happens when one of them changes: at start-up Synapse refuses to start
with one line; at run time the media gate refuses the read; on a release newer than the
tested range it starts with one WARNING. ``make test-compat`` runs the tests marked
``compat`` (here and in the other files) on each older tested release.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import synapse

from synapse_msc3916 import __version__
from synapse_msc3916.synapse_adapter import media_gate, probes
from tests.harness import Synapse, request

SYNAPSE_VERSION = probes._version_tuple(synapse.__version__)


# --- start-up probes, end to end ------------------------------------------------------------


@pytest.mark.compat
@pytest.mark.single_process
def test_missing_internal_stops_synapse_with_one_line(synapse_factory: Callable[..., Synapse]) -> None:
    hs = synapse_factory()
    hs.config["modules"].insert(0, {"module": "tests.synapse_breaker.SynapseBreaker", "config": {}})
    hs.write_config()
    code, output = hs.start_expecting_failure()
    assert code != 0
    lines = [line for line in output.splitlines() if "cannot run on Synapse" in line]
    assert len(lines) == 1, output
    line = lines[0]
    assert f"synapse_msc3916 {__version__} cannot run on Synapse {synapse.__version__.split()[0]}" in line
    assert "MediaRepository.get_local_media lacks parameter(s) allow_authenticated" in line
    assert "Traceback" not in output


@pytest.mark.compat
@pytest.mark.single_process
def test_legacy_servlet_that_bypasses_the_gate_stops_synapse(synapse_factory: Callable[..., Synapse]) -> None:
    """Issue 18: a release whose legacy download reads media through another method.

    Before the call-path probe, Synapse started (every wrapped method still had its
    parameters) and served legacy downloads without the gate: no line was printed.
    """
    hs = synapse_factory()
    hs.config["modules"].insert(0, {"module": "tests.synapse_servlet_breaker.ServletBypassBreaker", "config": {}})
    hs.write_config()
    code, output = hs.start_expecting_failure()
    assert code != 0
    lines = [line for line in output.splitlines() if "cannot run on Synapse" in line]
    assert len(lines) == 1, output
    assert "synapse.rest.media.download_resource.DownloadResource.on_GET does not have the expected shape" in lines[0]
    assert "get_local_media" in lines[0] and "Traceback" not in output


# --- the gate at run time -------------------------------------------------------------------


@pytest.fixture
def gate_installed() -> Iterator[list[Any]]:
    """A gate that records its calls, installed for the test only."""
    calls: list[Any] = []

    async def gate(request: Any, server_name: str | None, media_id: str) -> tuple[bool, Any]:
        calls.append((server_name, media_id))
        return media_gate.Access.SYNAPSE, None  # leave the decision to Synapse, no outcome callback

    previous = media_gate._gate
    media_gate._gate = gate
    try:
        yield calls
    finally:
        media_gate._gate = previous


def test_gate_refuses_a_call_whose_arguments_do_not_bind(
    gate_installed: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    served: list[Any] = []

    async def get_local_media(
        self: Any, request: Any, media_id: str, name: str | None, max_timeout_ms: int,
        allow_authenticated: bool = True,
    ) -> None:
        served.append(media_id)

    wrapper = media_gate.gated(get_local_media, remote=False, flag=None)
    # How the wrapper reads a normal call: gate consulted, then served.
    asyncio.run(wrapper(None, "req", "abc", None, 1000, allow_authenticated=False))
    assert gate_installed == [(None, "abc")] and served == ["abc"]
    # An argument the wrapped method does not know (a future Synapse's call): refused.
    with caplog.at_level(logging.ERROR, logger=media_gate.__name__):
        with pytest.raises(synapse.api.errors.NotFoundError) as e:
            asyncio.run(wrapper(None, "req", "abc", None, 1000, allow_authenticated=False, future_flag=1))
    assert e.value.code == 404 and e.value.errcode == "M_NOT_FOUND"
    assert served == ["abc"], "the unbound call must not reach Synapse"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "refusing a media read" in errors[0].getMessage()
    assert "get_local_media" in errors[0].getMessage()


def test_gate_refuses_when_a_parameter_it_reads_is_gone(gate_installed: list[Any]) -> None:
    served: list[Any] = []

    async def get_local_media(self: Any, request: Any, media_id: str, name: str | None) -> None:
        served.append(media_id)

    wrapper = media_gate.gated(get_local_media, remote=False, flag=None)
    with pytest.raises(synapse.api.errors.NotFoundError):
        asyncio.run(wrapper(None, "req", "abc", None))
    assert served == [] and gate_installed == []


@pytest.mark.parametrize(
    ("access", "allow_authenticated", "signed"),
    [("SYNAPSE", False, False), ("REOPENED", True, False), ("AUTHENTICATED", True, True)],
)
def test_only_reads_the_module_authenticated_use_signed_federation(
    access: str, allow_authenticated: bool, signed: bool
) -> None:
    """Issue 18: re-opening (or letting Synapse decide) never turns on signed federation."""
    calls: list[tuple[bool, bool]] = []

    async def get_remote_media(
        self: Any, request: Any, server_name: str, media_id: str, name: str | None,
        max_timeout_ms: int, ip_address: str, use_federation_endpoint: bool,
        allow_authenticated: bool = True,
    ) -> None:
        calls.append((use_federation_endpoint, allow_authenticated))

    async def gate(request: Any, server_name: str | None, media_id: str) -> tuple[Any, Any]:
        return media_gate.Access[access], None

    previous, media_gate._gate = media_gate._gate, gate
    try:
        wrapper = media_gate.gated(get_remote_media, remote=True, flag="use_federation_endpoint")
        asyncio.run(wrapper(None, None, "a.example", "id", None, 1000, "127.0.0.1", False, allow_authenticated=False))
    finally:
        media_gate._gate = previous
    assert calls == [(signed, allow_authenticated)]


class _Request:
    def __init__(self, code: int):
        self.code = code


@pytest.mark.parametrize(
    ("code", "raises", "expected"),
    [(200, None, "SERVED"), (304, None, "SERVED"), (404, None, "NOT_SERVED"), (400, None, "NOT_SERVED"),
     (200, "not_found", "REFUSED"), (200, "bad_gateway", "NOT_SERVED")],
)
def test_outcome_counts_only_reads_that_served(code: int, raises: str | None, expected: str) -> None:
    """Issue 18: Synapse's own 404 (respond_404, returning normally) is not a served read."""
    from synapse.api.errors import NotFoundError, SynapseError

    ended: list[Any] = []

    async def get_local_media(
        self: Any, request: Any, media_id: str, name: str | None, max_timeout_ms: int,
        allow_authenticated: bool = True,
    ) -> None:
        if raises == "not_found":
            raise NotFoundError()
        if raises == "bad_gateway":
            raise SynapseError(502, "Failed to fetch remote media")

    async def gate(request: Any, server_name: str | None, media_id: str) -> tuple[Any, Any]:
        return media_gate.Access.SYNAPSE, ended.append

    request = _Request(code)
    previous, media_gate._gate = media_gate._gate, gate
    try:
        wrapper = media_gate.gated(get_local_media, remote=False, flag=None)
        try:
            asyncio.run(wrapper(None, request, "abc", None, 1000, allow_authenticated=False))
        except SynapseError:
            assert raises is not None
    finally:
        media_gate._gate = previous
    assert ended == [media_gate.Read[expected]]
    assert media_gate.gate_decided(request)


@pytest.mark.compat
@pytest.mark.single_process
def test_gate_refuses_reads_synapse_calls_in_an_unknown_way(synapse_factory: Callable[..., Synapse]) -> None:
    """End to end: a release whose media servlet passes the gated method an unknown argument."""
    hs = synapse_factory(extra_config={"enable_authenticated_media": False})
    hs.config["modules"].append({"module": "tests.synapse_breaker.RuntimeBreaker", "config": {}})
    hs.write_config()
    hs.start()
    token = hs.register("alice")
    media_id = hs.upload(token, b"public before the breakage", "text/plain", "a.txt")
    r = hs.get(f"/_matrix/media/v3/download/{hs.server_name}/{media_id}")
    assert r.status == 404 and r.json()["errcode"] == "M_NOT_FOUND", r
    log = hs.log_file.read_text(errors="replace")
    assert "ERROR" in log and "refusing a media read" in log and "get_local_media" in log


@pytest.mark.compat
@pytest.mark.single_process
def test_legacy_response_the_gate_did_not_decide_is_refused(synapse_factory: Callable[..., Synapse]) -> None:
    """Issue 18: a legacy read that reaches Synapse's responder without the gate.

    Before the run-time check, the bypassing servlet served the bytes (200, the file's
    content) although the gate never saw the read.
    """
    hs = synapse_factory(extra_config={"enable_authenticated_media": False})
    hs.config["modules"].append({"module": "tests.synapse_servlet_breaker.ResponderBypassBreaker", "config": {}})
    hs.write_config()
    hs.start()
    token = hs.register("alice")
    content = b"public, but the gate never saw this read"
    media_id = hs.upload(token, content, "text/plain", "a.txt")
    for method in ("GET", "HEAD"):
        r = request(method, hs.base_url, f"/_matrix/media/v3/download/{hs.server_name}/{media_id}")
        assert r.status == 404, (method, r)
        assert content not in r.body and r.header("content-disposition") is None
        if method == "GET":
            assert r.json()["errcode"] == "M_NOT_FOUND"
    # The same read through the MSC1902 client path (rewritten to the legacy servlet).
    r = hs.get(f"/_matrix/client/r0/media/download/{hs.server_name}/{media_id}")
    assert r.status == 404 and content not in r.body, r
    # The authenticated endpoint does not use the legacy servlet: still served.
    assert hs.get(f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}", token).body == content
    log = hs.log_file.read_text(errors="replace")
    errors = [line for line in log.splitlines() if " - ERROR - " in line and "did not decide" in line]
    assert len(errors) == 3, errors
    assert f"/_matrix/media/v3/download/{hs.server_name}/{media_id}" in errors[0]


# --- the tested range -----------------------------------------------------------------------


@pytest.fixture
def fresh_check(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def run(version: str) -> None:
        monkeypatch.setattr(probes, "_checked", False)
        monkeypatch.setattr(probes, "_synapse_version", lambda: version)
        probes.check_synapse()

    return run


def test_newer_release_starts_with_one_warning_naming_the_tested_range(
    fresh_check: Callable[[str], None], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=probes.__name__):
        fresh_check("1.170.0")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"{probes.OLDEST_TESTED} to {probes.NEWEST_TESTED}" in warnings[0] and "1.170.0" in warnings[0]


def test_tested_release_starts_without_warning(
    fresh_check: Callable[[str], None], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=probes.__name__):
        fresh_check(probes.NEWEST_TESTED)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_failed_probe_is_one_config_error_naming_internal_and_module_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from synapse.module_api.errors import ConfigError

    missing = probes.Need("synapse.media.media_repository.MediaRepository.no_such_method", "a test")
    real = probes.all_needs
    monkeypatch.setattr(probes, "all_needs", lambda: [*real(), missing])
    monkeypatch.setattr(probes, "_checked", False)
    with pytest.raises(ConfigError) as e:
        probes.check_synapse()
    message = str(e.value)
    assert "\n" not in message
    assert f"synapse_msc3916 {__version__} cannot run on Synapse" in message
    assert "MediaRepository.no_such_method is missing" in message


# --- which code path this release takes ---------------------------------------------------


@pytest.mark.compat
def test_every_required_probe_passes_on_this_release() -> None:
    failures = [p for n in probes.all_needs() if not n.optional and (p := probes.problem(n))]
    assert failures == []


@pytest.mark.compat
@pytest.mark.parametrize(
    "internal",
    [
        "synapse.module_api.ModuleApi.get_current_time_msec",
        "synapse.module_api.ModuleApi.run_as_background_process",
        "synapse.module_api.ModuleApi.defer_to_threadpool",
        "synapse.storage.schema.SCHEMA_VERSION",
        "synapse.config.repository.ContentRepositoryConfig.read_config",
    ],
)
def test_optional_internal_present_exactly_from_its_release(internal: str) -> None:
    """Each version-dependent internal: this release takes the path its version implies."""
    (need,) = [n for n in probes.all_needs() if n.internal == internal and n.optional]
    expected = SYNAPSE_VERSION >= probes._version_tuple(need.since)
    assert probes.available(need) is expected, (need, synapse.__version__)


# --- constraints files ------------------------------------------------------------------------


def test_make_constraints_pins_every_locked_package_and_synapse(tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.harness import REPO_ROOT

    lock = tmp_path / "poetry.lock"
    lock.write_text(
        '[[package]]\nname = "Prometheus_Client"\nversion = "0.21.0"\n\n'
        '[[package]]\nname = "twisted"\nversion = "24.7.0"\n\n'
        '[[package]]\nname = "matrix-synapse-ldap3"\nversion = "0.3.0"\n\n'
        '[[package]]\nname = "local-thing"\nversion = "1.0"\n[package.source]\ntype = "directory"\nurl = "x"\n'
    )
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "make_constraints.py"), str(lock), "--release", "1.120.2"],
        check=True, capture_output=True, text=True,
    ).stdout
    pins = [line for line in out.splitlines() if not line.startswith("#")]
    assert pins == [
        "matrix-synapse==1.120.2", "matrix-synapse-ldap3==0.3.0", "prometheus-client==0.21.0", "twisted==24.7.0",
    ]
    for release in ("1.120.2", "1.140.0"):
        text = (REPO_ROOT / "constraints" / f"synapse-{release}.txt").read_text()
        assert f"\nmatrix-synapse=={release}\n" in text
