"""Progress of the long-running tools (``migrate``, ``gc``, ``scrub``), drawn by tqdm.

On a terminal tqdm draws one self-overwriting bar with the count, the rate and the time
left. When stderr is not a terminal (a log file, a systemd journal, a CI log) a bar
full of carriage returns would be noise, so the same tqdm object prints a plain line
every ``LOG_INTERVAL`` seconds instead (``count/total [elapsed<left, rate]``).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

# Seconds between two plain progress lines when stderr is not a terminal.
LOG_INTERVAL = 10.0


class Progress(tqdm):  # type: ignore[misc]
    """``Progress(label, total)``: a tqdm bar on stderr; ``total`` 0 or None counts
    open-endedly (no ETA). ``step()`` is ``update(1)``; ``initial`` is what a resumed
    run had done before."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "file",
        stream: Any = None,
        initial: int = 0,
    ):
        stream = stream or sys.stderr
        tty = bool(getattr(stream, "isatty", lambda: False)())
        if tty:
            super().__init__(
                total=total or None, desc=label, unit=unit, file=stream, dynamic_ncols=True,
                initial=initial,
            )
            return
        # ``ncols=0`` drops the bar graphic, ``ascii`` keeps log files plain, and the
        # intervals pace the lines.
        super().__init__(
            total=total or None,
            desc=label,
            unit=unit,
            file=_LineStream(stream),
            ncols=0,
            ascii=True,
            initial=initial,
            mininterval=LOG_INTERVAL,
            maxinterval=LOG_INTERVAL,
            miniters=1,
        )

    def step(self, n: int = 1) -> None:
        self.update(n)


class _LineStream:
    """Turn tqdm's ``\\r``-redrawn status into one line per update, for log files."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self._stream.write(text + "\n")

    def flush(self) -> None:
        self._stream.flush()
