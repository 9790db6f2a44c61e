"""B4: legacy downloads with the freeze enforced (media older than the date) vs no freeze.

Two servers side by side, the same media on each, rounds alternating between them.
Goal: requests/s ratio >= 0.95.
"""

from __future__ import annotations

from pathlib import Path

from bench.load import median, percentile, run_round
from bench.report import Report
from tests.harness import Synapse


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    rounds, seconds, concurrency = (3, 1.0, 8) if quick else (7, 3.0, 16)
    servers = {
        "no freeze block": Synapse(workdir / "plain", module_config={}),
        "freeze: enforce": Synapse(
            workdir / "frozen", module_config={"freeze": {"after": "2999-01-01T00:00:00Z", "mode": "enforce"}}
        ),
    }
    try:
        paths = {}
        for name, hs in servers.items():
            hs.start()
            token = hs.register("bench")
            mid = hs.upload(token, b"f" * 1024, "application/octet-stream", "f.bin")
            paths[name] = f"/_matrix/media/v3/download/{hs.server_name}/{mid}"
            # Served on the legacy path: older than the date (freeze) or... Synapse's own flag
            # would refuse it on the plain server, so serve it there as pre-freeze media.
            if name == "no freeze block":
                hs.sql("UPDATE local_media_repository SET authenticated = ?", (False,))
        rates: dict[str, list[float]] = {k: [] for k in servers}
        lat: dict[str, list[float]] = {k: [] for k in servers}
        for _ in range(rounds):
            for name, hs in servers.items():
                result = run_round("127.0.0.1", hs.port, [paths[name]], {}, concurrency, seconds)
                assert result.errors == 0, (name, result.errors)
                rates[name].append(result.rate)
                lat[name].extend(result.latencies_ms)
        ref = median(rates["no freeze block"])
        for name in servers:
            rate = median(rates[name])
            is_ref = name == "no freeze block"
            report.add(
                "B4", "legacy download 1 KiB", name,
                ratio="" if is_ref else f"{rate / ref:.3f}",
                goal="reference" if is_ref else ">= 0.95",
                met=None if is_ref else rate / ref >= 0.95,
                **{"req/s": f"{rate:.0f}", "p50 ms": f"{percentile(lat[name], 0.5):.2f}",
                   "p99 ms": f"{percentile(lat[name], 0.99):.2f}"},
            )
    finally:
        for hs in servers.values():
            hs.stop()
