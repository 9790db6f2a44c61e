"""Parsed configuration of the module and of the storage provider.

Every block is turned into a frozen attrs class at start-up, so that a bad value stops
Synapse with one line naming the key instead of failing on the first request.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

import attr
from synapse.module_api.errors import ConfigError

from synapse_msc3916.storage.parallel import DEFAULT_JOBS

MXC_RE = re.compile(r"^mxc://([^/]+)/([A-Za-z0-9_\-]+)$")


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"synapse_msc3916: {key}: {message}")


def _check_keys(block: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in block:
        if key not in allowed:
            raise _fail(
                f"{where}{key}",
                f"unknown option (known: {', '.join(sorted(allowed))})",
            )


def _bool(block: Mapping[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = block.get(key, default)
    if not isinstance(value, bool):
        raise _fail(where + key, f"must be true or false, not {value!r}")
    return value


def _int(
    block: Mapping[str, Any],
    key: str,
    default: int | None,
    where: str = "",
    minimum: int = 0,
    maximum: int = 1 << 62,
) -> int | None:
    value = block.get(key)
    if value is None:  # absent, or an explicit YAML null: the default
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where + key, f"must be a whole number, not {value!r}")
    if not minimum <= value <= maximum:
        raise _fail(where + key, f"must be between {minimum} and {maximum}, not {value}")
    return value


def _str(
    block: Mapping[str, Any], key: str, default: str | None, where: str = ""
) -> str | None:
    value = block.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(where + key, f"must be a string, not {value!r}")
    return value


def parse_instant(value: Any, key: str) -> int:
    """An ISO 8601 instant (or a YAML timestamp) as milliseconds since the epoch.

    A value without a zone is refused: a freeze date that moves with the server's
    time zone is a surprise nobody wants.
    """
    if isinstance(value, datetime.datetime):
        parsed = value
    elif isinstance(value, datetime.date):
        parsed = datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.UTC)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise _fail(
                key, f"must be an ISO 8601 date-time such as 2024-09-04T00:00:00Z, not {value!r}"
            ) from None
        if len(text) == 10:  # a bare date means its midnight in UTC
            parsed = parsed.replace(tzinfo=datetime.UTC)
    else:
        raise _fail(key, f"must be an ISO 8601 date-time string, not {value!r}")
    if parsed.tzinfo is None:
        raise _fail(key, f"needs a time zone (add Z for UTC): {value!r}")
    return int(parsed.timestamp() * 1000)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FreezeConfig:
    """The `freeze:` block: a dated, authenticated-only freeze of unauthenticated media."""

    after_ms: int
    enforce: bool
    exempt: frozenset[tuple[str, str]] = attr.ib(factory=frozenset)
    # Let the date re-open media Synapse's `enable_authenticated_media` flagged: without it,
    # the freeze can only refuse more than Synapse does, never less.
    reopen_flagged_media: bool = False

    @property
    def mode(self) -> str:
        return "enforce" if self.enforce else "report"

    @classmethod
    def parse(cls, block: Any) -> FreezeConfig | None:
        if block is None:
            return None
        where = "freeze."
        if not isinstance(block, Mapping):
            raise _fail("freeze", "must be a mapping with `after`, `mode` and `exempt`")
        _check_keys(block, {"after", "mode", "exempt", "reopen_flagged_media"}, where)
        if "after" not in block:
            raise _fail("freeze.after", "is required (an ISO 8601 date-time)")
        after_ms = parse_instant(block["after"], "freeze.after")
        mode = block.get("mode", "enforce")
        if mode not in ("enforce", "report"):
            raise _fail("freeze.mode", f"must be 'enforce' or 'report', not {mode!r}")
        exempt_raw = block.get("exempt", []) or []
        if not isinstance(exempt_raw, list):
            raise _fail("freeze.exempt", "must be a list of mxc:// URIs")
        exempt = set()
        for item in exempt_raw:
            match = MXC_RE.match(item) if isinstance(item, str) else None
            if not match:
                raise _fail("freeze.exempt", f"not an mxc://server/media_id URI: {item!r}")
            exempt.add((match.group(1), match.group(2)))
        return cls(
            after_ms=after_ms,
            enforce=mode == "enforce",
            exempt=frozenset(exempt),
            reopen_flagged_media=_bool(block, "reopen_flagged_media", False, where),
        )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ModuleConfig:
    """The `config:` block of `synapse_msc3916.AuthenticatedMediaModule`."""

    unstable_msc3916: bool = True
    msc1902: bool = True
    freeze: FreezeConfig | None = None
    freeze_cache_size: int = 100_000

    @classmethod
    def parse(cls, block: Any) -> ModuleConfig:
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise _fail("config", "must be a mapping")
        _check_keys(block, {"unstable_msc3916", "msc1902", "freeze", "freeze_cache_size"}, "")
        cache = _int(block, "freeze_cache_size", 100_000, minimum=0, maximum=100_000_000)
        assert cache is not None
        return cls(
            unstable_msc3916=_bool(block, "unstable_msc3916", True),
            msc1902=_bool(block, "msc1902", True),
            freeze=FreezeConfig.parse(block.get("freeze")),
            freeze_cache_size=cache,
        )


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|[smhdwy]?)\s*$")
_DURATION_UNITS_MS = {
    "ms": 1,
    "": 1000,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 7 * 86_400_000,
    "y": 365 * 86_400_000,
}


_MAX_DURATION_S = 100 * 365 * 86400


def parse_duration_ms(value: Any, key: str) -> int:
    """``0s``, ``30s``, ``15m``, ``24h``, ``7d``, ``2w`` or a number of seconds, as ms."""
    if isinstance(value, bool):
        raise _fail(key, f"must be a duration like 24h, 30m or 0s, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value) if isinstance(value, str) else None
        if not match:
            raise _fail(key, f"must be a duration like 24h, 30m or 0s, not {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS_MS[match.group(2)] / 1000
    if not 0 <= seconds <= _MAX_DURATION_S:  # also refuses NaN
        raise _fail(key, f"must be between 0s and 100y, not {value!r}")
    return int(seconds * 1000)


DEFAULT_DELETE_AFTER_MS = 24 * 3_600_000


def _delete_after(block: Mapping[str, Any]) -> int | None:
    """``delete_after``: absent means the default (24h), an explicit null means off."""
    if "delete_after" not in block:
        return DEFAULT_DELETE_AFTER_MS
    value = block["delete_after"]
    if value is None:
        return None
    return parse_duration_ms(value, "delete_after")



@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedirectConfig:
    """The provider's `redirect:` block: hand large media to S3 with a presigned URL."""

    enabled: bool = False
    min_size: int = 1 << 20
    expires: int = 300
    public_endpoint_url: str | None = None
    federation: bool = True
    exclude_user_agents: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def parse(cls, block: Any) -> RedirectConfig:
        if block is None:
            return cls()
        where = "redirect."
        if not isinstance(block, Mapping):
            raise _fail("redirect", "must be a mapping")
        _check_keys(
            block,
            {"enabled", "min_size", "expires", "public_endpoint_url", "federation",
             "exclude_user_agents"},
            where,
        )
        min_size = _int(block, "min_size", 1 << 20, where, minimum=0)
        expires = _int(block, "expires", 300, where, minimum=1, maximum=3600)
        assert min_size is not None and expires is not None
        public = _str(block, "public_endpoint_url", None, where)
        if public is not None and not re.match(r"^https?://[^\s/]+", public):
            raise _fail(where + "public_endpoint_url", f"must be an http(s) URL, not {public!r}")
        raw_agents = block.get("exclude_user_agents") or []
        if not isinstance(raw_agents, list):
            raise _fail(where + "exclude_user_agents", "must be a list of regular expressions")
        agents = []
        for item in raw_agents:
            if not isinstance(item, str):
                raise _fail(where + "exclude_user_agents", f"not a string: {item!r}")
            try:
                agents.append(re.compile(item))
            except re.error as e:
                raise _fail(
                    where + "exclude_user_agents", f"cannot parse {item!r} as a regular expression: {e}"
                ) from None
        return cls(
            enabled=_bool(block, "enabled", False, where),
            min_size=min_size,
            expires=expires,
            public_endpoint_url=public,
            federation=_bool(block, "federation", True, where),
            exclude_user_agents=tuple(agents),
        )


