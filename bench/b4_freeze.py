"""B4: legacy downloads with the freeze enforced vs no freeze block: served and refused.

Two servers side by side, both with Synapse's `enable_authenticated_media` off (so its
flag refuses nothing and only the freeze block differs); one has a freeze dated
2020-01-01 in enforce mode. Served: a 1 KiB media on the legacy path, created before the
date on the freeze server (its `created_ts` moved back), so the freeze decides and serves
it. Refused (404): a media created after the date, which the freeze refuses, against
Synapse's own 404 for a media id it does not have on the server without a freeze.
Rounds alternate between the four contenders, each round starting with the next one.
Any answer other than the expected 200 or 404 is counted as an error and fails the
benchmark.
Goal: served requests/s ratio >= 0.95; the refusal ratio is reported.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from bench.load import median, percentile, run_round
from bench.report import Report
from tests.harness import Synapse

PLAIN = "no freeze block"
FROZEN = "freeze: enforce"
FREEZE_AFTER = "2020-01-01T00:00:00Z"
BEFORE_FREEZE_MS = int(datetime.datetime(2019, 6, 1, tzinfo=datetime.UTC).timestamp() * 1000)


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    rounds, seconds, concurrency = (2, 0.5, 8) if quick else (7, 3.0, 16)
    servers = {
        PLAIN: Synapse(workdir / "plain", extra_config={"enable_authenticated_media": False}, module_config={}),
        FROZEN: Synapse(
            workdir / "frozen", extra_config={"enable_authenticated_media": False},
            module_config={"freeze": {"after": FREEZE_AFTER, "mode": "enforce"}},
        ),
    }
    try:
        # (case, server) -> (path, expected status)
        contenders: dict[tuple[str, str], tuple[str, int]] = {}
        for name, hs in servers.items():
            hs.start()
            token = hs.register("bench")
            served = hs.upload(token, b"f" * 1024, "application/octet-stream", "f.bin")
            if name == FROZEN:
                refused = hs.upload(token, b"g" * 1024, "application/octet-stream", "g.bin")
                # Before the first read: the freeze caches a media's creation time once read.
                hs.sql("UPDATE local_media_repository SET created_ts = ? WHERE media_id = ?",
                       (BEFORE_FREEZE_MS, served))
            else:
                refused = "NoSuchMediaOnThisServer"  # Synapse's own 404
            for case, media_id, status in (("served", served, 200), ("refused", refused, 404)):
                contenders[(case, name)] = (f"/_matrix/media/v3/download/{hs.server_name}/{media_id}", status)
        rates: dict[tuple[str, str], list[float]] = {k: [] for k in contenders}
        lat: dict[tuple[str, str], list[float]] = {k: [] for k in contenders}
        errors: dict[tuple[str, str], dict[str, int]] = {k: {} for k in contenders}
        order = list(contenders)
        for r in range(rounds):
            # Each round starts with a different contender, so none always follows the same one.
            for case, name in order[r % len(order):] + order[: r % len(order)]:
                path, status = contenders[(case, name)]
                result = run_round("127.0.0.1", servers[name].port, [path], {}, concurrency, seconds, expect=status)
                rates[(case, name)].append(result.rate)
                lat[(case, name)].extend(result.latencies_ms)
                for kind, n in result.error_kinds.items():
                    errors[(case, name)][kind] = errors[(case, name)].get(kind, 0) + n
        for case, label, goal in (("served", "legacy download 1 KiB, served (200)", 0.95),
                                  ("refused", "legacy download 1 KiB, refused (404)", None)):
            ref = median(rates[(case, PLAIN)])
            for name in servers:
                key = (case, name)
                rate = median(rates[key])
                ratio = rate / ref if ref else float("nan")
                is_ref = name == PLAIN
                report.add(
                    "B4", label, name,
                    ratio="" if is_ref else f"{ratio:.3f}",
                    goal="reference" if is_ref else (f">= {goal}" if goal else "(reported, no goal)"),
                    met=None if is_ref or goal is None else ratio >= goal,
                    **{"req/s": f"{rate:.0f}", "p50 ms": f"{percentile(lat[key], 0.5):.2f}",
                       "p99 ms": f"{percentile(lat[key], 0.99):.2f}", "errors": str(sum(errors[key].values()))},
                )
                if errors[key]:
                    report.fail("B4", f"{label}, {name}: unexpected answers {errors[key]}")
        report.note(
            "B4",
            "Both servers run with Synapse's `enable_authenticated_media: false`, so Synapse's flag "
            "refuses nothing and the only difference is the freeze block (`after: "
            f"{FREEZE_AFTER}`, `mode: enforce`) on one of them. *Served*: a 1 KiB media on "
            "`/_matrix/media/v3/download`, created before the date on the freeze server (its "
            "`created_ts` set back before the first read), so every request goes through the "
            "freeze's decision and is served. *Refused*: on the freeze server a media created "
            "after the date (404 `M_NOT_FOUND` from the freeze); on the other, a media id the "
            "server does not have (Synapse's own 404), the cheapest refusal Synapse makes. "
            f"{concurrency} keep-alive connections, {rounds} rounds of {seconds:g} s per contender, "
            "alternating, each round starting with the next contender; req/s counts expected "
            "answers only (200 or 404), and any other answer is an error that fails the benchmark.",
        )
    finally:
        for hs in servers.values():
            hs.stop()
