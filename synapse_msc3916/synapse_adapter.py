"""The one place that touches Synapse beyond ``synapse.module_api``.

Everything else in the package talks to Synapse through the functions and names here.
The module reuses Synapse's own machinery (servlets, the media repository, the federation
``Authenticator`` and keyring, the storage-provider types) rather than re-implementing it;
the price is that these are internal APIs, so this file pins the Synapse release line it
was written against (``SUPPORTED_SYNAPSE``) and keeps each use small and named.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import synapse
from synapse.api.errors import Codes, NotFoundError, SynapseError
from synapse.federation.transport.server._base import Authenticator
from synapse.media._base import Responder
from synapse.media.media_repository import MediaRepository
from synapse.media.media_storage import MultipartFileConsumer
from synapse.media.thumbnailer import ThumbnailProvider
from synapse.module_api import DirectServeJsonResource, ModuleApi
from synapse.rest.client.versions import VersionsRestServlet
from synapse.util.stringutils import parse_and_validate_server_name
from twisted.web.resource import Resource

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

SUPPORTED_SYNAPSE = ("1.163.",)
"""The Synapse release lines this adapter was written and tested against."""

__all__ = [
    "Codes",
    "NotFoundError",
    "Responder",
    "SynapseError",
]


def check_synapse_version() -> None:
    """Refuse to run on a Synapse whose internals this adapter has not been checked on."""
    version = synapse.__version__
    if not version.startswith(SUPPORTED_SYNAPSE):
        from synapse.module_api.errors import ConfigError

        raise ConfigError(
            f"synapse_msc3916 supports matrix-synapse {', '.join(v + 'x' for v in SUPPORTED_SYNAPSE)}"
            f" but this is {version}"
        )


def homeserver(api: ModuleApi) -> HomeServer:
    """The HomeServer behind a ModuleApi (private, hence here)."""
    return api._hs  # noqa: SLF001


def can_load_media_repo(hs: HomeServer) -> bool:
    return bool(hs.config.media.can_load_media_repo)


def is_mine_server_name(hs: HomeServer, server_name: str) -> bool:
    return bool(hs.is_mine_server_name(server_name))


def validate_server_name(server_name: str) -> None:
    """Raise 400 M_INVALID_PARAM for a server name Synapse would refuse."""
    try:
        parse_and_validate_server_name(server_name)
    except ValueError:
        raise SynapseError(
            400, f"Invalid server name: {server_name[:255]!r}", Codes.INVALID_PARAM
        ) from None


def sso_icon_media(hs: HomeServer) -> frozenset[tuple[str, str]]:
    """The mxc:// icons of the configured SSO identity providers.

    The login page shows them to users who have no access token yet, so a freeze must
    never hide them.
    """
    icons: set[tuple[str, str]] = set()
    providers = list(getattr(hs.config.oidc, "oidc_providers", ()) or ())
    providers.append(getattr(hs.config, "cas", None))
    for provider in providers:
        icon = getattr(provider, "idp_icon", None)
        if isinstance(icon, str) and icon.startswith("mxc://"):
            server, _, media_id = icon[len("mxc://") :].partition("/")
            if server and media_id:
                icons.add((server, media_id))
    return frozenset(icons)


# ---------------------------------------------------------------------------
# Listener routing
# ---------------------------------------------------------------------------

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
            names = listeners.get(_port_key(port))
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


def _port_key(port: Any) -> Any:
    try:
        host = port.getHost()
    except Exception:
        return None
    return getattr(host, "port", None) or getattr(host, "name", None)


def _http_listener_configs(hs: HomeServer) -> dict[Any, ListenerNames]:
    configs = (
        hs.config.worker.worker_listeners
        if hs.config.worker.worker_app
        else hs.config.server.listeners
    )
    result: dict[Any, ListenerNames] = {}
    for listener in configs:
        if listener.type != "http" or listener.http_options is None:
            continue
        names = frozenset(
            name for res in listener.http_options.resources for name in res.names
        )
        key = getattr(listener, "port", None) or getattr(listener, "path", None)
        result[key] = names
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
    from twisted.web.resource import EncodingResourceWrapper

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


class VersionsResource(DirectServeJsonResource):
    """Synapse's own ``/versions`` servlet, with the module's unstable features added."""

    isLeaf = True

    def __init__(self, hs: HomeServer, features: dict[str, bool]):
        super().__init__()
        self._servlet = VersionsRestServlet(hs)
        self._features = features

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, Any]:
        code, body = await self._servlet.on_GET(request)
        body.setdefault("unstable_features", {}).update(self._features)
        return code, body


def federation_authenticator(hs: HomeServer) -> Authenticator:
    return Authenticator(hs)


def federation_ratelimiter(hs: HomeServer) -> Any:
    return hs.get_federation_ratelimiter()


# ---------------------------------------------------------------------------
# Gating Synapse's unauthenticated media reads (freeze, signed federation)
# ---------------------------------------------------------------------------

# gate(request or None, server_name or None, media_id) -> True: serve regardless of
# Synapse's per-media `authenticated` flag; False: leave the decision to Synapse; or
# raise (e.g. NotFoundError) to refuse before anything is read or fetched.
Gate = Callable[[Any, str | None, str], Awaitable[bool]]

_gate: Gate | None = None

_GATED_METHODS: tuple[tuple[type, str, bool], ...] = (
    (MediaRepository, "get_local_media", False),
    (MediaRepository, "get_remote_media", True),
    (ThumbnailProvider, "respond_local_thumbnail", False),
    (ThumbnailProvider, "select_or_generate_local_thumbnail", False),
    (ThumbnailProvider, "respond_remote_thumbnail", True),
    (ThumbnailProvider, "select_or_generate_remote_thumbnail", True),
)


def install_media_gate(gate: Gate) -> None:
    """Route every unauthenticated media read of this process through ``gate``.

    Synapse's legacy servlets ask the media repository with ``allow_authenticated=False``;
    that flag, not the request path, is what marks a read as unauthenticated, so deciding
    here cannot be sidestepped by another spelling of the path. Installed once per process.
    """
    global _gate
    _gate = gate
    for cls, name, remote in _GATED_METHODS:
        original = getattr(cls, name)
        if getattr(original, "_msc3916_gated", False):
            continue
        setattr(cls, name, _gated(original, remote))


def _gated(method: Callable[..., Awaitable[None]], remote: bool) -> Callable[..., Any]:
    signature = inspect.signature(method)

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        gate = _gate
        if gate is None:
            return await method(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments.get("allow_authenticated", True):
            return await method(*args, **kwargs)
        server_name = bound.arguments.get("server_name") if remote else None
        if await gate(bound.arguments.get("request"), server_name, bound.arguments["media_id"]):
            bound.arguments["allow_authenticated"] = True
        # Remote media is fetched the way the authenticated endpoints fetch it: signed
        # federation first, Synapse's own fallback to the legacy endpoint after.
        for flag in ("use_federation_endpoint", "use_federation"):
            if flag in bound.arguments:
                bound.arguments[flag] = True
        return await method(*bound.args, **bound.kwargs)

    wrapper._msc3916_gated = True  # type: ignore[attr-defined]
    return wrapper


# ---------------------------------------------------------------------------
# Synapse bug workaround: zero-byte media over federation
# ---------------------------------------------------------------------------


def fix_zero_byte_multipart() -> None:
    """Make ``multipart/mixed`` federation answers whole for empty files.

    Synapse 1.163's ``MultipartFileConsumer`` writes its JSON part and file headers on the
    first ``write()``, which never comes for an empty file; the answer then declares a
    ``Content-Length`` it never sends and the requesting server times out with 502.
    Writing an empty chunk before the closing boundary fixes exactly that case.
    """
    original = MultipartFileConsumer.unregisterProducer
    if getattr(original, "_msc3916_fixed", False):
        return

    @functools.wraps(original)
    def unregisterProducer(self: MultipartFileConsumer) -> None:
        if not self.file_headers_written:
            self.write(b"")
        original(self)

    unregisterProducer._msc3916_fixed = True  # type: ignore[attr-defined]
    MultipartFileConsumer.unregisterProducer = unregisterProducer  # type: ignore[method-assign]


# --- Storage provider support ---


def storage_module_api(hs: HomeServer) -> ModuleApi:
    """The ModuleApi a storage provider uses: providers get the HomeServer, not an API."""
    return hs.get_module_api()


async def run_db_read_committed(hs: HomeServer, desc: str, func: Callable[..., Any], *args: Any) -> Any:
    """A database transaction at READ COMMITTED (PostgreSQL; SQLite serialises anyway).

    Synapse runs transactions at REPEATABLE READ, where PostgreSQL aborts every
    transaction but one when several update the same row at once: exactly what
    concurrent uploads of the same content do to its blob row. Synapse retries an aborted
    transaction only a few times, so a burst of identical uploads failed. At READ
    COMMITTED the later updates wait for the earlier ones and then apply.
    """
    from synapse.storage.engines._base import IsolationLevel

    return await hs.get_datastores().main.db_pool.runInteraction(
        desc, func, *args, isolation_level=IsolationLevel.READ_COMMITTED
    )


def storage_reactor(hs: HomeServer) -> Any:
    return hs.get_reactor()


def media_store_path(hs: HomeServer) -> str:
    return str(hs.config.media.media_store_path)


def local_media_storage_enabled(hs: HomeServer) -> bool:
    return bool(getattr(hs.config.media, "enable_local_media_storage", True))


def provider_store_synchronous(hs: HomeServer, provider_class: type) -> list[bool]:
    """``store_synchronous`` of every configured provider entry using ``provider_class``."""
    return [
        bool(wrapper.store_synchronous)
        for cls, _parsed, wrapper in hs.config.media.media_storage_providers
        if cls is provider_class
    ]


def storage_config_error(message: str) -> Exception:
    from synapse.module_api.errors import ConfigError

    return ConfigError(message)


def storage_not_spam() -> Any:
    from synapse.module_api import NOT_SPAM

    return NOT_SPAM
