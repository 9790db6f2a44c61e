"""Media-gate seam: every unauthenticated media read of this process goes through a gate.

Synapse's legacy servlets ask the media repository with ``allow_authenticated=False``;
that flag, not the request path, is what marks a read as unauthenticated, so deciding
here cannot be sidestepped by another spelling of the path. The wrappers read the
arguments by name, so each wrapped method's parameters are probed at start-up, and a call
whose arguments do not bind as expected at run time is refused (fail closed).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.api.errors import NotFoundError
from synapse.media.media_repository import MediaRepository
from synapse.media.thumbnailer import ThumbnailProvider

from synapse_msc3916.synapse_adapter.probes import method

logger = logging.getLogger(__name__)

# Told once the wrapped read is over whether Synapse itself refused it (NotFoundError:
# its per-media `authenticated` flag, or remote media it will not fetch for this read),
# so that the module can count what was really served.
Outcome = Callable[[bool], None]

# gate(request or None, server_name or None, media_id) -> (open, outcome):
# open True: serve regardless of Synapse's per-media `authenticated` flag (a read the module
# authenticated itself, or media the admin explicitly re-opened); False: Synapse's flag
# still refuses what it refuses. Or raise (e.g. NotFoundError) to refuse before anything is
# read or fetched.
Gate = Callable[[Any, str | None, str], Awaitable[tuple[bool, Outcome | None]]]

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

NEEDS = [
    method(
        f"{cls.__module__}.{cls.__qualname__}.{name}",
        "the unauthenticated-read gate (freeze, signed federation)",
        params=(_REMOTE if remote else _LOCAL) + ((flag,) if flag else ()),
    )
    for cls, name, remote, flag in _GATED_METHODS
]

_gate: Gate | None = None

REFUSED_ERROR = "This media is not available on this endpoint"


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
        allow, outcome = await gate(request, server_name, media_id)
        if allow:
            bound.arguments["allow_authenticated"] = True
        # Remote media is fetched the way the authenticated endpoints fetch it: signed
        # federation first, Synapse's own fallback to the legacy endpoint after.
        if flag is not None:
            bound.arguments[flag] = True
        try:
            await method(*bound.args, **bound.kwargs)
        except NotFoundError:
            if outcome is not None:
                outcome(True)
            raise
        except Exception:
            if outcome is not None:
                outcome(False)
            raise
        if outcome is not None:
            outcome(False)

    wrapper._msc3916_gated = True  # type: ignore[attr-defined]
    return wrapper
