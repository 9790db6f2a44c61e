"""Run the benchmarks side by side and write docs/benchmarks.md.

    python -m bench                 # everything
    python -m bench --only B1,B4    # some
    python -m bench --quick         # shorter rounds, for a smoke run (`make bench-quick`, CI)

A benchmark that crashes or gets answers it did not expect is reported as failed on the
page and the others still run; the exit status is then 1 (timings never fail a run).

Contenders of one comparison alternate round by round in the same run, and the tables
report medians over rounds and the ratio to the reference: these machines are shared and
noisy, so only numbers taken side by side compare. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import Report  # noqa: E402

BENCHMARKS = {
    "B1": "bench.b1_downloads",
    "B2": "bench.b2_cold_reads",
    "B3": "bench.b3_uploads",
    "B4": "bench.b4_freeze",
    "B5": "bench.b5_tools",
    "B6": "bench.b6_redirects",
    "B7": "bench.b7_index",
}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(
            int(line.split()[1]) // 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        mem = 0
    import synapse

    return (
        f"{model}, {os.cpu_count()} cores, {mem} MiB RAM; {platform.platform()}; "
        f"Python {platform.python_version()}; matrix-synapse {synapse.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    wanted = [b.strip().upper() for b in args.only.split(",") if b.strip()]
    report = Report(machine(), quick=args.quick)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="msc3916-bench-") as tmp:
        for bench_id in wanted:
            module_name = BENCHMARKS.get(bench_id)
            if module_name is None:
                parser.error(f"unknown benchmark {bench_id}")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name == module_name:
                    report.note(bench_id, "not implemented yet")
                    continue
                raise
            print(f"== {bench_id}: {module.__doc__.strip().splitlines()[0]}", flush=True)
            bench_start = time.monotonic()
            try:
                module.run(report, Path(tmp) / bench_id.lower(), quick=args.quick)
            except Exception as e:  # one broken benchmark must not lose the others' figures
                traceback.print_exc()
                first_line = (str(e).strip().splitlines() or [""])[0][:300]
                report.fail(bench_id, f"crashed with {type(e).__name__}: {first_line}")
            print(f"   {bench_id} took {time.monotonic() - bench_start:.0f}s", flush=True)
    report.elapsed = time.monotonic() - started
    report.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(report.table())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(report.markdown())
    print(f"written to {args.output}")
    if report.failures:
        print(f"FAILED: {', '.join(sorted(report.failures))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