DEFAULT_STALL_TIMEOUT_MS = 90_000


def _delete_jobs(block: Mapping[str, Any], backend: str) -> int:
    """``delete_jobs``: how many batches the deletion job deletes at once; by default as
    many as the tools' ``--jobs`` on that backend."""
    jobs = _int(block, "delete_jobs", DEFAULT_JOBS[backend], minimum=1, maximum=256)
    assert jobs is not None
    return jobs


def _stall_timeout(block: Mapping[str, Any]) -> int:
    """``stall_timeout``: how long a streamed download may go without the client taking
    bytes before its connection is dropped (never a limit on the download's length)."""
    value = block.get("stall_timeout")
    if value is None:
        return DEFAULT_STALL_TIMEOUT_MS
    ms = parse_duration_ms(value, "stall_timeout")
    if ms < 1000:
        raise _fail("stall_timeout", f"must be at least 1s, not {value!r}")
    return ms


_DIRECTORY_KEYS = {
    "backend", "directory", "redirect", "delete_after", "delete_jobs", "stall_timeout"
}
_S3_KEYS = {
    "bucket",
    "prefix",
    "endpoint_url",
    "region_name",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "storage_class",
    "sse_customer_key",
    "sse_customer_algo",
    "threadpool_size",
    "max_pool_connections",
    "connect_timeout",
    "read_timeout",
    "legacy_prefix",
    "redirect",
    "delete_after",
    "delete_jobs",
    "stall_timeout",
    # accepted for drop-in compatibility with synapse-s3-storage-provider
    "request_checksum_calculation",
    "response_checksum_validation",
}
_STORAGE_CLASSES = {
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
}


