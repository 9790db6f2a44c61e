"""Per-listener routing of the module's paths (the table is in ``routes.py``).

One ``ListenerRouter`` sits in front of each HTTP listener's own ``/_matrix`` resource.
It serves a module path only if the listener serves that family itself (client paths
where it has ``client`` or ``media``, federation paths where it has ``federation`` or
``media``); everything else goes to that listener's own Synapse resources, untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attr
from twisted.web.resource import Resource

from synapse_msc3916 import media_ids, read_guard
from synapse_msc3916 import synapse_adapter as sa
from synapse_msc3916.metrics import MEDIA_REQUESTS
from synapse_msc3916.routes import Action, Family, Listener, Route, find_route

logger = logging.getLogger(__name__)

# Set on a request whose X-Matrix signature the module has checked, so that the media
# gate lets Synapse's legacy servlet serve it as a federation read.
SIGNED_ORIGIN_ATTR = "_msc3916_signed_origin"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RouterContext:
    """What the routers need from the module, built once by ``module.py``."""

    hs: Any
    # Whether this process serves media (else only /versions is routed).
    serves_media: bool
    # Whether /versions gets the module's unstable features.
    advertises_features: bool
    versions_resource: Resource
    # feature_enabled("unstable_msc3916" | "msc1902") -> bool
    feature_enabled: Callable[[str], bool]
    # signed_resource(then) -> a resource that checks X-Matrix, then calls then(request, origin)
    signed_resource: Callable[[Callable[[Any, str], Resource]], Resource]


def families_served(names: frozenset[str]) -> frozenset[Listener]:
    served = set()
    if names & {"client", "media"}:
        served.add(Listener.CLIENT)
    if names & {"federation", "media"}:
        served.add(Listener.FEDERATION)
    return frozenset(served)


class ListenerRouter(Resource):
    def __init__(self, matrix: Resource, names: frozenset[str], context: RouterContext):
        super().__init__()
        self._matrix = matrix
        self._served = families_served(names)
        self._context = context

    # Twisted asks the parent for each path segment; we look at the whole raw path once.
    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        try:
            raw = request.path.decode("ascii")
        except UnicodeDecodeError:  # not a path Synapse serves either: let it answer
            return self._matrix.getChildWithDefault(path, request)
        found = find_route(raw)
        if found is not None:
            route, match = found
            if self._serves(route):
                kind = route.kind or match.groupdict().get("kind") or "other"
                MEDIA_REQUESTS.labels(route.family.value, kind).inc()
                if _reaches_legacy_read(route, kind):
                    read_guard.guard_unauthenticated_read(request, sa.gate_decided)
                if route.action is not Action.OBSERVE:
                    return self._dispatch(route, match, request)
                refusal = _synapse_would_crash(route, match)
                if refusal is not None:
                    return refusal
        return self._matrix.getChildWithDefault(path, request)

    def _serves(self, route: Route) -> bool:
        if not self._context.serves_media and route.action is not Action.VERSIONS:
            return False
        if route.action is Action.OBSERVE:
            return True
        if route.feature is not None and not self._context.feature_enabled(route.feature):
            return False
        if route.action is Action.VERSIONS and not self._context.advertises_features:
            return False
        return route.listener in self._served

    def _dispatch(self, route: Route, match: Any, request: Any) -> Resource:
        try:
            return self._dispatch_checked(route, match, request)
        except sa.SynapseError as e:
            return sa.ErrorResource(e)

    def _dispatch_checked(self, route: Route, match: Any, request: Any) -> Resource:
        if route.action is Action.REWRITE:
            kind = match.group("kind")
            if kind in ("download", "thumbnail"):
                rest = match.string[match.end("kind") + 1 :]
                if route.family is Family.MSC3916 and route.listener is Listener.FEDERATION:
                    media_ids.check_media_id(rest)
                else:
                    media_ids.check_media_path(kind, rest)
            return self._rewrite(route, match, request)
        if route.action is Action.VERSIONS:
            client = self._matrix.getChildWithDefault(b"client", request)
            return sa.encoded_like(client, self._context.versions_resource)
        if route.action is Action.FEDERATION_ORIGIN:
            media_ids.check_media_id(match.group("media_id"))
            origin = media_ids.check_server_name(match.group("origin"))
            if sa.is_mine_server_name(self._context.hs, origin):
                suffix = f"{match.group('kind')}/{match.group('media_id')}"
                return self._rewrite_to(f"{route.target}{suffix}", request)
            return self._context.signed_resource(lambda req, _origin: _not_found(origin))
        if route.action is Action.SIGNED_LEGACY:
            return self._signed_legacy(route, match)
        raise AssertionError(route.action)

    def _rewrite(self, route: Route, match: Any, request: Any) -> Resource:
        assert route.target is not None
        return self._rewrite_to(route.target + match.string[match.end("prefix") :], request)

    def _rewrite_to(self, new_path: str, request: Any) -> Resource:
        """Serve the request as ``new_path`` by this listener's own Synapse resource."""
        request.path = new_path.encode("ascii")
        segments = request.path.split(b"/")[2:]  # drop "" and "_matrix"
        return sa.resolve_resource(self._matrix, segments, request)

    def _signed_legacy(self, route: Route, match: Any) -> Resource:
        kind = match.group("kind")
        origin_raw = match.group("origin")
        rest = match.string[match.start("origin"):]

        def then(request: Any, signed_by: str) -> Resource:
            origin = media_ids.check_server_name(origin_raw)
            media_ids.check_media_id(match.group("media_id"))
            if not sa.is_mine_server_name(self._context.hs, origin):
                raise sa.NotFoundError("Only local media are served over federation")
            setattr(request, SIGNED_ORIGIN_ATTR, signed_by)
            return self._rewrite_to(f"{route.target}{kind}/{rest}", request)

        return self._context.signed_resource(then)


def _reaches_legacy_read(route: Route, kind: str) -> bool:
    """Whether the request ends in Synapse's legacy download/thumbnail servlet (gated)."""
    if kind not in ("download", "thumbnail"):
        return False
    if route.family is Family.LEGACY:
        return True
    return route.family is Family.MSC1902 and route.action in (Action.REWRITE, Action.SIGNED_LEGACY)


def _synapse_would_crash(route: Route, match: Any) -> Resource | None:
    """400 for a server name Synapse's own media servlets answer with a 500.

    Synapse 1.163 lets the ValueError of an invalid server name (``download//id``,
    ``download/not%20a%20name/id``) escape as an internal error. Only that case is
    answered here; every other answer stays Synapse's.
    """
    kind = match.groupdict().get("kind")
    if kind not in ("download", "thumbnail") or route.listener is not Listener.CLIENT:
        return None
    segments = match.string[match.end("kind") + 1 :].split("/")
    if len(segments) < 2:
        return None
    try:
        media_ids.check_server_name(segments[0])
    except sa.SynapseError as e:
        return sa.ErrorResource(e)
    return None


def _not_found(origin: str) -> Resource:
    raise sa.NotFoundError(f"Media from {origin[:255]!r} is not served by this server")
