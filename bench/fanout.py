"""Benchmark: one 1 MiB file into 20 instances, as one fan-out upload versus 20 uploads.

Per database, in the same run and with fresh processes each time (gunicorn and
`run_push_workers` with --push-threads threads, the Incus pusher): 20 stopped instances made
for the run from the test image (`incus init uploadsvc-busybox`, deleted at the end) get the
same file at the same path,

- fanout: one raw upload with `X-Container-Name: <prefix>-*`, the glob the server expands;
- separate: 20 raw uploads one after the other, one per instance, as a shell loop would send.

Each web process answers a health check first (which loads the app and asks Incus), so that
neither variant pays for a cold start. Reported for each: bytes the client sent, bytes the
server counted as received (`uploadsvc_upload_bytes` from /metrics), spool files the tasks
used, time to the last 202, and time to all landed (from the first byte sent to the last
task's finished_at). The check compares instances landed per second, fan-out over separate
uploads.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.client import big_upload, upload_request
from bench.common import (
    MIB,
    Context,
    Database,
    OursProbe,
    PushWorkers,
    WebServer,
    dbtool,
    empty_dir,
    incus,
    log,
    make_big_file,
    ratio_check,
    running,
    service_env,
    table,
    wait_until,
    write_result,
)

IMAGE = "uploadsvc-busybox"
INSTANCES = 20
SIZE = MIB
PATH = "/root/fanout.bin"


def _make_instances(prefix: str) -> list[str]:
    names = [f"{prefix}-{n:02d}" for n in range(INSTANCES)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: incus("init", IMAGE, name, "-q"), names))
    return names


def _delete_instances(names: list[str]) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: incus("delete", "--force", name, check=False), names))


@contextmanager
def _service(ctx: Context, db: Database, phase: str) -> Iterator[WebServer]:
    dbtool(db, ctx.workdir, "reset")
    spool = ctx.workdir / f"spool-fanout-{db.name}-{phase}"
    empty_dir(spool)
    env = service_env(db, spool, ctx.workdir)
    logs = ctx.workdir / f"fanout-{db.name}-{phase}"
    server = WebServer(
        env,
        workers=ctx.cfg.web_workers,
        threads=ctx.cfg.web_threads,
        log_path=logs.with_suffix(".web.log"),
    )
    workers = PushWorkers(
        env, threads=ctx.cfg.push_threads, log_path=logs.with_suffix(".workers.log")
    )
    with running(server, workers):
        yield server
    empty_dir(spool)


def _received_bytes(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:  # noqa: S310
        for line in answer.read().decode().splitlines():
            if line.startswith("uploadsvc_upload_bytes_total "):
                return float(line.split()[1])
    return 0.0


def _spool_files_used(db: Database) -> int:
    conn = db.connect()
    try:
        row = conn.execute(
            "SELECT count(DISTINCT spool_name) FROM uploads_uploadtask WHERE spool_name <> ''"
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


def _phase(ctx: Context, db: Database, source: Path, targets: list[str], phase: str) -> Any:
    """Upload `source` once per target (an instance, or a glob), one after the other, and
    wait until every task it made has finished."""
    with _service(ctx, db, phase) as server:
        for _ in range(2 * ctx.cfg.web_workers):  # every web process has loaded the app
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30).close()  # noqa: S310
        probe = OursProbe(db)
        try:
            uploads = []
            for target in targets:
                head = upload_request(
                    port=server.port,
                    token=ctx.tokens[db.name],
                    container=target,
                    path=PATH,
                    length=SIZE,
                )
                upload = big_upload(server.port, head, source)
                if upload.status != 202:
                    raise RuntimeError(f"upload to {target} answered {upload.status}")
                uploads.append(upload)
            answered = time.time()
            wait_until(lambda: probe.done(INSTANCES), timeout=600, interval=0.02, what="pushes")
            received = _received_bytes(server.port)
        finally:
            probe.close()
    summary = dbtool(db, ctx.workdir, "summary")
    began = uploads[0].started_wall
    return {
        "uploads": len(uploads),
        "succeeded": summary["counts"].get("succeeded", 0),
        "client_bytes_sent": sum(u.size for u in uploads),
        "server_bytes_received": received,
        "spool_files_used": _spool_files_used(db),
        "accepted_s": answered - began,
        "landed_s": summary["last_finished"] - began,
    }


def run(ctx: Context) -> dict[str, Any]:
    prefix = f"bench-fan-{ctx.cfg.run_id}"
    source = make_big_file(ctx.workdir / "fanout-1mib.bin", SIZE)
    log(f"fanout: creating {INSTANCES} stopped instances {prefix}-NN")
    names = _make_instances(prefix)
    results: dict[str, Any] = {"instances": INSTANCES, "bytes": SIZE}
    try:
        for db in ctx.databases.values():
            log(f"fanout: one upload to {prefix}-* on {db.name}")
            fanout = _phase(ctx, db, source, [f"{prefix}-*"], "fanout")
            log(f"fanout: {INSTANCES} separate uploads on {db.name}")
            separate = _phase(ctx, db, source, names, "separate")
            results[db.name] = {"fanout": fanout, "separate": separate}
            for what, r in (("fanout", fanout), ("separate", separate)):
                if r["succeeded"] != INSTANCES:
                    raise RuntimeError(f"{what} on {db.name}: {r['succeeded']} landed")
            ctx.checks.append(
                ratio_check(
                    "1 MiB to 20 instances: landed/s, one fan-out vs 20 uploads",
                    db.name,
                    INSTANCES / fanout["landed_s"],
                    INSTANCES / separate["landed_s"],
                    unit="instances/s",
                    at_least=1.0,
                )
            )
    finally:
        _delete_instances(names)
    rows = [
        [
            f"{db} {what}",
            r["uploads"],
            r["client_bytes_sent"] / MIB,
            r["server_bytes_received"] / MIB,
            r["spool_files_used"],
            r["accepted_s"],
            r["landed_s"],
        ]
        for db, phases in results.items()
        if isinstance(phases, dict)
        for what, r in phases.items()
    ]
    print(
        table(
            "fanout: 1 MiB into 20 stopped instances",
            ["variant", "uploads", "sent MiB", "received MiB", "spool files", "202s s", "landed s"],
            rows,
            left=(0,),
        )
    )
    write_result("fanout", ctx.stamp, results)
    return results
