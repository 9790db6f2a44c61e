"""Storage seam: what the de-duplicating storage provider needs from Synapse.

Providers get the HomeServer, not a module API; the index lives in Synapse's database
(through its pool, at READ COMMITTED) and the provider reads Synapse's media config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from synapse.media._base import Responder
from synapse.module_api import ModuleApi

from synapse_msc3916.synapse_adapter.probes import Need, method

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
