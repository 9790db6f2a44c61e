"""Presigned redirects: let S3 send the bytes of large media, Synapse keeps the decisions.

The adapter seam (``synapse_adapter/redirect.py``) hands the provider every media read
Synapse has decided to serve, at the point where it would start sending bytes: after
authentication, the freeze, quarantine and every other check. This file decides, with no
Synapse in sight, whether that read becomes a redirect:

* the request: which endpoint it came in on (by its *original* URI, before the module's
  router rewrote an unstable path to its stable twin), ``allow_redirect`` on the legacy
  endpoints, the User-Agent; never a HEAD (the URL is signed for GET only);
* the media: only content the index knows, present and not corrupt, of at least
  ``min_size`` bytes, whose object a HEAD found there in the last ``expires / 2``;
* the URL: signed (on the provider's thread pool) for ``public_endpoint_url`` with
  Synapse's own Content-Type and Content-Disposition as response overrides, and reused
  for ``expires / 2`` so browser and CDN caches of the S3 answer keep hitting
  (matrix-media-repo's PR #623 found that a fresh signature on every request defeats
  them).
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attr

from synapse_msc3916.config import RedirectConfig
from synapse_msc3916.metrics import STORAGE_REDIRECTED_BYTES, STORAGE_REDIRECTS

# Metric kinds.
DOWNLOAD = "download"
THUMBNAIL = "thumbnail"
FEDERATION = "federation"

_CLIENT = re.compile(
    r"^/_matrix/client/(?:v1|unstable/org\.matrix\.msc3916)/media/(?P<kind>download|thumbnail)/"
)
_FEDERATION = re.compile(
    r"^/_matrix/federation/(?:v1|unstable/org\.matrix\.msc3916(?:\.v2)?)/media/"
    r"(?:download|thumbnail)/"
)
_LEGACY = re.compile(r"^/_matrix/media/(?:r0|v1|v3)/(?P<kind>download|thumbnail)/")

_CACHE_MAX = 10_000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Served:
    """What Synapse is about to send, as the adapter read it off the request."""

    uri: bytes  # the request line's target, as the client sent it (never rewritten)
    user_agent: str | None
    multipart: bool  # a federation multipart/mixed answer rather than a plain body
    content_type: str | None
    disposition: str | None
    # A HEAD is answered as Synapse answers it: a URL presigned for GET is refused for
    # HEAD by S3 (403), where Synapse answers 200 with the file's headers.
    head: bool = False


def request_kind(served: Served, config: RedirectConfig) -> str | None:
    """The metric kind of a read that may be redirected, or None to stream it.

    The original URI decides, not the path Synapse's servlet matched: the module's router
    rewrites MSC1902 paths to the legacy endpoints, and those must keep streaming.
    """
    if served.head:
        return None
    try:
        target = served.uri.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = urlsplit(target)
    path = parts.path
    if served.multipart:
        if config.federation and _FEDERATION.match(path):
            return FEDERATION
        return None
    match = _CLIENT.match(path)
    if match is None:
        match = _LEGACY.match(path)
        # MSC3860: a legacy client says it can follow; other legacy clients may not.
        if match is None or parse_qs(parts.query).get("allow_redirect") != ["true"]:
            return None
    return DOWNLOAD if match.group("kind") == "download" else THUMBNAIL


def excluded_agent(user_agent: str | None, config: RedirectConfig) -> bool:
    if not config.exclude_user_agents:
        return False
    agent = user_agent or ""
    return any(p.search(agent) for p in config.exclude_user_agents)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Redirect:
    url: str
    max_age: int  # seconds the 307 may be cached: never beyond the URL's validity


class SignedUrls:
    """Presigned URLs reused for half their validity, so repeated reads share one URL.

    ``sign`` is async: it runs on the provider's thread pool, since botocore may refresh
    credentials with blocking HTTP while it signs.
    """

    def __init__(self, expires: int, sign: Callable[[str, str | None, str | None], Awaitable[str]],
                 clock: Callable[[], float] = time.time):
        self._expires = expires
        self._sign = sign
        self._clock = clock
        self._cache: collections.OrderedDict[tuple, tuple[str, float]] = (
            collections.OrderedDict()
        )

    async def get(self, sha256: str, content_type: str | None, disposition: str | None) -> Redirect:
        key = (sha256, content_type, disposition)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now - hit[1] < self._expires / 2:
            self._cache.move_to_end(key)
            url, signed_at = hit
        else:
            # The clock before signing: the URL is valid at least until then + expires.
            signed_at = now
            url = await self._sign(sha256, content_type, disposition)
            now = self._clock()
            self._cache[key] = (url, signed_at)
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        # Whole seconds left, rounded down, less one for the client's trip to S3.
        remaining = int(signed_at + self._expires - now) - 1
        return Redirect(url, max(0, remaining))


async def decide(
    served: Served, length: int, sha256: str, config: RedirectConfig, urls: SignedUrls
) -> tuple[str, Redirect] | None:
    """(metric kind, redirect) for a read of indexed content, or None to stream it."""
    if length < config.min_size:
        return None
    kind = request_kind(served, config)
    if kind is None or excluded_agent(served.user_agent, config):
        return None
    return kind, await urls.get(sha256, served.content_type, served.disposition)


def multipart_location_body(boundary: bytes, json_part: bytes, url: str) -> bytes:
    """A federation media answer whose second part is a ``Location`` instead of bytes.

    Synapse's parser (``_MultipartParserProtocol``) wants ``application/json`` as the
    very first header value, and takes the value of every header after ``Location`` as
    the URL: so the second part carries that one header and nothing else.
    """
    crlf = b"\r\n"
    sep = b"--" + boundary
    return (
        crlf + sep + crlf
        + b"Content-Type: application/json" + crlf + crlf
        + json_part + crlf
        + sep + crlf
        + b"Location: " + url.encode("ascii") + crlf + crlf
        + crlf + sep + b"--" + crlf
    )


class PresenceChecks:
    """Whether a blob's object is really there, asked of S3 at most once per ``ttl``.

    The index can be wrong behind the provider's back (a lifecycle rule, an operator, a
    lost race removed the object); a redirect would then send clients to S3's 404 for
    ever, and Synapse's own "no responder: fetch it again" would never run. Only
    positive answers are remembered: ``check`` marks a missing object in the index
    itself, so the next lookup no longer finds it servable.
    """

    def __init__(self, ttl: float, check: Callable[[str, int], Awaitable[bool]],
                 clock: Callable[[], float] = time.time):
        self._ttl = ttl
        self._check = check
        self._clock = clock
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()

    async def present(self, sha256: str, length: int) -> bool:
        seen = self._seen.get(sha256)
        if seen is not None and self._clock() - seen < self._ttl:
            return True
        self._seen.pop(sha256, None)
        checked_at = self._clock()
        if not await self._check(sha256, length):
            return False
        self._seen[sha256] = checked_at
        while len(self._seen) > _CACHE_MAX:
            self._seen.popitem(last=False)
        return True


class Redirector:
    """The provider's side of the redirect seam: index lookup, then the choice per consumer.

    ``locate(path)`` is the index lookup (async); ``make_responder(choose, fetch)`` builds
    the adapter's ``RedirectingResponder``. Media the index does not know, or marks
    missing, corrupt or being deleted, or smaller than ``min_size``, go back to Synapse's
    own ``fetch_media`` untouched (legacy_prefix objects included: streamed as today).
    ``check(sha256, length)`` asks the store whether the object is there (and marks it
    missing in the index when not); it runs at most once per ``expires / 2`` per object,
    so a vanished object is redirected to for at most that long, and then reads go back
    to Synapse, which fetches remote media again and answers 404 for lost local media
    until the same content is stored again.
    """

    def __init__(
        self,
        config: RedirectConfig,
        sign: Callable[[str, str | None, str | None], Awaitable[str]],
        locate: Callable[[str], Awaitable[Any]],
        check: Callable[[str, int], Awaitable[bool]],
        make_responder: Callable[
            [Callable[[Served], Awaitable[Redirect | None]], Callable[[], Awaitable[Any]]], Any
        ],
        clock: Callable[[], float] = time.time,
    ):
        self._config = config
        self._urls = SignedUrls(config.expires, sign, clock)
        self._presence = PresenceChecks(config.expires / 2, check, clock)
        self._locate = locate
        self._make_responder = make_responder

    async def hook(
        self, path: str, file_info: Any, fetch_as_synapse: Callable[[], Awaitable[Any]]
    ) -> Any:
        located = await self._locate(path)
        if located is None or not located.servable or located.length < self._config.min_size:
            return await fetch_as_synapse()
        sha256, length = located.sha256, located.length
        if not await self._presence.present(sha256, length):
            return await fetch_as_synapse()

        async def choose(served: Served) -> Redirect | None:
            decision = await decide(served, length, sha256, self._config, self._urls)
            if decision is None:
                return None
            kind, redirect = decision
            STORAGE_REDIRECTS.labels(kind=kind).inc()
            STORAGE_REDIRECTED_BYTES.inc(length)
            return redirect

        return self._make_responder(choose, fetch_as_synapse)
