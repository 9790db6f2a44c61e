"""The HomeServer behind the module API, and the few facts about it the module reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from synapse.api.errors import Codes, NotFoundError, SynapseError
from synapse.module_api import ModuleApi
from synapse.util.stringutils import parse_and_validate_server_name

from synapse_msc3916.synapse_adapter.probes import Need, available, method, source_mentions

if TYPE_CHECKING:
    from synapse.server import HomeServer

NEEDS = [
    method("synapse.module_api.ModuleApi.__init__", "the HomeServer behind the module API (api._hs)", params=("hs",)),
    method("synapse.api.errors.SynapseError", "Matrix errors rendered by Synapse", params=("code", "msg", "errcode")),
    Need("synapse.api.errors.NotFoundError", "404 M_NOT_FOUND"),
    Need("synapse.api.errors.Codes.INVALID_PARAM", "400 M_INVALID_PARAM for bad path segments"),
    Need("synapse.util.stringutils.parse_and_validate_server_name", "server names in paths"),
    method("synapse.server.HomeServer.is_mine_server_name", "local media vs remote", params=("server_name",)),
    Need("synapse.config.repository.ContentRepositoryConfig.read_config", "which processes serve media",
         check=lambda read_config: source_mentions(read_config, "can_load_media_repo")),
    Need("synapse.module_api.ModuleApi.server_name", "local media vs remote in the freeze"),
    method("synapse.module_api.ModuleApi.run_db_interaction", "creation times of media for the freeze",
           params=("desc", "func")),
    # media_times.py: when the content of an id reserved with /create arrives.
    method("synapse.module_api.ModuleApi.register_spam_checker_callbacks",
           "upload times of reserved media for the freeze", params=("check_media_file_for_spam",)),
    Need("synapse.module_api.NOT_SPAM", "upload times of reserved media for the freeze"),
    method("synapse.module_api.ModuleApi.sleep", "retries of the upload-times table", params=("seconds",)),
    Need("synapse.media.media_storage.MediaStorage.store_into_file",
         "upload times of reserved media for the freeze (every stored file is spam-checked)",
         check=lambda store_into_file: source_mentions(store_into_file, "check_media_file_for_spam")),
    Need("synapse.media._base.FileInfo", "upload times of reserved media for the freeze (which file)",
         check=lambda file_info: {"server_name", "file_id", "url_cache", "thumbnail"}
         <= {f.name for f in attrs.fields(file_info)}),
]

# Optional: ModuleApi.get_current_time_msec arrived in Synapse 1.125.
CLOCK = method(
    "synapse.module_api.ModuleApi.get_current_time_msec", "the freeze's clock", since="1.125",
    fallback="the HomeServer's clock (hs.get_clock().time_msec)",
)
NEEDS += [CLOCK]
if not available(CLOCK):
    NEEDS += [method("synapse.server.HomeServer.get_clock", "the freeze's clock (before 1.125)")]

__all__ = ["Codes", "NotFoundError", "SynapseError"]


def homeserver(api: ModuleApi) -> HomeServer:
    """The HomeServer behind a ModuleApi (private, hence here)."""
    return api._hs  # noqa: SLF001


def current_time_msec(api: ModuleApi) -> Callable[[], int]:
    """The homeserver's clock in milliseconds (``ModuleApi.get_current_time_msec`` from 1.125)."""
    if available(CLOCK):
        return api.get_current_time_msec
    clock = homeserver(api).get_clock()
    return clock.time_msec


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
