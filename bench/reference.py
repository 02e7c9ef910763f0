"""The Go reference (`bench/goref`): build it with the system's Go when there is one, run it.

The build happens in a copy of the sources under the run's temporary directory (GOFLAGS=-mod=mod
makes `go build` write a `go` line into go.mod, and the tree keeps just the module line), with
GOPROXY=off so that nothing is downloaded: the reference uses the standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import INCUS_SOCKET, free_port, stop_process, wait_for_port

SOURCE = Path(__file__).resolve().parent / "goref"


def build(workdir: Path) -> tuple[Path | None, str]:
    """(binary, go version) or (None, why it is missing)."""
    go = shutil.which("go")
    if go is None:
        return None, "go is not on PATH (apt-get install golang-go)"
    build_dir = workdir / "goref-src"
    shutil.rmtree(build_dir, ignore_errors=True)
    build_dir.mkdir(parents=True)
    for name in ("go.mod", "main.go"):
        shutil.copy(SOURCE / name, build_dir / name)
    binary = workdir / "goref"
    env = dict(os.environ, GOFLAGS="-mod=mod", GOPROXY="off", GOTOOLCHAIN="local")
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=build_dir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        return None, f"go build failed: {result.stderr.strip()[-2000:]}"
    version = subprocess.run(
        [go, "version"], capture_output=True, text=True, check=False, timeout=60
    ).stdout.strip()
    return binary, version


class GoRef:
    """A running reference server; `push=False` keeps files instead of pushing them."""

    def __init__(
        self, binary: Path, spool: Path, *, workers: int, push: bool, log_path: Path
    ) -> None:
        self.binary = binary
        self.spool = spool
        self.workers = workers
        self.push = push
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GoRef:
        self.spool.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.binary),
            "-addr",
            f"127.0.0.1:{self.port}",
            "-spool",
            str(self.spool),
            "-socket",
            INCUS_SOCKET,
            "-workers",
            str(self.workers),
            f"-push={'true' if self.push else 'false'}",
        ]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_port(self.port, self.proc, "goref")
        return self

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return [self.pid()]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=10) as r:  # noqa: S310
            data: dict[str, Any] = json.load(r)
        return data

    def done(self, total: int) -> bool:
        """True once `total` tasks were pushed or failed."""
        stats = self.stats()
        return int(stats["pushed"]) + int(stats["failed"]) >= total

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None
