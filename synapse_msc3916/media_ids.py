"""Validation of the server name and media ID segments of a media path.

The spec allows only ``[A-Za-z0-9_-]`` in a media ID; anything else (``..``, an encoded
slash, a NUL) is refused with 400 before Synapse turns it into a file path or a
federation request. Segments arrive percent-encoded and are checked decoded.
"""

from __future__ import annotations

import re
import urllib.parse

from synapse_msc3916 import synapse_adapter as sa

MEDIA_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,255}")
MAX_SERVER_NAME = 255


def decode_segment(raw: str) -> str:
    return urllib.parse.unquote(raw, errors="strict")


def check_media_id(raw: str) -> str:
    try:
        media_id = decode_segment(raw)
    except UnicodeDecodeError:
        media_id = ""
    if not MEDIA_ID_RE.fullmatch(media_id):
        raise sa.SynapseError(400, "Invalid media ID", sa.Codes.INVALID_PARAM)
    return media_id


def check_server_name(raw: str) -> str:
    try:
        server_name = decode_segment(raw)
    except UnicodeDecodeError:
        server_name = ""
    if not server_name or len(server_name) > MAX_SERVER_NAME:
        raise sa.SynapseError(400, "Invalid server name", sa.Codes.INVALID_PARAM)
    sa.validate_server_name(server_name)
    return server_name


def check_media_path(kind: str, rest: str) -> None:
    """Check ``{server}/{media}[/{file}]`` after ``download/`` or ``thumbnail/``.

    Paths of another shape are left to Synapse, which answers 404 M_UNRECOGNIZED.
    """
    segments = rest.split("/")
    if kind == "download" and len(segments) in (2, 3) or kind == "thumbnail" and len(segments) == 2:
        check_server_name(segments[0])
        check_media_id(segments[1])
