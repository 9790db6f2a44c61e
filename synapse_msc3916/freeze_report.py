"""``synapse-msc3916 freeze-report``: what a freeze date would freeze, from the database alone.

An admin picks the date by looking at how much media falls on each side, then rehearses
with ``mode: report`` and the ``synapse_msc3916_freeze_decisions`` counter. Each side is
split by Synapse's own per-media ``authenticated`` flag (set on media stored while
``enable_authenticated_media`` is on, the default since 1.120): flagged media stay refused
on unauthenticated endpoints whatever the date, unless ``reopen_flagged_media: true``,
whose effect (media and bytes it would open) is counted here before anyone turns it on.
``--histogram`` prints media per month with the date marked.
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
from synapse_msc3916.media_times import UPLOADS

# The `authenticated` column exists in both tables since Synapse's schema 86, older than
# 1.120, the oldest release the module supports. Ids reserved with /create count once
# their content has come, by when it came (as the freeze judges them, see media_times.py).
TABLES = {
    "local": "local_media_repository WHERE url_cache IS NULL AND media_length IS NOT NULL",
    "remote": "remote_media_cache WHERE 1 = 1",
}
LOCAL_WITH_UPLOADS = (
    "(SELECT l.media_length, l.authenticated, CASE WHEN u.uploaded_ts > l.created_ts"
    " THEN u.uploaded_ts ELSE l.created_ts END AS created_ts FROM local_media_repository l"
    f" LEFT JOIN {UPLOADS} u ON u.media_id = l.media_id"
    " WHERE l.url_cache IS NULL AND l.media_length IS NOT NULL) local_media WHERE 1 = 1"
)


def _source(db: Database, table: str) -> str:
    """What ``table`` stands for in the queries: the local side joins the upload times
    the module noted, once the module has created their table."""
    if table != "local":
        return TABLES[table]
    if db.engine == "postgres":
        present = db.query("SELECT to_regclass(?) IS NOT NULL", (UPLOADS,))[0][0]
    else:
        present = bool(db.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (UPLOADS,)))
    return LOCAL_WITH_UPLOADS if present else TABLES[table]

BAR_WIDTH = 50


def register(sub: Any) -> None:
    p = sub.add_parser(
        "freeze-report",
        help="count media and bytes on each side of the freeze date",
        description=__doc__,
    )
    p.add_argument("-c", "--config", required=True, help="Synapse's homeserver.yaml")
    p.add_argument("--after", help="a candidate freeze date (ISO 8601) to compare with")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--histogram", action="store_true", help="also print media per month, with the date marked"
    )
    p.set_defaults(func=run)


def _parse_date(value: Any, key: str) -> int:
    from synapse_msc3916.config import parse_instant

    try:
        return parse_instant(value, key)
    except Exception as e:  # ConfigError: one line for the admin
        raise ToolError(str(e).removeprefix("synapse_msc3916: ")) from None


def _count(
    db: Database, table: str, low: int | None, high: int | None, flagged: bool | None = None
) -> tuple[int, int]:
    """Media and bytes of ``table`` with low <= created_ts < high (and that flag, if given)."""
    sql = f"SELECT COUNT(*), COALESCE(SUM(media_length), 0) FROM {_source(db, table)}"
    args: list[Any] = []
    if low is not None:
        sql += " AND created_ts >= ?"
        args.append(low)
    if high is not None:
        sql += " AND created_ts < ?"
        args.append(high)
    if flagged is not None:
        sql += " AND authenticated = ?" if flagged else " AND authenticated <> ?"
        args.append(True)
    count, size = db.query(sql, args)[0]
    return int(count), int(size)


def _side(db: Database, table: str, low: int | None, high: int | None) -> dict[str, Any]:
    total = _count(db, table, low, high)
    flagged = _count(db, table, low, high, flagged=True)
    return {
        "media": total[0],
        "bytes": total[1],
        "flagged": {"media": flagged[0], "bytes": flagged[1]},
        "not_flagged": {"media": total[0] - flagged[0], "bytes": total[1] - flagged[1]},
    }


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    db: Database, after: int | None, candidate: int | None, synapse_enforces_flag: bool = True
) -> dict[str, Any]:
    report: dict[str, Any] = {"synapse_enforces_flag": synapse_enforces_flag}
    if after is not None:
        report["after"] = _iso(after)
        for table in TABLES:
            report[table] = {"before": _side(db, table, None, after), "frozen": _side(db, table, after, None)}
        # reopen_flagged_media serves flagged media older than the date (what is at or after
        # it stays frozen); when Synapse does not enforce its flag there is nothing to reopen.
        would_open: dict[str, Any] = {}
        for table in TABLES:
            row = report[table]["before"]["flagged"]
            would_open[table] = dict(row) if synapse_enforces_flag else {"media": 0, "bytes": 0}
        would_open["total"] = {
            key: sum(would_open[table][key] for table in TABLES) for key in ("media", "bytes")
        }
        report["reopen_flagged_media_would_open"] = would_open
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


def _month_start(ms: int) -> datetime.datetime:
    t = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return datetime.datetime(t.year, t.month, 1, tzinfo=datetime.UTC)


def _next_month(t: datetime.datetime) -> datetime.datetime:
    return t.replace(year=t.year + 1, month=1) if t.month == 12 else t.replace(month=t.month + 1)


def _ms(t: datetime.datetime) -> int:
    return int(t.timestamp() * 1000)


def build_histogram(db: Database, marks: dict[str, int]) -> list[dict[str, Any]]:
    """Local and remote media per calendar month (UTC), oldest first."""
    lows, highs = [], []
    for table in TABLES:
        low, high = db.query(f"SELECT MIN(created_ts), MAX(created_ts) FROM {_source(db, table)}")[0]
        if low is not None:
            lows.append(int(low))
            highs.append(int(high))
    if not lows:
        return []
    month, last = _month_start(min(lows)), _month_start(max(highs))
    months = []
    while month <= last:
        end = _next_month(month)
        row: dict[str, Any] = {"month": month.strftime("%Y-%m")}
        for table in TABLES:
            row[table] = _count(db, table, _ms(month), _ms(end))[0]
        row["marks"] = [name for name, at in marks.items() if _ms(month) <= at < _ms(end)]
        months.append(row)
        month = end
    return months


def _histogram_text(months: list[dict[str, Any]], marks: dict[str, int]) -> str:
    if not months:
        return "No media yet."
    peak = max(row["local"] + row["remote"] for row in months) or 1
    lines = [f"Media per month (UTC), local '#' and remote '+', {peak} at the longest bar:"]
    first, last = months[0]["month"], months[-1]["month"]
    for name, at in marks.items():
        if _iso(at)[:7] < first:
            lines.append(f"  -------- {name} {_iso(at)} (before the oldest media) --------")
    for row in months:
        local = round(BAR_WIDTH * row["local"] / peak)
        remote = round(BAR_WIDTH * row["remote"] / peak)
        bar = "#" * local + "+" * remote
        mark = "".join(f"  <-- {name} {_iso(marks[name])}" for name in row["marks"])
        lines.append(f"  {row['month']} {bar:<{BAR_WIDTH}} {row['local']:>8} {row['remote']:>8}{mark}")
    for name, at in marks.items():
        if _iso(at)[:7] > last:
            lines.append(f"  -------- {name} {_iso(at)} (after the newest media) --------")
    return "\n".join(lines)


def _table(report: dict[str, Any], mode: str | None) -> str:
    lines = []
    if "after" in report:
        lines.append(f"Freeze date (freeze.after): {report['after']}" + (f", mode: {mode}" if mode else ""))
        lines.append(
            f"{'':8}{'side of the date':<22}{'media':>10}{'bytes':>16}"
            f"{'flagged':>10}{'flagged bytes':>16}"
        )
        for table in TABLES:
            for side, label in (("before", "before"), ("frozen", "at/after (frozen)")):
                row = report[table][side]
                lines.append(
                    f"{table:<8}{label:<22}{row['media']:>10}{row['bytes']:>16}"
                    f"{row['flagged']['media']:>10}{row['flagged']['bytes']:>16}"
                )
        lines.append(
            "flagged: media Synapse stored with enable_authenticated_media on; they stay refused on"
            " unauthenticated endpoints whatever the date."
        )
        if not report["synapse_enforces_flag"]:
            lines.append(
                "enable_authenticated_media is off: Synapse does not enforce its flag, the date alone decides."
            )
        opened = report["reopen_flagged_media_would_open"]
        lines.append(
            f"reopen_flagged_media: true would open {opened['total']['media']} media"
            f" ({opened['total']['bytes']} bytes) on unauthenticated endpoints:"
            f" {opened['local']['media']} local, {opened['remote']['media']} remote."
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
    enforces = bool(config.get("enable_authenticated_media", True))
    marks = {name: at for name, at in (("freeze.after", after), ("--after", candidate)) if at is not None}
    with open_database(config) as db:
        report = build_report(db, after, candidate, enforces)
        if args.histogram:
            report["histogram"] = build_histogram(db, marks)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(_table(report, (freeze or {}).get("mode", "enforce") if freeze else None))
        if args.histogram:
            print()
            print(_histogram_text(report["histogram"], marks))
    return 0
