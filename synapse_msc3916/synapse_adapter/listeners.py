"""Routing seam: a router in front of each HTTP listener's own ``/_matrix`` resource."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from synapse.module_api import DirectServeJsonResource
from twisted.web.resource import EncodingResourceWrapper, Resource

from synapse_msc3916.synapse_adapter.probes import Need, method, source_mentions

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

NEEDS = [
    Need("synapse.server.HomeServer.__init__", "listening ports are recorded in hs._listening_services",
         check=lambda init: source_mentions(init, "_listening_services")),
    method("synapse.server.HomeServer.get_reactor", "routers are installed once every listener exists"),
    Need("synapse.config.server.ServerConfig.read_config", "the main process's listeners (hs.config.server)",
         check=lambda read_config: source_mentions(read_config, "self.listeners")),
    Need("synapse.config.workers.WorkerConfig.read_config", "a worker's listeners (hs.config.worker)",
         check=lambda read_config: source_mentions(read_config, "self.worker_listeners")
         and source_mentions(read_config, "self.worker_app")),
    Need("synapse.config.server.TCPListenerConfig",
         "each listener's type, bind addresses, port and resource names",
         check=lambda cls: _has_fields(cls, "type", "port", "bind_addresses", "http_options")),
    Need("synapse.config.server.HttpListenerConfig", "the resource names a listener serves",
         check=lambda cls: _has_fields(cls, "resources")),
    Need("synapse.config.server.HttpResourceConfig", "the resource names a listener serves",
         check=lambda cls: _has_fields(cls, "names")),
    Need("synapse.module_api.DirectServeJsonResource", "errors rendered like Synapse's servlets"),
    method("twisted.web.resource.EncodingResourceWrapper.__init__", "compress: true listeners (_encoders)",
           params=("original", "encoders")),
]


def _has_fields(cls: Any, *names: str) -> bool:
    fields = {a.name for a in getattr(cls, "__attrs_attrs__", ())}
    return set(names) <= fields


ListenerNames = frozenset[str]
RouterFactory = Callable[[Resource, ListenerNames], Resource]


def install_routers(hs: HomeServer, make_router: RouterFactory) -> None:
    """Put a router in front of every HTTP listener's own ``/_matrix`` resource.

    Synapse builds one resource tree per listener and offers modules no hook into it:
    a resource registered with ``register_web_resource`` is shared by every listener and
    cannot live below the leaf ``/_matrix/client`` or ``/_matrix/federation``. Synapse
    constructs modules and then, without yielding to the reactor, starts its listeners;
    a call scheduled now therefore runs once every listener exists and before the first
    request is read. It then wraps each listener's ``/_matrix`` child with a router that
    knows that listener's resource names, so no path family leaks across listeners.
    """
    reactor = hs.get_reactor()

    def _install() -> None:
        listeners = _http_listener_configs(hs)
        installed = 0
        for port in _listening_ports(hs, reactor):
            site = getattr(port, "factory", None)
            site = getattr(site, "wrappedFactory", site)  # TLS listeners wrap the site
            root = getattr(site, "resource", None)
            if root is None or not hasattr(root, "children"):
                continue
            names = _names_for(listeners, port)
            if names is None:
                continue
            matrix = root.children.get(b"_matrix")
            if matrix is None or getattr(matrix, "_msc3916_router", False):
                continue
            router = make_router(matrix, names)
            router._msc3916_router = True  # type: ignore[attr-defined]
            root.putChild(b"_matrix", router)
            installed += 1
        logger.info("synapse_msc3916: media router installed on %d listener(s)", installed)

    reactor.callLater(0, _install)  # type: ignore[arg-type]


# A listener is known by where it listens: (address, port) for TCP, (None, path) for a
# UNIX socket. Several listeners may share a port on different addresses (127.0.0.1 and
# ::1, a public and a private interface), each with its own resources.
ListenerKey = tuple[Any, Any]


def _address(text: Any) -> Any:
    """One spelling per address, so that a configured ``::0001`` matches the bound ``::1``."""
    try:
        return ipaddress.ip_address(str(text).split("%")[0]).compressed
    except ValueError:
        return text  # a host name: compared as written


def _port_key(port: Any) -> ListenerKey | None:
    try:
        host = port.getHost()
    except Exception:
        return None
    number = getattr(host, "port", None)
    if number is not None:
        return _address(getattr(host, "host", None)), number
    name = getattr(host, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return None, name


def _names_for(listeners: dict[ListenerKey, ListenerNames], port: Any) -> ListenerNames | None:
    """The resource names of the listener ``port`` belongs to.

    Exact (address, port) first; a socket bound to an address the configuration spells
    differently (a host name) falls back to its port number, but only when one listener
    alone uses that port, so two listeners sharing it never borrow each other's names.
    """
    key = _port_key(port)
    if key is None:
        return None
    if key in listeners:
        return listeners[key]
    same_port = {names for (_, number), names in listeners.items() if number == key[1]}
    return same_port.pop() if len(same_port) == 1 else None


def _http_listener_configs(hs: HomeServer) -> dict[ListenerKey, ListenerNames]:
    configs = (
        hs.config.worker.worker_listeners
        if hs.config.worker.worker_app
        else hs.config.server.listeners
    )
    result: dict[ListenerKey, ListenerNames] = {}
    for listener in configs:
        if listener.type != "http" or listener.http_options is None:
            continue
        names = frozenset(
            name for res in listener.http_options.resources for name in res.names
        )
        port = getattr(listener, "port", None)
        if port is None:  # a UNIX socket listener
            result[(None, getattr(listener, "path", None))] = names
            continue
        for address in getattr(listener, "bind_addresses", ()):
            result[(_address(address), port)] = names
    return result


def _listening_ports(hs: HomeServer, reactor: Any) -> Iterable[Any]:
    seen: list[Any] = list(hs._listening_services)  # noqa: SLF001
    # Workers do not record their HTTP ports in _listening_services.
    for reader in reactor.getReaders():
        if hasattr(reader, "factory") and reader not in seen:
            seen.append(reader)
    return seen


def resolve_resource(matrix: Resource, segments: list[bytes], request: Any) -> Resource:
    """Walk a listener's own ``/_matrix`` tree to the resource that serves ``segments``.

    Twisted's own traversal stops at the first leaf; so does this.
    """
    resource = matrix
    for segment in segments:
        if getattr(resource, "isLeaf", False):
            break
        resource = resource.getChildWithDefault(segment, request)
    return resource


def encoded_like(sibling: Resource, resource: Resource) -> Resource:
    """Wrap ``resource`` in the same response compression as Synapse's ``sibling``.

    A listener with ``compress: true`` gzips its client API (``gz_wrap``); a resource the
    module serves in its place must do the same.
    """
    if isinstance(sibling, EncodingResourceWrapper):
        return EncodingResourceWrapper(resource, sibling._encoders)  # noqa: SLF001
    return resource


class ErrorResource(DirectServeJsonResource):
    """Renders an exception exactly as a Synapse servlet would (JSON error, CORS)."""

    isLeaf = True

    def __init__(self, error: Exception):
        super().__init__()
        self._error = error

    async def _async_render(self, request: SynapseRequest) -> None:
        raise self._error
