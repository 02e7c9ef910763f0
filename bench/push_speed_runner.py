"""Runs `bench/push_speed.py` as a subprocess with a time limit and keeps its output in the
run's results. With `--quick` it is given smaller sizes (--size-mib 64 --runs 1 --small 200)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from bench.common import ROOT, Context, log, write_result

SCRIPT = ROOT / "bench" / "push_speed.py"


def run(ctx: Context) -> dict[str, Any]:
    timeout = 120 if ctx.cfg.quick else 600
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = ["--size-mib", "64", "--runs", "1", "--small", "200"] if ctx.cfg.quick else []
    log(f"push_speed: running bench/push_speed.py {' '.join(args)} (limit {timeout}s)")
    began = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        code: int | None = result.returncode
        stdout, stderr = result.stdout, result.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = f"timed out after {timeout}s"
    print("\n== push_speed (bench/push_speed.py) ==")
    print(stdout.rstrip() or "(no output)")
    if code != 0:
        print(f"   exit {code}: {stderr.strip()[-2000:]}")
    payload = {
        "name": "push_speed",
        "exit_code": code,
        "seconds": time.monotonic() - began,
        "stdout": stdout,
        "stderr": stderr[-5000:],
    }
    write_result("push_speed", ctx.stamp, payload)
    return payload
