"""The dated authenticated-only freeze (MSC3916's rollout plan) as a policy object.

Media whose content arrived on this server at or after ``after`` (local: uploaded;
remote: fetched into this server's cache) are served only on authenticated endpoints;
older media stay reachable on the legacy ones so that URLs in the wild keep working,
unless Synapse's own per-media flag already protects them: the freeze only ever refuses
*more* than Synapse (``module.py`` combines the two).

The time of local media with content never changes, so it is kept in memory and hot
local media cost no database round trip. A remote media's time belongs to this server's
current copy, which a purge (``purge_media_cache``, ``media_retention``) removes and the
next fetch replaces with a new one: a time before the date is read afresh each time (one
row by Synapse's unique index, next to the rows Synapse reads for the same request), one
at or after it is kept, since every later copy is frozen too.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import attr

from synapse_msc3916.config import FreezeConfig
from synapse_msc3916.metrics import FREEZE_DECISIONS

logger = logging.getLogger(__name__)

REPORT_LOG_INTERVAL_MS = 3600 * 1000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ContentTime:
    """When a media's content arrived on this server, as far as is known yet."""

    # In ms; None: not yet (an id reserved with /create whose content has not come).
    arrived_ms: int | None
    # Whether it can never change (local media with content), so that it may be cached.
    final: bool


# (server_name or None for local media, media_id) -> its ContentTime, or None if unknown
TimeLookup = Callable[[str | None, str], Awaitable[ContentTime | None]]


class Decision(enum.Enum):
    SERVE = "serve"
    EXEMPT = "exempt"
    REFUSE = "refused"
    WOULD_REFUSE = "would_refuse"


class FreezePolicy:
    def __init__(
        self,
        config: FreezeConfig,
        lookup: TimeLookup,
        now_ms: Callable[[], int],
        auto_exempt: frozenset[tuple[str, str]] = frozenset(),
        local_server_name: str = "",
        cache_size: int = 100_000,
    ):
        self._config = config
        self._lookup = lookup
        self._now_ms = now_ms
        self._exempt = config.exempt | auto_exempt
        self._local = local_server_name
        self._cache: OrderedDict[tuple[str | None, str], int] = OrderedDict()
        self._cache_size = cache_size
        self._last_logged: OrderedDict[tuple[str | None, str, str, bool], int] = OrderedDict()

    @property
    def config(self) -> FreezeConfig:
        return self._config

    def is_frozen_at(self, arrived_ms: int) -> bool:
        return arrived_ms >= self._config.after_ms

    async def decide(self, server_name: str | None, media_id: str) -> Decision:
        """What an unauthenticated request for this media gets."""
        origin = server_name or self._local
        if (origin, media_id) in self._exempt:
            FREEZE_DECISIONS.labels("exempt", _origin_label(server_name)).inc()
            return Decision.EXEMPT
        arrived = await self._arrived_ms(server_name, media_id)
        if arrived is None:
            if server_name is None:
                # Unknown local media: Synapse answers 404 itself.
                return Decision.SERVE
            # Remote media not cached yet would be cached now.
            frozen = self.is_frozen_at(self._now_ms())
        else:
            frozen = self.is_frozen_at(arrived)
        if not frozen:
            return Decision.SERVE
        if self._config.enforce:
            FREEZE_DECISIONS.labels("refused", _origin_label(server_name)).inc()
            return Decision.REFUSE
        # Counted and logged by ``would_refuse`` once Synapse has served it: what Synapse
        # refuses itself is not something enforce mode would *additionally* refuse.
        return Decision.WOULD_REFUSE

    def would_refuse(self, server_name: str | None, media_id: str, client: str) -> None:
        """Report mode: Synapse served media that enforce mode would have refused."""
        FREEZE_DECISIONS.labels("would_refuse", _origin_label(server_name)).inc()
        self._log(server_name, media_id, client, enforce=False)

    def refused(self, server_name: str | None, media_id: str, client: str) -> None:
        """Enforce mode refused a media: log it (at most once per media, client and hour)."""
        self._log(server_name, media_id, client, enforce=True)

    async def _arrived_ms(self, server_name: str | None, media_id: str) -> int | None:
        """When the content arrived; now if it has not yet; None for unknown media."""
        key = (server_name, media_id)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        found = await self._lookup(server_name, media_id)
        if found is None:
            return None
        if found.arrived_ms is None:
            # Reserved but still empty: Synapse may wait for the upload and serve it, so
            # judge it as the content that can only arrive from now on.
            return self._now_ms()
        # A remote copy fetched at or after the date is frozen, and so is any later copy
        # (fetched later still): only a remote time before the date must be read again.
        if (found.final or self.is_frozen_at(found.arrived_ms)) and self._cache_size:
            self._cache[key] = found.arrived_ms
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return found.arrived_ms

    def _log(self, server_name: str | None, media_id: str, client: str, enforce: bool) -> None:
        key = (server_name, media_id, client, enforce)
        now = self._now_ms()
        last = self._last_logged.get(key)
        if last is not None and now - last < REPORT_LOG_INTERVAL_MS:
            return
        self._last_logged[key] = now
        self._last_logged.move_to_end(key)
        if len(self._last_logged) > max(self._cache_size, 1000):
            self._last_logged.popitem(last=False)
        logger.info(
            "synapse_msc3916 freeze (%s mode): %s mxc://%s/%s on an unauthenticated endpoint"
            " (client: %s)",
            "enforce" if enforce else "report",
            "refused" if enforce else "would refuse",
            server_name or self._local,
            media_id,
            client,
        )


def _origin_label(server_name: str | None) -> str:
    return "remote" if server_name else "local"
