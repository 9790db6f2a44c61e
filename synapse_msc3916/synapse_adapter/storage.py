"""Storage seam: what the de-duplicating storage provider needs from Synapse.

Providers get the HomeServer, not a module API; the index lives in Synapse's database
(through its pool, at READ COMMITTED) and the provider reads Synapse's media config.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from synapse.media._base import Responder
from synapse.module_api import ModuleApi

from synapse_msc3916.synapse_adapter.probes import Need, available, method, source_mentions

if TYPE_CHECKING:
    from synapse.server import HomeServer

NEEDS = [
    Need("synapse.media._base.Responder", "streaming reads from the store"),
    method("synapse.server.HomeServer.get_module_api", "the module API of a storage provider"),
    method("synapse.storage.database.DatabasePool.runInteraction", "index transactions at READ COMMITTED",
           params=("desc", "func", "isolation_level")),
    Need("synapse.storage.engines._base.IsolationLevel.READ_COMMITTED", "index transactions at READ COMMITTED"),
    Need("synapse.config.repository.MediaStorageProviderConfig", "store_synchronous of each provider entry"),
    Need("synapse.module_api.NOT_SPAM", "the spam-check hand-over of the uploaded file"),
    method("synapse.module_api.ModuleApi.register_spam_checker_callbacks",
           "the spam-check hand-over of the uploaded file", params=("check_media_file_for_spam",)),
    method("synapse.module_api.ModuleApi.run_db_interaction", "the schema of the index", params=("desc", "func")),
    method("synapse.module_api.ModuleApi.sleep", "retries of the index schema and of blob claims",
           params=("seconds",)),
    Need("synapse.config.repository.ContentRepositoryConfig.read_config",
         "media_store_path and the provider entries (hs.config.media)",
         check=lambda read_config: source_mentions(read_config, "self.media_store_path")
         and source_mentions(read_config, "self.media_storage_providers")),
    method("synapse.server.HomeServer.get_reactor", "the provider's thread pool and schema start-up"),
    method("synapse.server.HomeServer.get_datastores", "the index lives in Synapse's database"),
]

# Internals only some supported releases have; each has a code path for both sides.
BACKGROUND = method(
    "synapse.module_api.ModuleApi.run_as_background_process", "the index schema at start-up",
    params=("desc", "func"), since="1.136",
    fallback="synapse.metrics.background_process_metrics.run_as_background_process",
)
THREADPOOL = method(
    "synapse.module_api.ModuleApi.defer_to_threadpool", "blob I/O on the provider's own thread pool",
    params=("threadpool", "f"), since="1.140",
    fallback="synapse.logging.context.defer_to_threadpool",
)
MEDIA_SHA256 = Need(
    "synapse.storage.schema.SCHEMA_VERSION", "the sha256 columns of the media tables (schema delta 91/01)",
    since="1.128", fallback="hash the file instead of reading Synapse's recorded SHA-256",
    check=lambda version: int(version) >= 91,
)
LOCAL_STORAGE_SWITCH = Need(
    "synapse.config.repository.ContentRepositoryConfig.read_config", "enable_local_media_storage",
    since="1.146", fallback="local media storage is always on",
    check=lambda read_config: source_mentions(read_config, "enable_local_media_storage"),
)
NEEDS += [
    BACKGROUND,
    THREADPOOL,
    MEDIA_SHA256,
    LOCAL_STORAGE_SWITCH,
    # What the fallbacks use, needed only where the module API lacks the method.
    *([] if available(BACKGROUND) else [
        method("synapse.metrics.background_process_metrics.run_as_background_process",
               "the index schema at start-up (before ModuleApi.run_as_background_process)",
               params=("desc", "func")),
    ]),
    *([] if available(THREADPOOL) else [
        method("synapse.logging.context.defer_to_threadpool",
               "blob I/O on the provider's own thread pool (before ModuleApi.defer_to_threadpool)",
               params=("reactor", "threadpool", "f")),
    ]),
]

__all__ = ["Responder"]


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


def run_as_background_process(hs: HomeServer, desc: str, func: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``func`` as a Synapse background process (own log context and metrics).

    ``ModuleApi.run_as_background_process`` arrived in Synapse 1.136; before it, the
    module API's documented route was Synapse's metrics helper, which took no
    ``server_name`` then.
    """
    if available(BACKGROUND):
        return hs.get_module_api().run_as_background_process(desc, func)  # type: ignore[arg-type]
    from synapse.metrics import background_process_metrics as bg

    if "server_name" in inspect.signature(bg.run_as_background_process).parameters:
        return bg.run_as_background_process(desc, hs.hostname, func)  # type: ignore[call-arg,arg-type]
    return bg.run_as_background_process(desc, func)  # type: ignore[arg-type,call-arg]


@functools.cache
def _threadpool_via_module_api() -> bool:
    return available(THREADPOOL)


async def defer_to_threadpool(hs: HomeServer, pool: Any, f: Callable[..., Any], *args: Any) -> Any:
    """Run ``f(*args)`` on ``pool`` keeping Synapse's log context rules.

    ``ModuleApi.defer_to_threadpool`` arrived in Synapse 1.140; it wraps exactly the
    ``synapse.logging.context`` helper used before it.
    """
    if _threadpool_via_module_api():
        return await hs.get_module_api().defer_to_threadpool(pool, f, *args)
    from synapse.logging.context import defer_to_threadpool as synapse_defer_to_threadpool

    return await synapse_defer_to_threadpool(hs.get_reactor(), pool, f, *args)


async def gather(func: Callable[[Any], Awaitable[Any]], items: Sequence[Any]) -> list[Any]:
    """``func`` on every item at once, in Synapse's log contexts: the deletion job's
    batches in flight together (which never raise: a failure would be raised at once,
    while the others still run)."""
    from synapse.module_api import make_deferred_yieldable, run_in_background
    from twisted.internet import defer

    deferreds = [run_in_background(func, item) for item in items]
    gathered: defer.Deferred[Any] = defer.gatherResults(deferreds, consumeErrors=True)
    return list(await make_deferred_yieldable(gathered))


@functools.cache
def media_tables_have_sha256() -> bool:
    """Whether Synapse records a SHA-256 per media row (schema 91, Synapse 1.128 and later).

    The columns exist once this Synapse's code has upgraded the database, which it does
    before loading modules; older code never wrote them.
    """
    return available(MEDIA_SHA256)


def storage_reactor(hs: HomeServer) -> Any:
    return hs.get_reactor()


def media_store_path(hs: HomeServer) -> str:
    return str(hs.config.media.media_store_path)


def local_media_storage_enabled(hs: HomeServer) -> bool:
    """``enable_local_media_storage`` (Synapse 1.146 and later); always on before it."""
    return bool(getattr(hs.config.media, "enable_local_media_storage", True))


def provider_store_synchronous(hs: HomeServer, provider_class: type) -> list[bool]:
    """``store_synchronous`` of every configured provider entry using ``provider_class``."""
    entries = hs.config.media.media_storage_providers
    for entry in entries:
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise storage_config_error(
                "synapse_msc3916: this Synapse's media_storage_providers entries are not"
                " (class, config, wrapper config) triples"
            )
    return [
        bool(wrapper.store_synchronous)
        for cls, _parsed, wrapper in entries
        if cls is provider_class
    ]


def storage_config_error(message: str) -> Exception:
    from synapse.module_api.errors import ConfigError

    return ConfigError(message)


def storage_not_spam() -> Any:
    from synapse.module_api import NOT_SPAM

    return NOT_SPAM
