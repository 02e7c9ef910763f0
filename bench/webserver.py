"""Benchmark: the web server as shipped (granian, scripts/web) against the one it replaced
(gunicorn 27 gthread with the same workers and threads), side by side in one run.

Per database, each server twice in the order before, after, after, before (once each with
--quick), each time on an emptied database and spool with the push workers stopped:

- small: `wrk -t2 -c16` for 10 s (3 s with --quick) of 1 KiB raw uploads through the real upload
  endpoint (bench/wrk-upload.lua), after a 2 s warm-up; accepted/s, p50, p99, the server
  processes' CPU per request (steadier than the rate on a shared machine), and the tasks the
  database holds afterwards (every 202 is a task);
- big: one 1 GiB raw upload (64 MiB with --quick): MB/s from the first byte to the 202, the
  server's CPU seconds, the 202's delay after the last byte, RSS growth of the server's worker
  processes;
- slow clients: 200 connections that send their request headers one byte a second while another
  client asks for /healthz and makes a 1 KiB upload (10 s timeout each): the time each took.

Needs `wrk` (Debian package) and gunicorn (in the `bench` extra, kept for this comparison).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

from bench.client import big_upload, upload_request
from bench.common import (
    BIN,
    CONTAINER,
    MIB,
    ROOT,
    Context,
    CpuMeter,
    Database,
    RssSampler,
    WebServer,
    dbtool,
    empty_dir,
    log,
    running,
    service_env,
    table,
    write_result,
)

SLOW_CLIENTS = 200
PROBE_TIMEOUT = 10.0
LUA = ROOT / "bench" / "wrk-upload.lua"


class GunicornGthread(WebServer):
    """The server scripts/run started before granian: gunicorn gthread, same flags."""

    name = "gunicorn gthread (before)"

    def command(self) -> list[str]:
        return [
            str(BIN / "gunicorn"),
            "uploadsvc.wsgi:application",
            "--worker-class",
            "gthread",
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--graceful-timeout",
            "30",
            "--access-logfile",
            "-",
        ]


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, p50/p99 (ms), request count and non-2xx/3xx answers from `wrk --latency`."""
    latency = {
        int(p): _ms(v, u)
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    }
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    count = re.search(r"^\s+(\d+) requests in", output, re.M)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)$", output, re.M)
    return {
        "rate_per_s": float(rate.group(1)) if rate else None,
        "p50_ms": latency.get(50),
        "p99_ms": latency.get(99),
        "requests": int(count.group(1)) if count else None,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def wrk(ctx: Context, port: int, token: str, seconds: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "BENCH_TOKEN": token,
        "BENCH_CONTAINER": CONTAINER,
        "BENCH_PATH": f"{ctx.container_dir}/web/small.bin",
    }
    result = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{ctx.cfg.clients}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(LUA),
            f"http://127.0.0.1:{port}/api/uploads/",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    return parse_wrk(result.stdout)


def _timed(what: Any) -> dict[str, Any]:
    began = time.monotonic()
    try:
        status = what()
    except OSError as exc:
        return {"status": None, "seconds": time.monotonic() - began, "error": repr(exc)}
    return {"status": status, "seconds": time.monotonic() - began}


def slow_clients(port: int, token: str, path: str) -> dict[str, Any]:
    """SLOW_CLIENTS connections trickle header bytes, one a second each; meanwhile one client
    gets /healthz and another makes a 1 KiB upload. How long each took (None: no answer)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(SLOW_CLIENTS)]
    stop = threading.Event()
    line = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 200

    def trickle() -> None:
        for i in range(len(line)):
            for sock in socks:
                try:
                    sock.send(line[i : i + 1])
                except OSError:
                    pass
            if stop.wait(1.0):
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(3)  # every slow connection has sent a few bytes

        def healthz() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            return status

        def upload() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
            conn.request(
                "POST",
                "/api/uploads/",
                body=b"p" * 1024,
                headers={
                    "Authorization": f"Token {token}",
                    "Content-Type": "application/octet-stream",
                    "X-Container-Name": CONTAINER,
                    "X-File-Path": path,
                },
            )
            status = conn.getresponse().status
            conn.close()
            return status

        return {"healthz": _timed(healthz), "upload": _timed(upload)}
    finally:
        stop.set()
        thread.join()
        for sock in socks:
            sock.close()


def _one(ctx: Context, db: Database, server_class: type[WebServer], label: str) -> dict[str, Any]:
    cfg = ctx.cfg
    log(f"webserver: {server_class.name} on {db.name} ({label})")
    dbtool(db, ctx.workdir, "reset")
    spool = ctx.workdir / f"spool-web-{db.name}"
    empty_dir(spool)
    token = ctx.tokens[db.name]
    server = server_class(
        service_env(db, spool, ctx.workdir),
        workers=cfg.web_workers,
        threads=cfg.web_threads,
        log_path=ctx.workdir / f"web-{db.name}-{label}.log",
    )
    with running(server):
        wrk(ctx, server.port, token, 2)  # warm-up: every process has loaded the app
        dbtool(db, ctx.workdir, "reset")
        seconds = 3 if cfg.quick else 10
        with CpuMeter(server.worker_pids()) as cpu:
            small = wrk(ctx, server.port, token, seconds)
        small.update(cpu.result)
        # CPU per request: steadier than requests/s when the machine is shared.
        small["server_cpu_ms_per_request"] = (
            cpu.result["server_cores"] * cpu.wall * 1000 / small["requests"]
            if small["requests"]
            else None
        )
        with db.connect() as conn:
            small["tasks_queued"] = sum(db.status_counts(conn).values())
        dbtool(db, ctx.workdir, "reset")
        empty_dir(spool)

        source = ctx.big_file()
        head = upload_request(
            port=server.port,
            token=token,
            container=CONTAINER,
            path=f"{ctx.container_dir}/web/big.bin",
            length=source.stat().st_size,
        )
        os.sync()
        with RssSampler(server.worker_pids()) as sampler, CpuMeter(server.worker_pids()) as cpu:
            big = big_upload(server.port, head, source)
        if big.status != 202:
            raise RuntimeError(f"big upload answered {big.status}: {big.body[:300]!r}")
        empty_dir(spool)
        slow = slow_clients(server.port, token, f"{ctx.container_dir}/web/probe.bin")
    empty_dir(spool)
    return {
        "server": server_class.name,
        "small": small,
        "big": {
            "mb_per_s": big.mb_per_s,
            "answer_after_last_byte_ms": (big.seconds - big.body_sent_at) * 1000,
            "rss": sampler.report(),
            "server_cpu_s": cpu.result["server_cores"] * cpu.wall,
            "machine_busy_pct": cpu.result["machine_busy_pct"],
        },
        "slow_clients": slow,
    }


def _probe_cell(result: dict[str, Any]) -> str:
    if result["status"] is None:
        return f"none in {result['seconds']:.1f} s"
    return f"{result['status']} in {result['seconds']:.2f} s"


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    if not (BIN / "gunicorn").exists():
        raise RuntimeError("gunicorn is not installed (pip install -e '.[dev]')")
    order: list[type[WebServer]] = [GunicornGthread, WebServer]
    if not cfg.quick:
        order += [WebServer, GunicornGthread]
    results: dict[str, list[dict[str, Any]]] = {}
    for name, db in ctx.databases.items():
        results[name] = [
            _one(ctx, db, server_class, f"{i}") for i, server_class in enumerate(order)
        ]

    rows = []
    for name, runs in results.items():
        for r in sorted(runs, key=lambda r: r["server"]):
            small, big = r["small"], r["big"]
            rows.append(
                [
                    f"{r['server']}/{name}",
                    small["rate_per_s"],
                    small["p50_ms"],
                    small["p99_ms"],
                    small["server_cpu_ms_per_request"],
                    small["machine_busy_pct"],
                    small["non_2xx"],
                    small["tasks_queued"],
                    big["mb_per_s"],
                    big["server_cpu_s"],
                    big["answer_after_last_byte_ms"],
                    big["rss"]["growth_mib"],
                    _probe_cell(r["slow_clients"]["healthz"]),
                    _probe_cell(r["slow_clients"]["upload"]),
                ]
            )
    size = f"{cfg.big_size // MIB} MiB" if cfg.big_size < 1024 * MIB else "1 GiB"
    print(
        table(
            f"webserver: wrk -t2 -c{cfg.clients} 1 KiB uploads, one {size} upload, "
            f"{SLOW_CLIENTS} slow-header clients ({cfg.web_workers} workers × "
            f"{cfg.web_threads} threads, push workers stopped)",
            [
                "server/db",
                "small/s",
                "p50 ms",
                "p99 ms",
                "CPU ms/req",
                "busy %",
                "non-2xx",
                "tasks",
                "big MB/s",
                "big CPU s",
                "202 after last byte ms",
                "RSS growth MiB",
                "/healthz, slow clients",
                "upload, slow clients",
            ],
            rows,
        )
    )
    payload = {"name": "webserver", "config": cfg.as_dict(), "results": results}
    path = write_result("webserver", ctx.stamp, payload)
    log(f"webserver results: {path}")
    return payload
