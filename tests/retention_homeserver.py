"""Synapse's homeserver with media retention checked every 2 s instead of every hour.

Only the period of Synapse's own retention loop changes: the media it deletes and the
way it deletes them are Synapse's, which is what the deletion-lifecycle test needs.
"""

from __future__ import annotations

import sys

from synapse.media import media_repository

try:
    from synapse.util.duration import Duration

    media_repository.MEDIA_RETENTION_CHECK_PERIOD = Duration(seconds=2)  # type: ignore[misc]
except ImportError:  # releases where the period is plain milliseconds
    media_repository.MEDIA_RETENTION_CHECK_PERIOD = 2000  # type: ignore[assignment,misc]

if __name__ == "__main__":
    from synapse.app.homeserver import main

    sys.exit(main())