@attr.s(frozen=True, slots=True, auto_attribs=True)
class StorageConfig:
    """The `config:` block of `synapse_msc3916.DedupStorageProvider`."""

    backend: str
    directory: str | None = None
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str | None = None
    access_key_id: str | None = None
    # Secrets stay out of the repr: configs end up in logs and tracebacks.
    secret_access_key: str | None = attr.ib(default=None, repr=False)
    session_token: str | None = attr.ib(default=None, repr=False)
    storage_class: str = "STANDARD"
    sse_customer_key: str | None = attr.ib(default=None, repr=False)
    sse_customer_algo: str = "AES256"
    threadpool_size: int = 40
    max_pool_connections: int = 40
    connect_timeout: int = 10
    read_timeout: int = 60
    legacy_prefix: str | None = None
    # botocore's checksum settings, as synapse-s3-storage-provider passes them through
    request_checksum_calculation: str | None = None
    response_checksum_validation: str | None = None
    redirect: RedirectConfig = attr.ib(factory=RedirectConfig)
    # How long after the last reference goes an object is deleted; None: only by gc.
    delete_after_ms: int | None = DEFAULT_DELETE_AFTER_MS
    # Batches of objects the deletion job deletes at once (the tools' ``--jobs``).
    delete_jobs: int = attr.ib(default=DEFAULT_JOBS["file"], validator=attr.validators.ge(1))
    # A streamed download whose client takes no bytes for this long is dropped.
    stall_timeout_ms: int = DEFAULT_STALL_TIMEOUT_MS

    @classmethod
    def parse(cls, block: Any) -> StorageConfig:
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise _fail("config", "must be a mapping")
        backend = block.get("backend", "file")
        if backend not in ("file", "s3"):
            raise _fail("backend", f"must be 'file' or 's3', not {backend!r}")
        if backend == "file":
            _check_keys(block, _DIRECTORY_KEYS, "")
            directory = _str(block, "directory", None)
            if not directory:
                raise _fail("directory", "is required with backend: file")
            if RedirectConfig.parse(block.get("redirect")).enabled:
                raise _fail(
                    "redirect.enabled",
                    "needs backend: s3 (a directory has no URL a client could be sent to)",
                )
            return cls(
                backend="file",
                directory=directory,
                delete_after_ms=_delete_after(block),
                delete_jobs=_delete_jobs(block, "file"),
                stall_timeout_ms=_stall_timeout(block),
            )

        _check_keys(block, _S3_KEYS | {"backend"}, "")
        bucket = _str(block, "bucket", None)
        if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise _fail("bucket", f"must be a valid S3 bucket name, not {bucket!r}")
        prefix = _str(block, "prefix", "") or ""
        endpoint_url = _str(block, "endpoint_url", None)
        if endpoint_url is not None and not re.match(r"^https?://[^\s/]+", endpoint_url):
            raise _fail("endpoint_url", f"must be an http(s) URL, not {endpoint_url!r}")
        storage_class = _str(block, "storage_class", "STANDARD") or "STANDARD"
        if storage_class not in _STORAGE_CLASSES:
            raise _fail(
                "storage_class",
                f"must be one of {', '.join(sorted(_STORAGE_CLASSES))}, not {storage_class!r}",
            )
        threads = _int(block, "threadpool_size", 40, minimum=1, maximum=1000)
        assert threads is not None
        pool = _int(block, "max_pool_connections", threads, minimum=1, maximum=1000)
        assert pool is not None
        connect_timeout = _int(block, "connect_timeout", 10, minimum=1, maximum=3600)
        read_timeout = _int(block, "read_timeout", 60, minimum=1, maximum=3600)
        assert connect_timeout is not None and read_timeout is not None
        algo = _str(block, "sse_customer_algo", "AES256") or "AES256"
        if algo != "AES256":
            raise _fail("sse_customer_algo", f"only AES256 is supported, not {algo!r}")
        legacy_prefix = block.get("legacy_prefix")
        if legacy_prefix is not None and not isinstance(legacy_prefix, str):
            raise _fail("legacy_prefix", f"must be a string or null, not {legacy_prefix!r}")
        checksums: dict[str, str | None] = {}
        for key in ("request_checksum_calculation", "response_checksum_validation"):
            value = _str(block, key, None)
            if value is not None and value not in ("when_supported", "when_required"):
                raise _fail(key, f"must be 'when_supported' or 'when_required', not {value!r}")
            checksums[key] = value
        redirect = RedirectConfig.parse(block.get("redirect"))
        sse_customer_key = _str(block, "sse_customer_key", None)
        if redirect.enabled and sse_customer_key:
            raise _fail(
                "redirect.enabled",
                "cannot be used with sse_customer_key (SSE-C objects need the key in a"
                " request header, so a URL alone cannot fetch them)",
            )
        return cls(
            backend="s3",
            bucket=bucket,
            prefix=prefix,
            endpoint_url=endpoint_url,
            region_name=_str(block, "region_name", None),
            access_key_id=_str(block, "access_key_id", None),
            secret_access_key=_str(block, "secret_access_key", None),
            session_token=_str(block, "session_token", None),
            storage_class=storage_class,
            sse_customer_key=sse_customer_key,
            sse_customer_algo=algo,
            threadpool_size=threads,
            max_pool_connections=pool,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            legacy_prefix=legacy_prefix,
            request_checksum_calculation=checksums["request_checksum_calculation"],
            response_checksum_validation=checksums["response_checksum_validation"],
            redirect=redirect,
            delete_after_ms=_delete_after(block),
            delete_jobs=_delete_jobs(block, "s3"),
            stall_timeout_ms=_stall_timeout(block),
        )
