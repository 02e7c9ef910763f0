"""Benchmark 2, end to end: uploads that land in the running container `uploadsvc-run`.

Per database, with the web server and `run_push_workers` (the Incus pusher, --push-threads
threads), and for the Go reference (its goroutines POST to the Incus files endpoint):

- small: `wrk -t2 -c16 -d10s` (3 s with --quick) of 1 KiB uploads (bench/wrk_upload.lua), then
  a wait until every upload the server accepted was pushed; files landed per second = the files
  found in the container over the time from wrk's start to the last push finished (the task's
  finished_at, or the reference's last push);
- big: one 1 GiB upload (64 MiB with --quick), upload-to-landed time, split into upload, wait and
  push; `incus file push` of the same file is the yardstick for the push;
- idle: uploads one at a time with random gaps; 202 → push start (UploadTask.started_at, the
  claim, minus the time the client had the 202) p50/p99, and row created → claim (server clock
  only). The first can be negative: the wake-up is sent on commit, before the 202 is written.
  PostgreSQL workers are woken by LISTEN/NOTIFY, SQLite workers by the wake-up pipe.

Every phase starts fresh processes on an emptied queue and runs uploadsvc (per database) and the
reference back to back; the files are removed from the container afterwards.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.client import Connection, big_upload, upload_request
from bench.common import (
    CONTAINER,
    MIB,
    Check,
    Context,
    Database,
    OursProbe,
    PushWorkers,
    WebServer,
    count_in_container,
    dbtool,
    empty_dir,
    in_container,
    incus,
    log,
    percentile,
    ratio_check,
    running,
    service_env,
    settled,
    size_in_container,
    table,
    wait_until,
    write_result,
)
from bench.profiling import Profiler
from bench.profiling import record as record_profile
from bench.reference import GoRef
from bench.wrk import WrkResult, run_wrk

START_LIMIT_MS = 50.0
# wrk_upload.lua names its files w<thread>-<n>.
WRK_PREFIX = "w[0-9]"


# --- helpers --------------------------------------------------------------------------------


@contextmanager
def _ours(
    ctx: Context, db: Database, phase: str, *, s3: bool = False
) -> Iterator[tuple[WebServer, PushWorkers]]:
    dbtool(db, ctx.workdir, "reset")
    spool = ctx.workdir / f"spool-e2e-{db.name}-{phase}"
    empty_dir(spool)
    extra = ctx.object_store_env(f"e2e-{db.name}-{phase}") if s3 else {}
    env = service_env(db, spool, ctx.workdir, **extra)
    logs = ctx.workdir / f"e2e-{db.name}-{phase}"
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
        yield server, workers
    empty_dir(spool)


@contextmanager
def _go(ctx: Context, phase: str) -> Iterator[GoRef]:
    assert ctx.go_binary is not None
    spool = ctx.workdir / f"spool-e2e-go-{phase}"
    empty_dir(spool)
    server = GoRef(
        ctx.go_binary,
        spool,
        workers=ctx.cfg.push_threads,
        push=True,
        log_path=ctx.workdir / f"e2e-go-{phase}.log",
    )
    try:
        yield server.start()
    finally:
        server.stop()
        empty_dir(spool)


def _one_upload(port: int, token: str | None, path: str, body: bytes) -> tuple[float, Any]:
    conn = Connection(port)
    try:
        response = conn.request(
            upload_request(port=port, token=token, container=CONTAINER, path=path, body=body)
        )
    finally:
        conn.close()
    answered = time.time()
    if response.status != 202:
        raise RuntimeError(f"upload answered {response.status}: {response.body[:300]!r}")
    data = response.json() if response.headers.get("content-type", "").startswith("appl") else {}
    return answered, data


# --- small files ---------------------------------------------------------------------------


def _small_load(ctx: Context, port: int, token: str | None, directory: str) -> WrkResult:
    cfg = ctx.cfg
    return run_wrk(
        port,
        seconds=cfg.wrk_seconds,
        directory=directory,
        container=CONTAINER,
        token=token,
        size=cfg.small_size,
        threads=cfg.wrk_threads,
        connections=cfg.clients,
    )


def _landed(
    load: WrkResult, directory: str, *, taken: int, last_done: float | None, cut_off: bool
) -> dict[str, Any]:
    """Files landed per second: the uploads found in the container over the time from wrk's
    start to the last push finished. `taken`: uploads the server accepted (wrk does not count
    the answers still in flight when it stops; the server may have taken those too)."""
    landed = count_in_container(directory, WRK_PREFIX)
    elapsed = last_done - load.started_wall if last_done else None
    return {
        "uploads": load.summary(),
        "server_accepted": taken,
        "landed_in_container": landed,
        "cut_off": cut_off,
        "seconds": elapsed,
        "landed_per_s": landed / elapsed if elapsed else None,
    }


def _small_ours(ctx: Context, db: Database) -> dict[str, Any]:
    log(f"e2e small files: uploadsvc on {db.name}")
    cfg = ctx.cfg
    directory = ctx.prepare_container_dir(f"{db.name}-small")
    token = ctx.tokens[db.name]
    cut_off = False
    with _ours(ctx, db, "small") as (server, workers):
        probe = OursProbe(db)
        try:
            _one_upload(server.port, token, f"{directory}/warm", b"warm")
            wait_until(lambda: probe.done(1), timeout=60, what="the warm-up push")
            profiler = None
            if cfg.profile and db.name == "postgres":
                profiler = Profiler(
                    workers.pids()[0], ctx.profile_path(f"e2e-workers-{db.name}")
                ).start()
            load = _small_load(ctx, server.port, token, directory)
            total = settled(probe.total)
            try:
                wait_until(
                    lambda: probe.done(total), timeout=cfg.load_timeout, what=f"{total} pushes"
                )
            except RuntimeError as exc:
                log(f"e2e small files on {db.name}: {exc}")
                cut_off = True
            if profiler is not None:
                record_profile(ctx.profiles, profiler, f"e2e push workers ({db.name})")
            counts = probe.counts()
        finally:
            probe.close()
    summary = dbtool(db, ctx.workdir, "summary")
    if summary["errors"]:
        log(f"e2e small files on {db.name}: errors {summary['errors']}")
    return {
        **_landed(
            load, directory, taken=total - 1, last_done=summary["last_finished"], cut_off=cut_off
        ),
        "counts": counts,
        "errors": summary["errors"],
    }


def _small_go(ctx: Context) -> dict[str, Any]:
    log("e2e small files: Go reference")
    cfg = ctx.cfg
    directory = ctx.prepare_container_dir("go-small")
    cut_off = False
    with _go(ctx, "small") as server:
        _one_upload(server.port, None, f"{directory}/warm", b"warm")
        wait_until(lambda: server.done(1), timeout=60, what="the warm-up push")
        load = _small_load(ctx, server.port, None, directory)
        total = settled(lambda: int(server.stats()["accepted"]))
        try:
            wait_until(lambda: server.done(total), timeout=cfg.load_timeout, what="Go pushes")
        except RuntimeError as exc:
            log(f"e2e small files, Go reference: {exc}")
            cut_off = True
        stats = server.stats()
    last_done = stats["last_done_ns"] / 1e9 if stats["last_done_ns"] else None
    return {
        **_landed(load, directory, taken=total - 1, last_done=last_done, cut_off=cut_off),
        "counts": {"succeeded": stats["pushed"], "failed": stats["failed"]},
    }


def _small_problems(who: str, r: dict[str, Any]) -> list[str]:
    """What a reader of the landed/s figure must know: cut off, missing files, not-202s."""
    problems = []
    if r["cut_off"]:
        problems.append(f"{who}: cut off before every push finished")
    if r["landed_in_container"] != r["server_accepted"]:
        problems.append(
            f"{who}: {r['landed_in_container']} files in the container of "
            f"{r['server_accepted']} accepted"
        )
    other = {k: n for k, n in r["uploads"]["statuses"].items() if k != "202"}
    if other or r["uploads"]["socket_errors"]:
        problems.append(f"{who}: not 202: {other} {r['uploads']['socket_errors']}")
    return problems


# --- one big file -------------------------------------------------------------------------


def _big_ours(ctx: Context, db: Database, *, s3: bool = False) -> dict[str, Any]:
    variant = f"{db.name}+s3" if s3 else db.name
    log(f"e2e big file: uploadsvc on {variant}")
    directory = ctx.prepare_container_dir(f"{variant}-big")
    source = ctx.big_file()
    target = f"{directory}/big.bin"
    phase = "big-s3" if s3 else "big"
    with _ours(ctx, db, phase, s3=s3) as (server, _workers):
        probe = OursProbe(db)
        try:
            head = upload_request(
                port=server.port,
                token=ctx.tokens[db.name],
                container=CONTAINER,
                path=target,
                length=source.stat().st_size,
            )
            os.sync()
            upload = big_upload(server.port, head, source)
            if upload.status != 202:
                raise RuntimeError(f"big upload answered {upload.status}")
            wait_until(lambda: probe.done(1), timeout=600, interval=0.02, what="the big push")
        finally:
            probe.close()
    task = dbtool(db, ctx.workdir, "summary", "--tasks")["tasks"][0]
    size = size_in_container(target)
    in_container("rm", "-f", target)
    left = ctx.empty_object_store(f"e2e-{db.name}-{phase}") if s3 else 0
    return {
        "objects_left": left,
        "status": task["status"],
        "bytes": upload.size,
        "landed_size": size,
        "upload_s": upload.seconds,
        "wait_s": task["started"] - upload.answered_wall,
        "push_s": task["attempt_finished"] - task["attempt_started"],
        "landed_s": task["finished"] - upload.started_wall,
    }


def _big_go(ctx: Context) -> dict[str, Any]:
    log("e2e big file: Go reference")
    directory = ctx.prepare_container_dir("go-big")
    source = ctx.big_file()
    target = f"{directory}/big.bin"
    with _go(ctx, "big") as server:
        head = upload_request(
            port=server.port,
            token=None,
            container=CONTAINER,
            path=target,
            length=source.stat().st_size,
        )
        os.sync()
        upload = big_upload(server.port, head, source)
        if upload.status != 202:
            raise RuntimeError(f"big upload answered {upload.status}")
        wait_until(lambda: server.done(1), timeout=600, interval=0.02, what="Go's push")
        stats = server.stats()
    size = size_in_container(target)
    in_container("rm", "-f", target)
    done = stats["last_done_ns"] / 1e9
    wait = stats["wait_p50_ms"] / 1000
    return {
        "status": "succeeded" if stats["pushed"] == 1 else "failed",
        "bytes": upload.size,
        "landed_size": size,
        "upload_s": upload.seconds,
        "wait_s": wait,
        "push_s": done - upload.answered_wall - wait,
        "landed_s": done - upload.started_wall,
    }


def _big_cli(ctx: Context, tag: str) -> dict[str, Any]:
    """`incus file push` of the same file, right after a variant's own push (pairs them up:
    the container's filesystem is in the same state for both)."""
    log("e2e big file: incus file push")
    directory = ctx.prepare_container_dir(f"cli-big-{tag}")
    source = ctx.big_file()
    target = f"{directory}/big.bin"
    os.sync()
    began = time.perf_counter()
    incus("file", "push", str(source), f"{CONTAINER}{target}")
    seconds = time.perf_counter() - began
    size = size_in_container(target)
    in_container("rm", "-f", target)
    return {"bytes": source.stat().st_size, "landed_size": size, "push_s": seconds}


