"""``synapse-msc3916 freeze-report``: what a freeze date would freeze, from the database alone.

An admin picks the date by looking at how much media falls on each side, then rehearses
with ``mode: report`` and the ``synapse_msc3916_freeze_decisions`` counter.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from synapse_msc3916.homeserver_config import (
    Database,
    ToolError,
    load,
    module_config,
    open_database,
)

TABLES = {
    "local": "local_media_repository WHERE url_cache IS NULL",
    "remote": "remote_media_cache WHERE 1 = 1",
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "freeze-report",
        help="count media and bytes on each side of the freeze date",
        description=__doc__,
    )
    p.add_argument("-c", "--config", required=True, help="Synapse's homeserver.yaml")
    p.add_argument("--after", help="a candidate freeze date (ISO 8601) to compare with")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _parse_date(value: Any, key: str) -> int:
    from synapse_msc3916.config import parse_instant

    try:
        return parse_instant(value, key)
    except Exception as e:  # ConfigError: one line for the admin
        raise ToolError(str(e).removeprefix("synapse_msc3916: ")) from None


def _count(db: Database, table: str, low: int | None, high: int | None) -> tuple[int, int]:
    sql = f"SELECT COUNT(*), COALESCE(SUM(media_length), 0) FROM {TABLES[table]}"
    args: list[int] = []
    if low is not None:
        sql += " AND created_ts >= ?"
        args.append(low)
    if high is not None:
        sql += " AND created_ts < ?"
        args.append(high)
    count, size = db.query(sql, args)[0]
    return int(count), int(size)


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(db: Database, after: int | None, candidate: int | None) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if after is not None:
        report["after"] = _iso(after)
        for table in TABLES:
            before = _count(db, table, None, after)
            frozen = _count(db, table, after, None)
            report[table] = {
                "before": {"media": before[0], "bytes": before[1]},
                "frozen": {"media": frozen[0], "bytes": frozen[1]},
            }
        flagged = db.query(
            "SELECT COUNT(*) FROM local_media_repository"
            " WHERE url_cache IS NULL AND authenticated = ? AND created_ts < ?",
            (True, after),
        )[0][0]
        report["flagged_by_synapse_before_date"] = int(flagged)
    if candidate is not None:
        report["candidate"] = _iso(candidate)
        moved: dict[str, Any] = {}
        for table in TABLES:
            if after is None:
                count, size = _count(db, table, candidate, None)
                moved[table] = {"newly_frozen": {"media": count, "bytes": size}}
            elif candidate <= after:
                count, size = _count(db, table, candidate, after)
                moved[table] = {"newly_frozen": {"media": count, "bytes": size}}
            else:
                count, size = _count(db, table, after, candidate)
                moved[table] = {"newly_unfrozen": {"media": count, "bytes": size}}
        report["if_moved"] = moved
    return report


def _table(report: dict[str, Any], mode: str | None) -> str:
    lines = []
    if "after" in report:
        lines.append(f"Freeze date (freeze.after): {report['after']}" + (f", mode: {mode}" if mode else ""))
        lines.append(f"{'':8}{'side of the date':<22}{'media':>10}{'bytes':>16}")
        for table in TABLES:
            for side, label in (("before", "before (stays public)"), ("frozen", "at/after (frozen)")):
                row = report[table][side]
                lines.append(f"{table:<8}{label:<22}{row['media']:>10}{row['bytes']:>16}")
        flagged = report["flagged_by_synapse_before_date"]
        lines.append(
            f"Local media older than the date that Synapse's enable_authenticated_media marked"
            f" authenticated-only (public again on legacy endpoints under this freeze): {flagged}"
        )
    if "candidate" in report:
        lines.append(f"If the date moved to {report['candidate']}:")
        for table, change in report["if_moved"].items():
            for what, row in change.items():
                label = what.replace("_", " ")
                lines.append(f"  {table:<7}{label:<16}{row['media']:>10} media {row['bytes']:>14} bytes")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load(args.config)
    module = module_config(config)
    freeze = (module or {}).get("freeze") if module is not None else None
    after = _parse_date(freeze["after"], "freeze.after") if freeze and "after" in freeze else None
    candidate = _parse_date(args.after, "--after") if args.after else None
    if after is None and candidate is None:
        raise ToolError("the module config has no freeze.after; give a candidate date with --after")
    with open_database(config) as db:
        report = build_report(db, after, candidate)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(_table(report, (freeze or {}).get("mode", "enforce") if freeze else None))
    return 0
