"""Redirect seam: the point where Synapse has decided to serve a media file.

Every media answer Synapse sends (client and legacy downloads and thumbnails, federation
``multipart/mixed`` answers, remote media it has cached) first asks
``MediaStorage.fetch_media`` for a ``Responder``, *after* its own checks (auth, the
freeze's gate, quarantine, the 304 of an ``If-None-Match``), then sets the file headers
and calls ``responder.write_to_consumer``. Wrapping ``fetch_media`` lets the storage
provider answer with a ``RedirectingResponder`` that, once it sees the consumer, either
turns the answer into a redirect or streams through the responder Synapse would have used.
A refused request never reaches ``fetch_media``, so it can never get a ``Location``.

``fetch_media`` is consulted before the local media store, which is the point: a local
copy does not stop the offload. The same internals exist unchanged from 1.120 to 1.163.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.http.site import SynapseRequest
from synapse.media._base import Responder
from synapse.media.media_storage import MediaStorage, MultipartFileConsumer

from synapse_msc3916.storage.redirect import Redirect, Served, multipart_location_body
from synapse_msc3916.synapse_adapter.probes import Need, method, source_mentions

logger = logging.getLogger(__name__)


def _init_sets(*names: str) -> Callable[[Any], bool]:
    return lambda init: all(source_mentions(init, f"self.{n} =") for n in names)


NEEDS = [
    method("synapse.media.media_storage.MediaStorage.fetch_media", "presigned redirects",
           params=("file_info",)),
    method("synapse.media.media_storage.MediaStorage._file_info_to_path", "presigned redirects",
           params=("file_info",)),
    Need("synapse.media.media_storage.MultipartFileConsumer.__init__",
         "Location parts of federation media answers",
         check=_init_sets("wrapped_consumer", "boundary", "json_field", "file_content_type",
                          "disposition")),
    Need("synapse.http.site.SynapseRequest", "presigned redirects"),
]

# hook(path, file_info, fetch_as_synapse) -> a Responder, or None for "not found"
FetchHook = Callable[[str, Any, Callable[[], Awaitable[Any]]], Awaitable[Any]]

_hook: FetchHook | None = None


def install_fetch_hook(hook: FetchHook) -> None:
    """Route ``MediaStorage.fetch_media`` of this process through ``hook``."""
    global _hook
    _hook = hook
    original = MediaStorage.fetch_media
    if getattr(original, "_msc3916_redirect", False):
        return

    @functools.wraps(original)
    async def fetch_media(self: MediaStorage, file_info: Any) -> Any:
        hook = _hook
        if hook is None or getattr(file_info, "url_cache", False):
            return await original(self, file_info)
        path = self._file_info_to_path(file_info)
        return await hook(path, file_info, lambda: original(self, file_info))

    fetch_media._msc3916_redirect = True  # type: ignore[attr-defined]
    MediaStorage.fetch_media = fetch_media  # type: ignore[method-assign]


def _header(headers: Any, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    value = values[-1]
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def served_by(consumer: Any) -> Served | None:
    """What Synapse is about to send to ``consumer``, or None if it is not an HTTP answer
    (e.g. a copy into the local cache for thumbnailing)."""
    request: Any
    if isinstance(consumer, MultipartFileConsumer):
        request = consumer.wrapped_consumer
        multipart = True
        content_type: str | None = consumer.file_content_type
        disposition: str | None = consumer.disposition
    elif isinstance(consumer, SynapseRequest):
        request = consumer
        multipart = False
        content_type = _header(request.responseHeaders, b"Content-Type")
        disposition = _header(request.responseHeaders, b"Content-Disposition")
    else:
        return None
    if not isinstance(request, SynapseRequest) or request.startedWriting:
        return None
    agent = request.getHeader(b"User-Agent")
    return Served(
        uri=bytes(request.uri or b""),
        user_agent=agent.decode("latin-1") if isinstance(agent, bytes) else agent,
        multipart=multipart,
        content_type=content_type,
        disposition=disposition,
        head=request.method == b"HEAD",
    )


def _redirect_headers(request: SynapseRequest, redirect: Redirect) -> None:
    # Synapse's answer is cacheable for a day with an immutable ETag; a redirect is good
    # only while its URL is, and a 304 to a revalidation would revive an expired URL.
    request.responseHeaders.removeHeader(b"ETag")
    request.setHeader(b"Cache-Control", b"private, max-age=%d" % (redirect.max_age,))


def send_redirect(consumer: Any, redirect: Redirect) -> None:
    """Answer with the redirect instead of the bytes; Synapse finishes the request."""
    request: Any
    if isinstance(consumer, MultipartFileConsumer):
        request = consumer.wrapped_consumer
        body = multipart_location_body(
            consumer.boundary, json.dumps(consumer.json_field).encode("utf-8"), redirect.url
        )
        _redirect_headers(request, redirect)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)
        return
    request = consumer
    request.setResponseCode(307)
    for name in (b"Content-Type", b"Content-Disposition"):
        request.responseHeaders.removeHeader(name)
    _redirect_headers(request, redirect)
    request.setHeader(b"Location", redirect.url.encode("ascii"))
    request.setHeader(b"Content-Length", b"0")


class RedirectingResponder(Responder):
    """Decides at ``write_to_consumer`` time: a redirect, or Synapse's own responder.

    ``choose(served)`` returns (async) a Redirect or None; ``fetch_as_synapse()`` returns the
    Responder Synapse would have used (local file or the provider's stream).
    """

    def __init__(
        self,
        choose: Callable[[Served], Awaitable[Redirect | None]],
        fetch_as_synapse: Callable[[], Awaitable[Any]],
    ):
        self._choose = choose
        self._fetch = fetch_as_synapse
        self._delegate: Any = None

    async def write_to_consumer(self, consumer: Any) -> None:
        served = served_by(consumer)
        redirect = await self._choose(served) if served is not None else None
        if redirect is not None:
            send_redirect(consumer, redirect)
            return
        delegate = await self._fetch()
        if delegate is None:
            # Synapse has sent no byte yet but has promised a length: drop the connection
            # rather than let the client wait for a body that will not come.
            request = getattr(consumer, "wrapped_consumer", consumer)
            abort = getattr(getattr(request, "transport", None), "abortConnection", None)
            if abort is not None:
                abort()
            raise FileNotFoundError("media indexed as present was found nowhere")
        self._delegate = delegate
        delegate.__enter__()
        await delegate.write_to_consumer(consumer)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        delegate, self._delegate = self._delegate, None
        if delegate is not None:
            delegate.__exit__(exc_type, exc_val, exc_tb)
