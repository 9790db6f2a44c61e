"""Media-gate seam: every unauthenticated media read of this process goes through a gate.

Synapse's legacy servlets ask the media repository with ``allow_authenticated=False``;
that flag, not the request path, is what marks a read as unauthenticated, so deciding
here cannot be sidestepped by another spelling of the path. The wrappers read the
arguments by name, so each wrapped method's parameters are probed at start-up, and a call
whose arguments do not bind as expected at run time is refused (fail closed). That the
legacy servlets still call these methods is probed too (``_SERVLETS``), and each read the
gate decided is marked on its request, so that the router can refuse a legacy response
that reached Synapse's responder some other way (``gate_decided``).
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.api.errors import NotFoundError
from synapse.media.media_repository import MediaRepository
from synapse.media.thumbnailer import ThumbnailProvider

from synapse_msc3916.read_guard import REFUSED_ERROR
from synapse_msc3916.synapse_adapter.probes import Need, attributes_used, method, source_mentions

logger = logging.getLogger(__name__)


class Access(enum.Enum):
    """What the gate lets one unauthenticated read do beyond what Synapse alone would."""

    # Nothing: Synapse's per-media `authenticated` flag refuses what it refuses, and remote
    # media is fetched the way Synapse chose for this endpoint (its legacy one).
    SYNAPSE = "synapse"
    # Served whatever Synapse's flag says (the admin's explicit reopen_flagged_media), but
    # fetched exactly as Synapse chose: re-opening is not an authentication, so it never
    # makes this server fetch with its own signature what the origin protects.
    REOPENED = "reopened"
    # The module authenticated the request itself (a verified X-Matrix signature): served
    # and fetched like Synapse's authenticated endpoints, over signed federation.
    AUTHENTICATED = "authenticated"


class Read(enum.Enum):
    """How a gated read ended, for the counters."""

    # A response below 400 (the media, or 304 Not Modified) was sent.
    SERVED = "served"
    # Synapse refused it (NotFoundError: its per-media flag, quarantine, remote media it
    # will not fetch for this read).
    REFUSED = "refused"
    # Synapse answered without the media: its own 404 for unknown media, a failed fetch.
    NOT_SERVED = "not_served"


# Told once the wrapped read is over how it ended, so that the module counts only what
# was really served.
Outcome = Callable[[Read], None]

# gate(request or None, server_name or None, media_id) -> (access, outcome), or raise
# (e.g. NotFoundError) to refuse before anything is read or fetched.
Gate = Callable[[Any, str | None, str], Awaitable[tuple[Access, Outcome | None]]]

_LOCAL = ("request", "media_id", "allow_authenticated")
_REMOTE = ("request", "server_name", "media_id", "allow_authenticated")

# (class, method, remote, the flag that makes a remote read use signed federation)
_GATED_METHODS: tuple[tuple[type, str, bool, str | None], ...] = (
    (MediaRepository, "get_local_media", False, None),
    (MediaRepository, "get_remote_media", True, "use_federation_endpoint"),
    (ThumbnailProvider, "respond_local_thumbnail", False, None),
    (ThumbnailProvider, "select_or_generate_local_thumbnail", False, None),
    (ThumbnailProvider, "respond_remote_thumbnail", True, "use_federation"),
    (ThumbnailProvider, "select_or_generate_remote_thumbnail", True, "use_federation"),
)

# The legacy servlets' handlers, and what each reads on which of its attributes: every
# gated method it needs, and nothing else but the harmless extras. A release whose
# servlet reads media some other way would otherwise leave the gate (and the freeze)
# silently off for it.
_SERVLETS: tuple[tuple[str, str, dict[str, tuple[frozenset[str], frozenset[str]]]], ...] = (
    (
        "synapse.rest.media.download_resource.DownloadResource.on_GET",
        "legacy downloads must read media only through the gated get_local_media/get_remote_media",
        {"media_repo": (frozenset({"get_local_media", "get_remote_media"}), frozenset())},
    ),
    (
        "synapse.rest.media.thumbnail_resource.ThumbnailResource.on_GET",
        "legacy thumbnails must read media only through the gated ThumbnailProvider methods",
        {
            "thumbnail_provider": (
                frozenset({name for cls, name, _, _ in _GATED_METHODS if cls is ThumbnailProvider}),
                frozenset(),
            ),
            "media_repo": (frozenset(), frozenset({"mark_recently_accessed"})),
            "media_storage": (frozenset(), frozenset()),
        },
    ),
)


def _reaches_only_gated(handler: Any, uses: dict[str, tuple[frozenset[str], frozenset[str]]]) -> bool:
    for owner, (required, extras) in uses.items():
        used = attributes_used(handler, owner)
        if used is None or not required <= used or not used <= required | extras:
            return False
    return True


NEEDS = [
    *(
        method(
            f"{cls.__module__}.{cls.__qualname__}.{name}",
            "the unauthenticated-read gate (freeze, signed federation)",
            params=(_REMOTE if remote else _LOCAL) + ((flag,) if flag else ()),
        )
        for cls, name, remote, flag in _GATED_METHODS
    ),
    *(
        Need(handler, why, check=functools.partial(_reaches_only_gated, uses=uses))
        for handler, why, uses in _SERVLETS
    ),
    Need(
        "synapse.rest.media.media_repository_resource.MediaRepositoryResource.register_servlets",
        "the legacy download and thumbnail are served by the probed servlets",
        check=lambda register: source_mentions(register, "DownloadResource(")
        and source_mentions(register, "ThumbnailResource("),
    ),
]

# Set on a request once the gate has decided its read (see ``gate_decided``).
_DECIDED_ATTR = "_msc3916_gate_decided"


def gate_decided(request: Any) -> bool:
    """Whether the gate decided a media read of this request (the router's run-time check)."""
    return bool(getattr(request, _DECIDED_ATTR, False))


def _mark_decided(request: Any) -> None:
    try:
        setattr(request, _DECIDED_ATTR, True)
    except AttributeError:  # not a request object: nothing will check it
        pass


_gate: Gate | None = None


def install_media_gate(gate: Gate) -> None:
    """Route every unauthenticated media read of this process through ``gate``."""
    global _gate
    _gate = gate
    for cls, name, remote, flag in _GATED_METHODS:
        original = getattr(cls, name)
        if getattr(original, "_msc3916_gated", False):
            continue
        setattr(cls, name, gated(original, remote, flag))


def gated(method: Callable[..., Awaitable[None]], remote: bool, flag: str | None) -> Callable[..., Any]:
    """Wrap one media-repository method with the gate (public for the fail-closed test)."""
    signature = inspect.signature(method)
    qualname = getattr(method, "__qualname__", repr(method))

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        gate = _gate
        if gate is None:
            return await method(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            allow_authenticated = bound.arguments["allow_authenticated"]
            media_id = bound.arguments["media_id"]
            request = bound.arguments["request"]
            server_name = bound.arguments["server_name"] if remote else None
        except (TypeError, KeyError) as e:
            # Synapse called this method in a way the gate does not understand: the read
            # might be unauthenticated, so refuse it rather than serve it unchecked.
            logger.error(
                "synapse_msc3916: refusing a media read: %s was called with arguments the gate"
                " cannot read (%s)", qualname, e,
            )
            raise NotFoundError(REFUSED_ERROR) from None
        if allow_authenticated:
            return await method(*args, **kwargs)
        access, outcome = await gate(request, server_name, media_id)
        if access is not Access.SYNAPSE:
            bound.arguments["allow_authenticated"] = True
        # Signed federation only for a read the module authenticated: an unauthenticated
        # read fetches remote media the way Synapse chose for it (the origin's legacy
        # endpoint), so this server never lends its signature to an anonymous client.
        if flag is not None and access is Access.AUTHENTICATED:
            bound.arguments[flag] = True
        _mark_decided(request)
        try:
            await method(*bound.args, **bound.kwargs)
        except NotFoundError:
            if outcome is not None:
                outcome(Read.REFUSED)
            raise
        except Exception:
            if outcome is not None:
                outcome(Read.NOT_SERVED)
            raise
        if outcome is not None:
            # Synapse answers unknown media with its own 404 and returns normally.
            code = getattr(request, "code", 200)
            outcome(Read.SERVED if isinstance(code, int) and code < 400 else Read.NOT_SERVED)

    wrapper._msc3916_gated = True  # type: ignore[attr-defined]
    return wrapper
