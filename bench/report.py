"""Collects benchmark rows and renders them as a terminal table and as docs/benchmarks.md."""

from __future__ import annotations

import attr


@attr.s(auto_attribs=True)
class Row:
    bench: str
    case: str
    contender: str
    figures: dict[str, str]
    ratio: str = ""
    goal: str = ""
    met: str = ""


@attr.s(auto_attribs=True)
class Report:
    machine: str
    quick: bool = False
    rows: list[Row] = attr.Factory(list)
    notes: dict[str, list[str]] = attr.Factory(dict)
    # What went wrong, per benchmark: a crash, or answers the benchmark did not expect.
    # Its figures are not to be trusted; `python -m bench` exits non-zero when any is set.
    failures: dict[str, list[str]] = attr.Factory(dict)
    elapsed: float = 0.0
    date: str = ""

    def add(self, bench: str, case: str, contender: str, ratio: str = "", goal: str = "",
            met: bool | None = None, **figures: str) -> None:
        verdict = "" if met is None else ("yes" if met else "**no**")
        self.rows.append(Row(bench, case, contender, figures, ratio, goal, verdict))
        print(f"   {bench} {case:<28} {contender:<34} {' '.join(f'{k}={v}' for k, v in figures.items())}"
              f" {('ratio=' + ratio) if ratio else ''} {verdict}", flush=True)

    def note(self, bench: str, text: str) -> None:
        self.notes.setdefault(bench, []).append(text)

    def fail(self, bench: str, text: str) -> None:
        self.failures.setdefault(bench, []).append(text)
        print(f"   {bench} FAILED: {text}", flush=True)

    def table(self) -> str:
        lines = []
        for r in self.rows:
            figs = ", ".join(f"{k} {v}" for k, v in r.figures.items())
            lines.append(f"{r.bench:<3} {r.case:<28} {r.contender:<34} {figs:<60} {r.ratio:<10} {r.met}")
        for bench, texts in sorted(self.failures.items()):
            lines += [f"{bench} FAILED: {text}" for text in texts]
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [
            "# Benchmarks",
            "",
            "Produced by `make bench` (`python -m bench`); rerun it to refresh this page.",
            f"Measured {self.date} on: {self.machine}.",
            f"The run took {self.elapsed / 60:.1f} minutes{' (quick mode)' if self.quick else ''}.",
            "",
            "Contenders of a comparison alternate round by round in one run; figures are",
            "medians over rounds, and the ratio compares each contender with the reference",
            "named in the goal. These machines are shared and noisy: read ratios, not absolutes.",
            "",
        ]
        for bench in sorted({r.bench for r in self.rows} | set(self.notes) | set(self.failures)):
            rows = [r for r in self.rows if r.bench == bench]
            out.append(f"## {bench}")
            out.append("")
            for text in self.failures.get(bench, []):
                out.append(f"**Failed**: {text}")
                out.append("")
            if rows:
                keys: list[str] = []
                for r in rows:
                    keys += [k for k in r.figures if k not in keys]
                out.append("| case | contender | " + " | ".join(keys) + " | ratio | goal | met |")
                out.append("|---|---|" + "---|" * len(keys) + "---|---|---|")
                for r in rows:
                    cells = [r.figures.get(k, "") for k in keys]
                    out.append(f"| {r.case} | {r.contender} | " + " | ".join(cells)
                               + f" | {r.ratio} | {r.goal} | {r.met} |")
                out.append("")
            for note in self.notes.get(bench, []):
                out.append(note)
                out.append("")
        return "\n".join(out)
