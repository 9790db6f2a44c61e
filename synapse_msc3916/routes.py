"""The one table of every media path the module touches.

Each row says which endpoint family a path belongs to, which listener resource must be
present for it to be served, what kind of media request it is (for the metrics), and
what the router does with it:

* ``REWRITE``: the path is the same API as a stable Synapse endpoint under another
  name; the router swaps the prefix and hands the request to that listener's own Synapse
  resource, so the answer is Synapse's to the byte (auth, errors, headers, caching).
* ``FEDERATION_ORIGIN``: early matrix-media-repo federation form that names the origin;
  served by rewriting when the origin is this server, else 404 after authentication.
* ``SIGNED_LEGACY``: MSC1902 federation ``remote_media``: X-Matrix is checked first, then
  the request is served like the legacy download/thumbnail for local media.
* ``VERSIONS``: ``/_matrix/client/versions`` with the module's unstable features added.
* ``OBSERVE``: Synapse's own media paths; only counted, never changed.

Patterns match the raw (still percent-encoded) request path, exactly as Synapse's own
servlets do, so that an encoded ``%2F`` stays inside its segment and every form of a path
reaches the same code as its stable twin.
"""

from __future__ import annotations

import enum
import re

import attr


class Family(enum.Enum):
    """The endpoint family of a path, as reported in the request metrics."""

    LEGACY = "legacy"
    STABLE = "stable"
    MSC3916 = "unstable_msc3916"
    MSC1902 = "msc1902"


class Listener(enum.Enum):
    """Which `_matrix` child a listener must have for the path to be served on it."""

    CLIENT = "client"
    FEDERATION = "federation"
    MEDIA = "media"


class Action(enum.Enum):
    REWRITE = "rewrite"
    FEDERATION_ORIGIN = "federation_origin"
    SIGNED_LEGACY = "signed_legacy"
    VERSIONS = "versions"
    OBSERVE = "observe"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Route:
    family: Family
    listener: Listener
    action: Action
    pattern: re.Pattern[str]
    # Replacement for the matched prefix (group "prefix") when rewriting.
    target: str | None = None
    # Which config switch turns the row on ("unstable_msc3916", "msc1902" or None).
    feature: str | None = None
    # Which media kind a request is, for the metrics; None means "from the path".
    kind: str | None = None

    def match(self, path: str) -> re.Match[str] | None:
        return self.pattern.match(path)


_SEG = r"[^/]*"
_KIND = r"(?P<kind>download|thumbnail|upload|config|preview_url|create)"


def _r(text: str) -> re.Pattern[str]:
    return re.compile(text)


ROUTES: tuple[Route, ...] = (
    # --- MSC3916 unstable, client: the stable /_matrix/client/v1/media API, renamed.
    Route(
        Family.MSC3916,
        Listener.CLIENT,
        Action.REWRITE,
        _r(
            r"^(?P<prefix>/_matrix/client/unstable/org\.matrix\.msc3916/media/)"
            r"(?P<kind>download|thumbnail|preview_url|config)(?:/.*)?$"
        ),
        target="/_matrix/client/v1/media/",
        feature="unstable_msc3916",
    ),
    # --- MSC3916 unstable, federation: the MSC's final form and Synapse 1.110's.
    Route(
        Family.MSC3916,
        Listener.FEDERATION,
        Action.REWRITE,
        _r(
            r"^(?P<prefix>/_matrix/federation/unstable/org\.matrix\.msc3916(?:\.v2)?/media/)"
            rf"(?P<kind>download|thumbnail)/{_SEG}$"
        ),
        target="/_matrix/federation/v1/media/",
        feature="unstable_msc3916",
    ),
    # --- MSC3916 unstable, federation: early matrix-media-repo, with the origin.
    Route(
        Family.MSC3916,
        Listener.FEDERATION,
        Action.FEDERATION_ORIGIN,
        _r(
            r"^(?P<prefix>/_matrix/federation/unstable/org\.matrix\.msc3916/media/)"
            rf"(?P<kind>download|thumbnail)/(?P<origin>{_SEG})/(?P<media_id>{_SEG})$"
        ),
        target="/_matrix/federation/v1/media/",
        feature="unstable_msc3916",
    ),
    # --- MSC1902 client: unauthenticated download/thumbnail are the legacy endpoints.
    Route(
        Family.MSC1902,
        Listener.CLIENT,
        Action.REWRITE,
        _r(
            r"^(?P<prefix>/_matrix/client/(?:r0|unstable/org\.matrix\.msc1902)/media/)"
            r"(?P<kind>download|thumbnail)/.*$"
        ),
        target="/_matrix/media/v3/",
        feature="msc1902",
    ),
    Route(
        Family.MSC1902,
        Listener.CLIENT,
        Action.REWRITE,
        _r(
            r"^(?P<prefix>/_matrix/client/(?:r0|unstable/org\.matrix\.msc1902)/media/)"
            r"(?P<kind>upload)$"
        ),
        target="/_matrix/media/v3/",
        feature="msc1902",
    ),
    # preview_url and config need a token and refuse guests: the stable servlets do both.
    Route(
        Family.MSC1902,
        Listener.CLIENT,
        Action.REWRITE,
        _r(
            r"^(?P<prefix>/_matrix/client/(?:r0|unstable/org\.matrix\.msc1902)/media/)"
            r"(?P<kind>preview_url|config)$"
        ),
        target="/_matrix/client/v1/media/",
        feature="msc1902",
    ),
    # --- MSC1902 federation: X-Matrix, local media only, raw body like legacy download.
    Route(
        Family.MSC1902,
        Listener.FEDERATION,
        Action.SIGNED_LEGACY,
        _r(
            r"^(?P<prefix>/_matrix/federation/(?:v1|unstable/org\.matrix\.msc1902)/remote_media/)"
            rf"(?P<kind>download|thumbnail)/(?P<origin>{_SEG})/(?P<media_id>{_SEG})"
            rf"(?:/(?P<file_name>{_SEG}))?$"
        ),
        target="/_matrix/media/v3/",
        feature="msc1902",
    ),
    # --- /versions: advertise the unstable features that are switched on.
    Route(
        Family.STABLE,
        Listener.CLIENT,
        Action.VERSIONS,
        _r(r"^/_matrix/client/versions$"),
        kind="versions",
    ),
    # --- Synapse's own media endpoints: counted for the rollout metrics, left alone.
    Route(
        Family.LEGACY,
        Listener.CLIENT,
        Action.OBSERVE,
        _r(rf"^/_matrix/media/(?:r0|v1|v3)/{_KIND}(?:/.*)?$"),
    ),
    Route(
        Family.STABLE,
        Listener.CLIENT,
        Action.OBSERVE,
        _r(rf"^/_matrix/client/v1/media/{_KIND}(?:/.*)?$"),
    ),
    Route(
        Family.STABLE,
        Listener.FEDERATION,
        Action.OBSERVE,
        _r(rf"^/_matrix/federation/v1/media/{_KIND}(?:/.*)?$"),
    ),
)


def find_route(path: str) -> tuple[Route, re.Match[str]] | None:
    """The first row whose pattern matches the raw request path."""
    for route in ROUTES:
        match = route.match(path)
        if match is not None:
            return route, match
    return None
