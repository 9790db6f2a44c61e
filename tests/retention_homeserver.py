"""Synapse's homeserver with media retention checked every 2 s instead of every hour.

Only the period of Synapse's own retention loop changes: the media it deletes and the
way it deletes them are Synapse's, which is what the deletion-lifecycle test needs.
The constant is ``MEDIA_RETENTION_CHECK_PERIOD`` (a ``Duration``) on recent releases and
``MEDIA_RETENTION_CHECK_PERIOD_MS`` (milliseconds) on older ones such as 1.120.
"""

from __future__ import annotations

import sys

from synapse.media import media_repository

if hasattr(media_repository, "MEDIA_RETENTION_CHECK_PERIOD"):
    from synapse.util.duration import Duration

    media_repository.MEDIA_RETENTION_CHECK_PERIOD = Duration(seconds=2)  # type: ignore[attr-defined]
else:
    media_repository.MEDIA_RETENTION_CHECK_PERIOD_MS = 2000  # type: ignore[attr-defined]

if __name__ == "__main__":
    from synapse.app.homeserver import main

    sys.exit(main())
