"""`--profile`: py-spy attached to a server or worker while a benchmark runs, and a short text
summary of where the samples went (the speedscope file itself lands in var/bench/)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import BIN, ROOT, log


def py_spy() -> str | None:
    candidate = BIN / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


class Profiler:
    """Attach `py-spy record` to a process (and its children) until `stop()`."""

    def __init__(self, pid: int, output: Path, *, subprocesses: bool = False, rate: int = 97):
        self.pid = pid
        self.output = output
        self.subprocesses = subprocesses
        self.rate = rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self) -> Profiler:
        binary = py_spy()
        if binary is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return self
        command = [
            binary,
            "record",
            "--pid",
            str(self.pid),
            "--format",
            "speedscope",
            "--rate",
            str(self.rate),
            "--nonblocking",
            "--gil",
            "--output",
            str(self.output),
        ]
        if self.subprocesses:
            command.append("--subprocesses")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.output.with_suffix(".log")
        with open(self._log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # let it attach before the measured work starts
        return self

    def stop(self) -> Path | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.output.exists():
            self.error = f"py-spy wrote nothing: {self._log.read_text()[-500:]}"
            return None
        self._log.unlink(missing_ok=True)
        log(f"profile written to {self.output.relative_to(ROOT)}")
        return self.output


def _short(file: str) -> str:
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3."):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _label(frame: dict[str, Any]) -> str:
    return f"{frame.get('name')} ({_short(str(frame.get('file') or ''))})"


def _package(frame: dict[str, Any]) -> str:
    """The top-level package a frame's file belongs to ("stdlib" for the standard library)."""
    short = _short(str(frame.get("file") or ""))
    head = short.split("/", 1)[0]
    if head.startswith("11") or head == short:
        return "stdlib"
    return head


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Where the samples went: per package (self time), the project's own functions
    (inclusive) and the hottest functions (self), over every thread sampled."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    # One entry per function: speedscope frames differ by line within a function.
    labels = [_label(frame) for frame in frames]
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0.0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            total += weight
            if stack:
                own[labels[stack[-1]]] += weight
                packages[_package(frames[stack[-1]])] += weight
            for label in {labels[index] for index in stack}:
                inclusive[label] += weight
    if not total:
        return {"file": str(path), "samples_s": 0.0, "packages": [], "ours": [], "self": []}

    def rows(counter: Counter[str], keep: Any) -> list[dict[str, Any]]:
        out = []
        for label, weight in counter.most_common():
            if keep(label):
                out.append({"function": label, "share": weight / total})
            if len(out) == top:
                break
        return out

    def project(label: str) -> bool:
        return "(uploads/" in label

    return {
        "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "samples_s": total,
        "packages": [
            {"package": name, "share": weight / total} for name, weight in packages.most_common(8)
        ],
        "ours": rows(inclusive, project),
        "self": rows(own, lambda label: True),
    }


def format_summary(title: str, summary: dict[str, Any]) -> str:
    lines = [
        f"\n-- profile: {title} ({summary['samples_s']:.1f} s of samples holding the GIL, "
        f"{summary['file']})"
    ]
    lines.append(
        "   self time by package: "
        + ", ".join(f"{p['package']} {p['share'] * 100:.0f}%" for p in summary["packages"])
    )
    lines.append("   uploads/ functions, inclusive:")
    for row in summary["ours"]:
        lines.append(f"   {row['share'] * 100:5.1f}%  {row['function']}")
    lines.append("   hottest functions, self:")
    for row in summary["self"][:10]:
        lines.append(f"   {row['share'] * 100:5.1f}%  {row['function']}")
    return "\n".join(lines)


def record(profiles: list[dict[str, Any]], profiler: Profiler, title: str) -> None:
    """Stop a profiler, keep its summary (or why it failed) for the run's JSON, and print it."""
    path = profiler.stop()
    if path is None:
        profiles.append({"title": title, "error": profiler.error})
        return
    summary = summarize(path)
    profiles.append({"title": title, **summary})
    print(format_summary(title, summary))