# --- idle latency -------------------------------------------------------------------------


def _gaps(ctx: Context) -> list[float]:
    rng = random.Random(ctx.cfg.run_id)
    return [rng.uniform(0.2, 0.6) for _ in range(ctx.cfg.idle_count)]


def _idle_ours(ctx: Context, db: Database) -> dict[str, Any]:
    log(f"e2e idle latency: uploadsvc on {db.name}")
    directory = ctx.prepare_container_dir(f"{db.name}-idle")
    answered: dict[str, float] = {}
    with _ours(ctx, db, "idle") as (server, _workers):
        probe = OursProbe(db)
        try:
            time.sleep(1.0)  # the workers are up and idle
            for n, gap in enumerate(_gaps(ctx)):
                at, data = _one_upload(
                    server.port, ctx.tokens[db.name], f"{directory}/i-{n:04d}", b"x" * 1024
                )
                answered[str(data["id"])] = at
                wait_until(
                    functools.partial(probe.done, n + 1),
                    timeout=60,
                    interval=0.005,
                    what="an idle push",
                )
                time.sleep(gap)
        finally:
            probe.close()
    tasks = dbtool(db, ctx.workdir, "summary", "--tasks")["tasks"]
    mine = [t for t in tasks if t["id"] in answered]
    starts = [(t["started"] - answered[t["id"]]) * 1000 for t in mine]
    queued = [(t["started"] - t["created"]) * 1000 for t in mine]
    lands = [(t["finished"] - answered[t["id"]]) * 1000 for t in mine]
    return {
        "uploads": len(answered),
        "start_p50_ms": percentile(starts, 0.5),
        "start_p99_ms": percentile(starts, 0.99),
        "queued_start_p50_ms": percentile(queued, 0.5),
        "queued_start_p99_ms": percentile(queued, 0.99),
        "landed_p50_ms": percentile(lands, 0.5),
        "landed_p99_ms": percentile(lands, 0.99),
        "starts_ms": starts,
    }


