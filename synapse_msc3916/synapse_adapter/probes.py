"""Start-up probes: every Synapse internal the module relies on, checked before use.

The module reuses Synapse's own machinery, so it depends on internals that Synapse does
not promise to keep. Instead of pinning a release line, each seam of the adapter declares
what it needs (``NEEDS`` next to the code that uses it) and this file checks all of them
when Synapse loads the module, before anything is patched. A missing internal stops
Synapse with one line naming it: running with the media gate silently off would serve
media that Synapse or the freeze refuses.

Optional internals (ones only some supported releases have) declare their fallback; the
probe report says which fallback is in use.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

import attrs

logger = logging.getLogger(__name__)

OLDEST_TESTED = "1.120.0"
NEWEST_TESTED = "1.163.2"
"""The range of Synapse releases the adapter was tested on (see the README's table)."""


@attrs.frozen
class Need:
    """One Synapse internal a seam uses.

    ``internal`` is a dotted path (module, then attributes). ``params`` are parameter
    names a callable must accept, because a wrapper reads them by name. ``fallback`` is
    ``None`` for a required internal, else what the seam does without it.
    """

    internal: str
    why: str
    params: tuple[str, ...] = ()
    since: str = "1.120"
    fallback: str | None = None
    check: Callable[[Any], bool] | None = None

    @property
    def optional(self) -> bool:
        return self.fallback is not None


def method(internal: str, why: str, params: Iterable[str] = (), **kwargs: Any) -> Need:
    return Need(internal, why, tuple(params), **kwargs)


def resolve(internal: str) -> Any:
    """Import the longest module prefix of ``internal`` and walk the rest as attributes."""
    parts = internal.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(internal)


def problem(need: Need) -> str | None:
    """Why ``need`` is not met on this Synapse, or ``None`` when it is."""
    try:
        obj = resolve(need.internal)
    except (ImportError, AttributeError):
        return f"{need.internal} is missing"
    if need.params:
        try:
            parameters = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            return f"{need.internal} has no inspectable signature"
        missing = [p for p in need.params if p not in parameters]
        if missing:
            return f"{need.internal} lacks parameter(s) {', '.join(missing)}"
    if need.check is not None and not need.check(obj):
        return f"{need.internal} does not have the expected shape ({need.why})"
    return None


def source_mentions(obj: Any, text: str) -> bool:
    """Whether ``obj``'s source code contains ``text`` (False when there is no source)."""
    try:
        return text in inspect.getsource(obj)
    except (OSError, TypeError):
        return False


def attributes_used(obj: Any, owner: str) -> set[str] | None:
    """Attribute names read on ``self.<owner>`` in ``obj``'s code (None without source).

    Parsed, not searched as text, so that comments, strings and a method merely
    mentioned do not count, and a callable taken first (``f = self.x.m; f(...)``) does.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return None
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == owner
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }


def has(internal: str) -> bool:
    """Whether an optional internal is present (for a seam choosing its code path)."""
    try:
        resolve(internal)
    except (ImportError, AttributeError):
        return False
    return True


def available(need: Need) -> bool:
    """Whether ``need`` is met (present, parameters and shape), for choosing a code path."""
    return problem(need) is None


class ProbeFailure(Exception):
    """A required internal is missing: the module must not start."""


def _synapse_version() -> str:
    try:
        import synapse

        return str(synapse.__version__)
    except Exception:  # pragma: no cover - Synapse itself is missing
        return "unknown"


def _module_version() -> str:
    from synapse_msc3916 import __version__

    return __version__


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"1.163.2 (b=main,eb34c0b)"`` -> ``(1, 163, 2)``; ``"1.164.0rc1"`` -> ``(1, 164, 0)``."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if found is None:
        return (0,)
    return tuple(int(n or 0) for n in found.groups())


def all_needs() -> list[Need]:
    """Every seam's declared needs (importing a seam imports only what it declares)."""
    from synapse_msc3916.synapse_adapter import SEAMS

    needs: list[Need] = []
    for seam in SEAMS:
        try:
            module = importlib.import_module(f"synapse_msc3916.synapse_adapter.{seam}")
        except ImportError as e:
            raise ProbeFailure(f"{seam}: cannot import {e.name or e}") from None
        needs.extend(getattr(module, "NEEDS", ()))
    return needs


_checked = False


def check_synapse() -> None:
    """Run every probe once per process; raise one ConfigError naming what is missing."""
    global _checked
    if _checked:
        return
    try:
        needs = all_needs()
        failures = [p for n in needs if not n.optional and (p := problem(n)) is not None]
    except ProbeFailure as e:
        failures = [str(e)]
    if failures:
        from synapse.module_api.errors import ConfigError

        message = (
            f"synapse_msc3916 {_module_version()} cannot run on Synapse {_synapse_version()}:"
            f" {'; '.join(failures)}"
        )
        # Raised from parse_config, before Synapse sets up logging: Synapse prints it
        # once as its configuration error and exits. (Logging it as well would print the
        # same line twice through logging's last-resort handler.)
        raise ConfigError(message)
    fallbacks = [f"{n.internal} ({n.fallback})" for n in needs if n.optional and problem(n) is not None]
    if fallbacks:
        logger.info("synapse_msc3916: Synapse %s lacks %s", _synapse_version(), "; ".join(fallbacks))
    version = _synapse_version()
    if _version_tuple(version) > _version_tuple(NEWEST_TESTED):
        logger.warning(
            "synapse_msc3916 %s was tested on Synapse %s to %s; this is %s. Every probe passed,"
            " so it runs; please report problems.",
            _module_version(),
            OLDEST_TESTED,
            NEWEST_TESTED,
            version,
        )
    elif _version_tuple(version) < _version_tuple(OLDEST_TESTED):
        logger.warning(
            "synapse_msc3916 %s supports Synapse %s and later; this is %s.",
            _module_version(),
            OLDEST_TESTED,
            version,
        )
    _checked = True
