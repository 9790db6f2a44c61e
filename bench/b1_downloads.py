"""B1: downloads on the module's unstable MSC3916 and MSC1902 paths vs Synapse's stable path.

Same server, same media, many concurrent keep-alive clients; 1 KiB and 1 MiB files.
Goal: requests/s ratio >= 0.95 and p50 within 1 ms of the stable endpoint.
"""

from __future__ import annotations

from pathlib import Path

from bench.load import median, percentile, run_round
from bench.report import Report
from tests.harness import Synapse


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    rounds, seconds, concurrency = (2, 0.5, 8) if quick else (7, 3.0, 16)
    hs = Synapse(workdir / "hs", extra_config={"enable_authenticated_media": False}).start()
    try:
        token = hs.register("bench")
        sn = hs.server_name
        for size_name, size in (("1 KiB", 1024), ("1 MiB", 1024 * 1024)):
            mid = hs.upload(token, b"b" * size, "application/octet-stream", "f.bin")
            contenders = {
                "stable /_matrix/client/v1": f"/_matrix/client/v1/media/download/{sn}/{mid}",
                "unstable MSC3916": f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}",
                "MSC1902 r0 (no token)": f"/_matrix/client/r0/media/download/{sn}/{mid}",
            }
            rates: dict[str, list[float]] = {k: [] for k in contenders}
            lat: dict[str, list[float]] = {k: [] for k in contenders}
            errors = dict.fromkeys(contenders, 0)
            headers = {"Authorization": f"Bearer {token}"}
            run_round("127.0.0.1", hs.port, [contenders["stable /_matrix/client/v1"]], headers, concurrency, 0.5)
            for _ in range(rounds):
                for name, path in contenders.items():
                    result = run_round("127.0.0.1", hs.port, [path], headers, concurrency, seconds)
                    rates[name].append(result.rate)
                    lat[name].extend(result.latencies_ms)
                    errors[name] += result.errors
            ref = "stable /_matrix/client/v1"
            ref_rate, ref_p50 = median(rates[ref]), percentile(lat[ref], 0.5)
            for name in contenders:
                rate, p50, p99 = median(rates[name]), percentile(lat[name], 0.5), percentile(lat[name], 0.99)
                is_ref = name == ref
                ratio = rate / ref_rate if ref_rate else float("nan")
                report.add(
                    "B1", f"download {size_name}", name,
                    ratio="" if is_ref else f"{ratio:.3f}",
                    goal="reference" if is_ref else ">= 0.95, p50 +1 ms",
                    met=None if is_ref else (ratio >= 0.95 and p50 - ref_p50 <= 1.0),
                    **{"req/s": f"{rate:.0f}", "p50 ms": f"{p50:.2f}", "p99 ms": f"{p99:.2f}",
                       "errors": str(errors[name])},
                )
                if errors[name]:
                    report.fail("B1", f"download {size_name}, {name}: {errors[name]} unexpected answers")
    finally:
        hs.stop()
