"""A test-only Synapse module that simulates a Synapse release whose internals changed.

Listed under ``modules:`` before ``synapse_msc3916.AuthenticatedMediaModule``, it is
imported first (Synapse loads modules in order while parsing its config) and, at import,
replaces ``MediaRepository.get_local_media`` with a function that lost its
``allow_authenticated`` parameter: what a future Synapse might ship. The module's start-up
probes must then refuse to start, since its media gate reads that parameter by name.
"""

from __future__ import annotations

from typing import Any

from synapse.media.media_repository import MediaRepository


async def get_local_media(
    self: Any, request: Any, media_id: str, name: str | None, max_timeout_ms: int
) -> None:
    """``get_local_media`` without ``allow_authenticated`` (never called: Synapse must not start)."""
    raise AssertionError("Synapse started although a probe should have failed")


MediaRepository.get_local_media = get_local_media  # type: ignore[assignment,method-assign]


class SynapseBreaker:
    def __init__(self, config: Any, api: Any):
        pass

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, Any]:
        return config


class RuntimeBreaker:
    """Listed *after* the module: Synapse now calls the gated method in a way the gate
    cannot read (an argument it has never seen), as a future release might at run time
    while still passing the start-up probes. The gate must refuse, not serve."""

    def __init__(self, config: Any, api: Any):
        gated = MediaRepository.get_local_media
        if not getattr(gated, "_msc3916_gated", False):
            raise AssertionError("RuntimeBreaker must be listed after the module")

        async def get_local_media(self: Any, *args: Any, **kwargs: Any) -> None:
            return await gated(self, *args, future_flag=True, **kwargs)

        MediaRepository.get_local_media = get_local_media  # type: ignore[assignment,method-assign]

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, Any]:
        return config