def _idle_go(ctx: Context) -> dict[str, Any]:
    log("e2e idle latency: Go reference")
    directory = ctx.prepare_container_dir("go-idle")
    lands: list[float] = []
    with _go(ctx, "idle") as server:
        for n, gap in enumerate(_gaps(ctx)):
            at, _ = _one_upload(server.port, None, f"{directory}/i-{n:04d}", b"x" * 1024)
            wait_until(
                functools.partial(server.done, n + 1),
                timeout=60,
                interval=0.005,
                what="an idle push",
            )
            lands.append((server.stats()["last_done_ns"] / 1e9 - at) * 1000)
            time.sleep(gap)
        stats = server.stats()
    return {
        "uploads": len(lands),
        "start_p50_ms": None,
        "start_p99_ms": None,
        "queued_start_p50_ms": stats["wait_p50_ms"],
        "queued_start_p99_ms": stats["wait_p99_ms"],
        "landed_p50_ms": percentile(lands, 0.5),
        "landed_p99_ms": percentile(lands, 0.99),
    }


# --- the benchmark ------------------------------------------------------------------------


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    # Phase by phase, so that uploadsvc and the reference run each one back to back.
    results: dict[str, dict[str, Any]] = {name: {} for name in ctx.databases}
    if ctx.go_binary is not None:
        results["go"] = {}
    for name, db in ctx.databases.items():
        results[name]["small"] = _small_ours(ctx, db)
    if "go" in results:
        results["go"]["small"] = _small_go(ctx)
    for name, db in ctx.databases.items():
        results[name]["big"] = _big_ours(ctx, db)
        results[name]["big_s3"] = _big_ours(ctx, db, s3=True)
        results[name]["cli"] = _big_cli(ctx, name)
    if "go" in results:
        results["go"]["big"] = _big_go(ctx)
        results["go"]["cli"] = _big_cli(ctx, "go")
    for name, db in ctx.databases.items():
        results[name]["idle"] = _idle_ours(ctx, db)
    if "go" in results:
        results["go"]["idle"] = _idle_go(ctx)

    def label(variant: str) -> str:
        return "Go reference" if variant == "go" else f"uploadsvc/{variant}"

    print(
        table(
            f"end to end: wrk -t{cfg.wrk_threads} -c{cfg.clients} -d{cfg.wrk_seconds:g}s of "
            f"{cfg.small_size} B uploads into {CONTAINER} ({cfg.push_threads} push threads), "
            "then until the last one landed",
            [
                "server",
                "landed/s",
                "seconds",
                "server accepted",
                "in container",
                "accepted/s",
                "p50 ms",
                "p99 ms",
                "not 202",
                "cut off",
            ],
            [
                [
                    label(v),
                    r["small"]["landed_per_s"],
                    r["small"]["seconds"],
                    r["small"]["server_accepted"],
                    r["small"]["landed_in_container"],
                    r["small"]["uploads"]["rate_per_s"],
                    r["small"]["uploads"]["p50_ms"],
                    r["small"]["uploads"]["p99_ms"],
                    sum(n for k, n in r["small"]["uploads"]["statuses"].items() if k != "202")
                    + sum(r["small"]["uploads"]["socket_errors"].values()),
                    r["small"]["cut_off"],
                ]
                for v, r in results.items()
            ],
        )
    )
    size = cfg.big_size
    mb = size / 1e6
    big_rows = [
        [
            label(v),
            r["big"]["landed_s"],
            r["big"]["upload_s"],
            r["big"]["wait_s"],
            r["big"]["push_s"],
            mb / r["big"]["push_s"],
            r["cli"]["push_s"],
            mb / r["cli"]["push_s"],
            r["big"]["landed_size"] == size and r["cli"]["landed_size"] == size,
        ]
        for v, r in results.items()
    ]
    big_rows[len(ctx.databases) : len(ctx.databases)] = [
        [
            f"{label(v)} + S3 spool",
            r["big_s3"]["landed_s"],
            r["big_s3"]["upload_s"],
            r["big_s3"]["wait_s"],
            r["big_s3"]["push_s"],
            mb / r["big_s3"]["push_s"],
            r["cli"]["push_s"],
            mb / r["cli"]["push_s"],
            r["big_s3"]["landed_size"] == size and r["big_s3"]["objects_left"] == 0,
        ]
        for v, r in results.items()
        if "big_s3" in r
    ]
    print(
        table(
            f"end to end: one {size // MIB} MiB file (then `incus file push` of it, right after)",
            [
                "server",
                "landed s",
                "upload s",
                "wait s",
                "push s",
                "push MB/s",
                "CLI push s",
                "CLI MB/s",
                "size ok",
            ],
            big_rows,
        )
    )
    print(
        table(
            f"end to end at idle: {cfg.idle_count} uploads one at a time (202 → push start)",
            [
                "server",
                "202→start p50 ms",
                "p99 ms",
                "queued→start p50 ms",
                "p99 ms",
                "202→landed p50 ms",
                "p99 ms",
            ],
            [
                [
                    label(v)
                    + (" (LISTEN/NOTIFY)" if v == "postgres" else "")
                    + (" (wake-up pipe)" if v == "sqlite" else ""),
                    r["idle"]["start_p50_ms"],
                    r["idle"]["start_p99_ms"],
                    r["idle"]["queued_start_p50_ms"],
                    r["idle"]["queued_start_p99_ms"],
                    r["idle"]["landed_p50_ms"],
                    r["idle"]["landed_p99_ms"],
                ]
                for v, r in results.items()
            ],
        )
    )

    go = results.get("go")
    missing = ctx.missing.get("go", "")
    for name in ctx.databases:
        ours = results[name]
        ctx.checks.append(
            ratio_check(
                "e2e small files landed/s ≥ 1.0× Go",
                name,
                ours["small"]["landed_per_s"],
                go["small"]["landed_per_s"] if go else None,
                unit="files/s",
                at_least=1.0,
                note="; ".join(
                    p
                    for p in _small_problems("ours", ours["small"])
                    + (_small_problems("Go", go["small"]) if go else [missing])
                    if p
                ),
            )
        )
        ctx.checks.append(
            ratio_check(
                "1 GiB push MB/s ≥ incus file push",
                name,
                mb / ours["big"]["push_s"],
                mb / ours["cli"]["push_s"],
                unit="MB/s",
                at_least=1.0,
                note="CLI run right after"
                + ("" if size >= 1024 * MIB else f"; {size // MIB} MiB (--quick)"),
            )
        )
        big_check = ratio_check(
            "1 GiB upload-to-landed MB/s vs Go",
            name,
            mb / ours["big"]["landed_s"],
            mb / go["big"]["landed_s"] if go else None,
            unit="MB/s",
            at_least=0.0,
            note=missing or "no target: for the ratio",
        )
        big_check.passed = None
        ctx.checks.append(big_check)
        s3_check = ratio_check(
            "1 GiB upload-to-landed MB/s, S3 spool vs local spool",
            f"{name}+s3",
            mb / ours["big_s3"]["landed_s"],
            mb / ours["big"]["landed_s"],
            unit="MB/s",
            at_least=0.0,
            note="no target: the cost of object storage (local SeaweedFS)",
        )
        s3_check.passed = None
        ctx.checks.append(s3_check)
        p50 = ours["idle"]["start_p50_ms"]
        ctx.checks.append(
            Check(
                f"push-start p50 < {START_LIMIT_MS:.0f} ms at idle",
                name,
                p50,
                "ms",
                reference=go["idle"]["queued_start_p50_ms"] if go else None,
                passed=p50 < START_LIMIT_MS if p50 is not None else None,
                note=("LISTEN/NOTIFY" if name == "postgres" else "wake-up pipe")
                + f"; row created→claim p50 {ours['idle']['queued_start_p50_ms']:.1f} ms",
            )
        )
    payload = {"name": "e2e", "config": cfg.as_dict(), "results": results}
    path = write_result("e2e", ctx.stamp, payload)
    log(f"e2e results: {path}")
    return payload
