"""`scripts/run` started as `make run` starts it, for the tests that need the whole service."""

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, free_port, subprocess_env


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@contextmanager
def run_script(spool: Path, tmp_path: Path, **env: str) -> Iterator[tuple[int, Path, Any]]:
    """`scripts/run` on the test database and spool, on a free port: (port, log, process).
    Stopped with SIGTERM at the end unless the test stopped it."""
    port = free_port()
    log = tmp_path / "run.log"
    environment = subprocess_env(
        spool,
        BIN=str(Path(sys.executable).parent),
        PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        **env,
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["scripts/run"], cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: listening(port), 30, "the web server")
        yield port, log, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
