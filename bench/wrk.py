"""wrk as the load generator for small uploads: `wrk -t2 -c16 -d<seconds>` with
`bench/wrk_upload.lua`, which sends raw 1 KiB uploads with the service's headers and token (a
distinct X-File-Path per request) and counts the answers by status.

wrk is written in C and keeps 16 connections busy from two threads at tens of thousands of
requests per second here, so it is not what limits a server answering a few thousand. Only
202 answers count as accepted; other statuses and socket errors are kept and reported. The
latency percentiles are wrk's, over every answer (wrk does not time 202s apart from others).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent / "wrk_upload.lua"
MARKER = "BENCH-RESULT "


def wrk_problem() -> str | None:
    """None when wrk is installed, else why it cannot run."""
    if shutil.which("wrk") is None:
        return "wrk is not on PATH (apt-get install wrk)"
    return None


@dataclass
class WrkResult:
    """One wrk run: its JSON line (see wrk_upload.lua) and when it ran (epoch seconds)."""

    raw: dict[str, Any]
    started_wall: float
    ended_wall: float
    client_cpu_s: float

    @property
    def seconds(self) -> float:
        return float(self.raw["duration_us"]) / 1e6

    @property
    def statuses(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.raw["statuses"].items()}

    @property
    def accepted(self) -> int:
        return self.statuses.get("202", 0)

    @property
    def other_statuses(self) -> dict[str, int]:
        return {k: v for k, v in self.statuses.items() if k != "202"}

    @property
    def socket_errors(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.raw["errors"].items() if k != "status" and v}

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    def latency_ms(self, name: str) -> float:
        return float(self.raw["latency_us"][name]) / 1000

    @property
    def clean(self) -> bool:
        """Every answer was a 202 and no connection failed."""
        return not self.other_statuses and not self.socket_errors

    def problems(self) -> str:
        """What was not a 202, for a note ("" when everything was)."""
        parts = [f"{n} × {status}" for status, n in sorted(self.other_statuses.items())]
        parts += [f"{n} socket {kind} errors" for kind, n in sorted(self.socket_errors.items())]
        return ", ".join(parts)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "answers": int(self.raw["requests"]),
            "sent": int(self.raw["sent"]),
            "accepted": self.accepted,
            "rate_per_s": self.rate,
            "statuses": self.statuses,
            "socket_errors": self.socket_errors,
            "p50_ms": self.latency_ms("p50"),
            "p90_ms": self.latency_ms("p90"),
            "p99_ms": self.latency_ms("p99"),
            "max_ms": self.latency_ms("max"),
            "started_wall": self.started_wall,
            "ended_wall": self.ended_wall,
            "client_cpu_s": self.client_cpu_s,
            "client_cores": self.client_cpu_s / self.seconds if self.seconds else None,
        }


def run_wrk(
    port: int,
    *,
    seconds: float,
    directory: str,
    container: str,
    token: str | None,
    size: int,
    threads: int = 2,
    connections: int = 16,
    url_path: str = "/api/uploads/",
    answer_timeout: float = 30.0,
) -> WrkResult:
    """Run wrk against 127.0.0.1:`port` for `seconds`; raises when it fails or prints no result.

    `answer_timeout` is wrk's --timeout: an answer slower than that counts as a timeout error
    (wrk's default of 2 s would hide slow answers as errors instead of measuring them)."""
    env = dict(
        os.environ,
        BENCH_CONTAINER=container,
        BENCH_DIR=directory,
        BENCH_URL_PATH=url_path,
        BENCH_TOKEN=token or "",
        BENCH_SIZE=str(size),
    )
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        f"{answer_timeout:g}s",
        "-s",
        str(SCRIPT),
        f"http://127.0.0.1:{port}{url_path}",
    ]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    result = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds + answer_timeout + 60,
    )
    ended = time.time()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # wrk is the only child reaped in between: this is its CPU time.
    cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith(MARKER)), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk exited with {result.returncode}: {(result.stderr or result.stdout)[-2000:]}"
        )
    return WrkResult(json.loads(line[len(MARKER) :]), started, ended, cpu)
