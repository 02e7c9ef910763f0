"""One progress line on standard error, rewritten in place as `incus file push` does
("Pushing app.conf to web1/etc/app.conf: 42% (12.50MB/s)"), and nothing at all when standard
error is not a terminal, so logs and pipes stay clean.

A dozen lines of terminal handling do not earn a dependency: there is one line, no bars side by
side, and results go to standard output between updates.
"""

import os
import shutil
import sys
import time
from typing import TextIO

# Redraw at most this often: a 1 MiB chunk takes a few milliseconds.
INTERVAL = 0.1


def human_size(count: float) -> str:
    """Decimal units with two decimals, as the incus CLI prints them: 12.50MB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.2f}{unit}"
        count /= 1000
    raise AssertionError("unreachable")


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._shown = False
        self._last = 0.0

    def show(self, text: str, *, force: bool = True) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < INTERVAL:
            return
        self._last = now
        width = self._columns() - 1
        if len(text) > width:
            text = text[: max(width - 1, 0)] + "…"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._shown = True

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError):
            return shutil.get_terminal_size().columns

    def clear(self) -> None:
        """Erase the line, before a result is printed or when the command ends."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def transfer(self, label: str, total: int) -> "Transfer":
        return Transfer(self, label, total)


class Transfer:
    """Bytes through one phase (hashing, sending) of one file, with percent and speed."""

    def __init__(self, progress: Progress, label: str, total: int) -> None:
        self.progress = progress
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()

    def restart(self) -> None:
        """From zero again: the file is being resent."""
        self.done = 0
        self.started = time.monotonic()

    def __call__(self, count: int) -> None:
        self.done += count
        self.progress.show(self.text(), force=self.done >= self.total)

    def text(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = human_size(self.done / elapsed)
        if self.total <= 0:
            return f"{self.label}: {human_size(self.done)} ({speed}/s)"
        percent = min(100, self.done * 100 // self.total)
        return f"{self.label}: {percent}% ({speed}/s)"
