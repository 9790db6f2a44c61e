"""The run-time check behind the media gate: no unauthenticated read is answered ungated.

The gate (``synapse_adapter/media_gate.py``) wraps the media-repository methods Synapse's
legacy servlets call, and the start-up probes check that those servlets still call them.
Should a Synapse code path still reach a responder some other way, the freeze (and the
rule that only authenticated reads use signed federation) would be silently off for it.
So the router guards every request bound for a legacy download/thumbnail servlet: when
its response starts (first write, or finish without a body) with a status below 400 and
the gate has not decided a read of this request, the response is replaced by 404
``M_NOT_FOUND`` and an ERROR is logged. Error answers (Synapse's 400s and 404s) pass.

This works on the request object only (Twisted's ``write``/``finish``), not on Synapse's
media code, so that it holds whatever path Synapse took to the response.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# The same answer as the gate's own fail-closed refusal (``synapse_adapter/media_gate.py``).
REFUSED_ERROR = "This media is not available on this endpoint"

# Headers of a media answer that must not survive on the 404 that replaces it.
_MEDIA_HEADERS = (
    b"Content-Length", b"Content-Type", b"Content-Disposition", b"Content-Security-Policy",
    b"X-Content-Security-Policy", b"ETag", b"Cache-Control", b"Last-Modified", b"Location",
)


def guard_unauthenticated_read(request: Any, decided: Callable[[Any], bool]) -> None:
    """Refuse this request's response if it would serve media the gate did not decide."""
    if request.method not in (b"GET", b"HEAD") or getattr(request, "_msc3916_read_guard", None):
        return
    request._msc3916_read_guard = _Guard(request, decided)


class _Guard:
    """Replaces the request's ``write`` and ``finish`` to check once, before the first byte."""

    def __init__(self, request: Any, decided: Callable[[Any], bool]):
        self._request = request
        self._decided = decided
        self._write = request.write
        self._finish = request.finish
        self._checked = False
        self._refused = False
        request.write = self.write
        request.finish = self.finish

    def write(self, data: bytes) -> None:
        self._check()
        if not self._refused:
            self._write(data)

    def finish(self) -> None:
        self._check()
        self._finish()

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        request = self._request
        if request.code >= 400 or self._decided(request):
            return
        self._refused = True
        logger.error(
            "synapse_msc3916: refusing %s %s: the media gate did not decide this"
            " unauthenticated read (a Synapse code path that bypasses the gate)",
            request.method.decode("ascii", "replace"),
            request.path.decode("ascii", "replace") if request.path else "?",
        )
        request.setResponseCode(404)
        for name in _MEDIA_HEADERS:
            request.responseHeaders.removeHeader(name)
        request.setHeader(b"Content-Type", b"application/json")
        self._write(json.dumps({"errcode": "M_NOT_FOUND", "error": REFUSED_ERROR}).encode())
