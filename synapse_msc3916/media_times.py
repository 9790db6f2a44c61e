"""When a media's content arrived on this server, for the freeze.

Synapse's tables say it for most media: ``local_media_repository.created_ts`` is set when
an upload stores its content, and ``remote_media_cache.created_ts`` when this server
fetches a remote media into its cache (a purge deletes the row, the next fetch inserts a
new one). Not for an id reserved with ``POST /_matrix/media/v1/create``: its
``created_ts`` is the reservation, and the later ``PUT`` of the content changes no time
column (``update_local_media``). Every stored file passes Synapse's media spam check
right after it is written and before its row is updated, in whichever process received
it, so the module notes there, in a table of its own (``msc3916_media_uploads``), when the
content of a reserved id arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from synapse.module_api import NOT_SPAM, ModuleApi

from synapse_msc3916.freeze import ContentTime
from synapse_msc3916.storage.index import schema_lock_txn

logger = logging.getLogger(__name__)

UPLOADS = "msc3916_media_uploads"


class MediaTimes:
    def __init__(self, api: ModuleApi, now_ms: Callable[[], int]):
        self._api = api
        self._now_ms = now_ms
        self._schema_ready = False

    def record_uploads(self) -> None:
        """Note, from now on, when content reaches this process for a reserved id."""
        self._api.register_spam_checker_callbacks(check_media_file_for_spam=self._stored)

    async def _stored(self, file: Any, file_info: Any) -> Any:
        """Spam-check callback: never judges, only notes the arrival of a local upload.

        Only a reserved id has a row when its content is written (a direct upload inserts
        its row afterwards, with the time of the content), so the insert records nothing
        for anything else. A failure fails the upload: content whose arrival went unnoted
        would be judged by its reservation time.
        """
        if file_info.server_name is None and not file_info.thumbnail and not file_info.url_cache:
            await self._ensure_schema()
            await self._api.run_db_interaction(
                "msc3916_media_uploaded", _record_txn, file_info.file_id, self._now_ms()
            )
        return NOT_SPAM

    async def content_time(self, server_name: str | None, media_id: str) -> ContentTime | None:
        """When the content of this media arrived here; None for media this server lacks."""
        if server_name is not None:
            cached = await self._api.run_db_interaction(
                "msc3916_remote_media_time", _remote_txn, server_name, media_id
            )
            # The current copy's time: a purge and a new fetch make a new copy.
            return None if cached is None else ContentTime(cached, final=False)
        await self._ensure_schema()
        row = await self._api.run_db_interaction("msc3916_local_media_time", _local_txn, media_id)
        if row is None:
            return None
        created_ts, media_length, uploaded_ts = row
        if media_length is None:
            return ContentTime(None, final=False)
        arrived = max(int(created_ts), int(uploaded_ts) if uploaded_ts is not None else 0)
        return ContentTime(arrived, final=True)

    async def _ensure_schema(self) -> None:
        """Create the table once per process, tolerating a concurrent creator (PostgreSQL
        can fail one of two simultaneous ``CREATE TABLE IF NOT EXISTS``)."""
        if self._schema_ready:
            return
        for attempt in range(5):
            try:
                await self._api.run_db_interaction("msc3916_media_uploads_schema", _schema_txn)
                self._schema_ready = True
                return
            except Exception:
                if attempt == 4:
                    raise
                await self._api.sleep(0.2 * (attempt + 1))


def _schema_txn(txn: Any) -> None:
    schema_lock_txn(txn)
    txn.execute(
        f"CREATE TABLE IF NOT EXISTS {UPLOADS} ("
        " media_id TEXT NOT NULL PRIMARY KEY, uploaded_ts BIGINT NOT NULL)",
        (),
    )


def _record_txn(txn: Any, media_id: str, now_ms: int) -> None:
    # The latest arrival wins: two PUTs racing past Synapse's 409 check both store, and
    # the content left is the one written last.
    txn.execute(
        f"INSERT INTO {UPLOADS} (media_id, uploaded_ts)"
        " SELECT media_id, ? FROM local_media_repository WHERE media_id = ?"
        " ON CONFLICT (media_id) DO UPDATE SET uploaded_ts = excluded.uploaded_ts",
        (now_ms, media_id),
    )


def _local_txn(txn: Any, media_id: str) -> tuple[Any, Any, Any] | None:
    txn.execute(
        f"SELECT l.created_ts, l.media_length, u.uploaded_ts FROM local_media_repository l"
        f" LEFT JOIN {UPLOADS} u ON u.media_id = l.media_id WHERE l.media_id = ?",
        (media_id,),
    )
    row = txn.fetchone()
    return None if row is None or row[0] is None else (row[0], row[1], row[2])


def _remote_txn(txn: Any, server_name: str, media_id: str) -> int | None:
    txn.execute(
        "SELECT created_ts FROM remote_media_cache WHERE media_origin = ? AND media_id = ?",
        (server_name, media_id),
    )
    row = txn.fetchone()
    return None if row is None or row[0] is None else int(row[0])
