"""The one place that touches Synapse beyond ``synapse.module_api``: one file per seam.

The module reuses Synapse's own machinery (servlets, the media repository, the federation
``Authenticator`` and keyring, the storage-provider types) rather than re-implementing
it. Those are internal APIs, so each seam declares the internals it uses (``NEEDS``) and
``probes.check_synapse`` checks them all at start-up, failing closed:

    server.py      the HomeServer behind the module API, server names, SSO icons
    listeners.py   the router in front of each HTTP listener's /_matrix resource
    versions.py    Synapse's /versions servlet with the module's unstable features
    federation.py  Synapse's X-Matrix Authenticator and federation rate limiter
    media_gate.py  the gate on every unauthenticated media read (freeze, signed reads)
    multipart.py   the zero-byte multipart/mixed fix
    storage.py     database pool, media config and Responder for the storage provider
    redirect.py    where Synapse starts sending a media file: presigned redirects
    media_deletions.py  tombstone triggers on Synapse's media tables; the deletion job's timer
    probes.py      the start-up checks and the tested release range

The names below are imported from their seam on first use, so that importing the
package never imports a seam whose Synapse internals are missing: the probes report
that as one line instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from synapse_msc3916.synapse_adapter.probes import check_synapse

SEAMS = (
    "server", "listeners", "versions", "federation", "media_gate", "multipart", "storage", "redirect",
    "media_deletions",
)

_EXPORTS = {
    "server": (
        "Codes", "NotFoundError", "SynapseError", "homeserver", "can_load_media_repo",
        "is_mine_server_name", "validate_server_name", "sso_icon_media", "current_time_msec",
    ),
    "listeners": ("install_routers", "resolve_resource", "encoded_like", "ErrorResource"),
    "versions": ("VersionsResource",),
    "federation": ("federation_authenticator", "federation_ratelimiter"),
    "media_gate": ("install_media_gate", "Access", "Read", "gate_decided"),
    "multipart": ("fix_zero_byte_multipart",),
    "storage": (
        "Responder", "storage_module_api", "run_db_read_committed", "storage_reactor",
        "media_store_path", "local_media_storage_enabled", "provider_store_synchronous",
        "storage_config_error", "storage_not_spam", "run_as_background_process",
        "defer_to_threadpool", "gather", "media_tables_have_sha256",
    ),
    "redirect": ("install_fetch_hook", "RedirectingResponder"),
    "media_deletions": (
        "ensure_deletion_triggers_txn", "deletion_triggers_present_txn",
        "instance_name", "media_deletions_looping_call",
    ),
}
_SEAM_OF = {name: seam for seam, names in _EXPORTS.items() for name in names}

__all__ = [
    "SEAMS", "check_synapse",
    "Codes", "NotFoundError", "SynapseError", "homeserver", "can_load_media_repo",
    "is_mine_server_name", "validate_server_name", "sso_icon_media", "current_time_msec",
    "install_routers", "resolve_resource", "encoded_like", "ErrorResource",
    "VersionsResource", "federation_authenticator", "federation_ratelimiter",
    "install_media_gate", "Access", "Read", "gate_decided", "fix_zero_byte_multipart",
    "Responder", "storage_module_api", "run_db_read_committed", "storage_reactor",
    "media_store_path", "local_media_storage_enabled", "provider_store_synchronous",
    "storage_config_error", "storage_not_spam", "run_as_background_process",
    "defer_to_threadpool", "gather", "media_tables_have_sha256",
    "install_fetch_hook", "RedirectingResponder",
    "ensure_deletion_triggers_txn", "deletion_triggers_present_txn",
    "instance_name", "media_deletions_looping_call",
]

if TYPE_CHECKING:
    from synapse_msc3916.synapse_adapter.federation import federation_authenticator, federation_ratelimiter
    from synapse_msc3916.synapse_adapter.listeners import (
        ErrorResource,
        encoded_like,
        install_routers,
        resolve_resource,
    )
    from synapse_msc3916.synapse_adapter.media_deletions import (
        deletion_triggers_present_txn,
        ensure_deletion_triggers_txn,
        instance_name,
        media_deletions_looping_call,
    )
    from synapse_msc3916.synapse_adapter.media_gate import Access, Read, gate_decided, install_media_gate
    from synapse_msc3916.synapse_adapter.multipart import fix_zero_byte_multipart
    from synapse_msc3916.synapse_adapter.redirect import RedirectingResponder, install_fetch_hook
    from synapse_msc3916.synapse_adapter.server import (
        Codes,
        NotFoundError,
        SynapseError,
        can_load_media_repo,
        current_time_msec,
        homeserver,
        is_mine_server_name,
        sso_icon_media,
        validate_server_name,
    )
    from synapse_msc3916.synapse_adapter.storage import (
        Responder,
        defer_to_threadpool,
        gather,
        local_media_storage_enabled,
        media_store_path,
        media_tables_have_sha256,
        provider_store_synchronous,
        run_as_background_process,
        run_db_read_committed,
        storage_config_error,
        storage_module_api,
        storage_not_spam,
        storage_reactor,
    )
    from synapse_msc3916.synapse_adapter.versions import VersionsResource


def __getattr__(name: str) -> Any:
    seam = _SEAM_OF.get(name)
    if seam is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{seam}"), name)
    globals()[name] = value
    return value
