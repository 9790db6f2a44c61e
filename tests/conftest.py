"""pytest fixtures that start real servers (see harness.py) and always stop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.harness import TOPOLOGY, SeaweedFS, Synapse, make_synapse

# These machines are shared and noisy: a property test must fail on a wrong answer, never
# on a slow one (Hypothesis' default 200 ms deadline made the config fuzzers flaky under load).
settings.register_profile("shared-machine", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared-machine")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "single_process: a test of one Synapse process's own listeners; not run on workers"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TOPOLOGY != "workers":
        return
    skip = pytest.mark.skip(reason="single-process test (MSC3916_TOPOLOGY=workers)")
    for item in items:
        if item.get_closest_marker("single_process"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _shared_servers() -> Iterator[None]:
    """Stop the PostgreSQL and Redis servers the workers topology started, by PID."""
    yield
    if TOPOLOGY == "workers":
        from tests.harness_workers import stop_shared

        stop_shared()


@pytest.fixture
def synapse_factory(tmp_path: Path) -> Iterator[Callable[..., Synapse]]:
    """Build (not start) Synapse servers in the test's directory; all are stopped after."""
    servers: list[Synapse] = []
    counter = iter(range(1000))

    def make(**kwargs: Any) -> Synapse:
        name = kwargs.pop("name", f"hs{next(counter)}")
        server = make_synapse(tmp_path / name, name=name, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def synapse(synapse_factory: Callable[..., Synapse]) -> Synapse:
    """One running Synapse with the module (default config)."""
    return synapse_factory().start()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


def start_federation_pair(base: Path, **kwargs: Any) -> tuple[Synapse, Synapse]:
    """Two homeservers federating over TLS on loopback (server names with explicit ports)."""
    a = make_synapse(base / "a", tls=True, name="a", **kwargs)
    b = make_synapse(base / "b", tls=True, name="b", **kwargs)
    a.start()
    try:
        b.start()
    except Exception:
        a.stop()
        raise
    return a, b


@pytest.fixture(scope="module")
def federation_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Synapse, Synapse]]:
    """Two federating homeservers with the module, Synapse's defaults otherwise."""
    a, b = start_federation_pair(tmp_path_factory.mktemp("federation"))
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
