"""synapse-msc3916: authenticated media on every deployed path, a dated media freeze and
de-duplicated media storage, as a Synapse module and a media storage provider.

The two entry points are imported on first use, so that the command-line tools
(`synapse-msc3916 keys ...`) start without loading Synapse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synapse_msc3916.module import AuthenticatedMediaModule
    from synapse_msc3916.storage.provider import DedupStorageProvider

__all__ = ["AuthenticatedMediaModule", "DedupStorageProvider"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "AuthenticatedMediaModule":
        from synapse_msc3916.module import AuthenticatedMediaModule

        return AuthenticatedMediaModule
    if name == "DedupStorageProvider":
        from synapse_msc3916.storage.provider import DedupStorageProvider

        return DedupStorageProvider
    raise AttributeError(f"module 'synapse_msc3916' has no attribute {name!r}")
