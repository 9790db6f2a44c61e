"""Test-only Synapse modules that make the legacy servlets bypass the media gate.

Kept apart from ``synapse_breaker.py``, which breaks ``get_local_media`` as soon as it is
imported: these must leave the gated methods intact and break only the servlet.
"""

from __future__ import annotations

from typing import Any

from synapse.media.media_repository import MediaRepository


class ServletBypassBreaker:
    """Listed *before* the module: a release whose legacy download servlet reads media
    through a method the gate does not wrap (a refactoring upstream). The wrapped methods'
    parameters are all still there, so only the call-path probe can notice; Synapse must
    refuse to start, naming the servlet."""

    def __init__(self, config: Any, api: Any):
        pass

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, Any]:
        # Patched here, not at import: importing this file must not break the other breakers.
        from synapse.rest.media.download_resource import DownloadResource

        async def on_GET(
            self: Any, request: Any, server_name: str, media_id: str, file_name: str | None = None
        ) -> None:
            await self.media_repo.get_local_media_unchecked(
                request, media_id, file_name, 20_000, allow_authenticated=False
            )

        DownloadResource.on_GET = on_GET  # type: ignore[method-assign]
        return config


class ResponderBypassBreaker:
    """Listed *after* the module: the legacy download servlet, as built once the probes
    passed, reads local media through the unwrapped ``get_local_media`` (a code path the
    probes could not see). The router's run-time check must refuse the response."""

    def __init__(self, config: Any, api: Any):
        # Modules are constructed before Synapse builds its servlets, so this on_GET is
        # the one the listeners register.
        from synapse.rest.media.download_resource import DownloadResource

        unwrapped = MediaRepository.get_local_media.__wrapped__  # type: ignore[attr-defined]

        async def on_GET(
            self: Any, request: Any, server_name: str, media_id: str, file_name: str | None = None
        ) -> None:
            await unwrapped(self.media_repo, request, media_id, file_name, 20_000, allow_authenticated=False)

        DownloadResource.on_GET = on_GET  # type: ignore[method-assign]

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, Any]:
        return config
