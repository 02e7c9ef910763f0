"""Benchmark 1, ingest: uploads into the real gunicorn server with the push workers stopped.

Per database (SQLite, PostgreSQL) and for the Go reference (its workers dequeue without pushing):
one big raw upload (1 GiB; 64 MiB with --quick) — throughput from the first byte sent to the 202,
and the RSS growth of the server's worker processes (gunicorn's children, sampled every 20 ms,
and VmHWM) — then 10,000 × 1 KiB uploads from 16 keep-alive clients: accepted per second and
p50/p99 time to 202. Before that, the same small-upload load against the reference's /discard
handler measures what the client alone can sustain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.client import LoadResult, big_upload, run_load, upload_request, warm_up
from bench.common import (
    CONTAINER,
    MIB,
    Check,
    Context,
    CpuMeter,
    Database,
    Gunicorn,
    RssSampler,
    dbtool,
    empty_dir,
    log,
    ratio_check,
    running,
    service_env,
    table,
    write_result,
)
from bench.profiling import Profiler
from bench.profiling import record as record_profile
from bench.reference import GoRef

RSS_LIMIT_MIB = 64.0


def _small_requests(
    ctx: Context, port: int, token: str | None, prefix: str, count: int, url: str = "/api/uploads/"
) -> list[bytes]:
    body = os.urandom(ctx.cfg.small_size)
    return [
        upload_request(
            port=port,
            token=token,
            container=CONTAINER,
            path=f"{ctx.container_dir}/ingest/{prefix}-{n:06d}",
            body=body,
            url=url,
        )
        for n in range(count)
    ]


def _clear(spool: Path) -> None:
    for entry in spool.iterdir():
        if entry.is_file():
            entry.unlink()


def _measure(
    ctx: Context,
    *,
    port: int,
    token: str | None,
    pids: list[int],
    spool: Path,
    profile: tuple[int, str] | None = None,
) -> dict[str, Any]:
    cfg = ctx.cfg
    warm_up(
        port,
        token,
        pids,
        container=CONTAINER,
        directory=f"{ctx.container_dir}/ingest",
        clients=cfg.clients,
        size=cfg.small_size,
    )

    source = ctx.big_file()
    head = upload_request(
        port=port,
        token=token,
        container=CONTAINER,
        path=f"{ctx.container_dir}/ingest/big.bin",
        length=source.stat().st_size,
    )
    os.sync()  # start without the writeback of earlier steps
    big_profiler = None
    if profile is not None:
        big_profiler = Profiler(
            profile[0], ctx.profile_path(f"{profile[1]}-big"), subprocesses=True
        ).start()
    with RssSampler(pids) as sampler:
        big = big_upload(port, head, source)
    if big_profiler is not None:
        record_profile(ctx.profiles, big_profiler, f"{profile[1] if profile else ''} big upload")
    if big.status != 202:
        raise RuntimeError(f"big upload answered {big.status}: {big.body[:300]!r}")
    rss = sampler.report()
    _clear(spool)

    requests = _small_requests(ctx, port, token, "f", cfg.small_count)
    profiler = None
    if profile is not None:
        profiler = Profiler(profile[0], ctx.profile_path(profile[1]), subprocesses=True).start()
    with CpuMeter(pids) as cpu:
        small = run_load(port, requests, concurrency=cfg.clients, timeout=cfg.load_timeout)
    if profiler is not None:
        record_profile(ctx.profiles, profiler, profile[1] if profile else "")
    return {
        "big": {
            "bytes": big.size,
            "seconds": big.seconds,
            "mb_per_s": big.mb_per_s,
            "answer_after_last_byte_ms": (big.seconds - big.body_sent_at) * 1000,
            "rss": rss,
        },
        "small": {**small.summary(), **cpu.result},
    }


def _ours(ctx: Context, db: Database) -> dict[str, Any]:
    log(f"ingest: uploadsvc on {db.name}")
    dbtool(db, ctx.workdir, "reset")
    spool = ctx.workdir / f"spool-ingest-{db.name}"
    empty_dir(spool)
    env = service_env(db, spool, ctx.workdir)
    server = Gunicorn(
        env,
        workers=ctx.cfg.web_workers,
        threads=ctx.cfg.web_threads,
        log_path=ctx.workdir / f"gunicorn-ingest-{db.name}.log",
    )
    with running(server):
        assert server.proc is not None
        profile = (server.proc.pid, f"ingest-{db.name}") if ctx.cfg.profile else None
        result = _measure(
            ctx,
            port=server.port,
            token=ctx.tokens[db.name],
            pids=server.worker_pids(),
            spool=spool,
            profile=profile,
        )
    with db.connect() as conn:
        result["tasks_queued"] = sum(db.status_counts(conn).values())
    empty_dir(spool)
    return result


def _go(ctx: Context) -> dict[str, Any]:
    assert ctx.go_binary is not None
    log("ingest: Go reference")
    spool = ctx.workdir / "spool-ingest-go"
    empty_dir(spool)
    server = GoRef(
        ctx.go_binary,
        spool,
        workers=ctx.cfg.push_threads,
        push=False,
        log_path=ctx.workdir / "goref-ingest.log",
    )
    try:
        server.start()
        result = _measure(ctx, port=server.port, token=None, pids=[server.pid()], spool=spool)
        result["tasks_queued"] = server.stats()["accepted"]
    finally:
        server.stop()
    empty_dir(spool)
    return result


def _calibrate(ctx: Context) -> dict[str, Any] | None:
    """The client alone: the same small uploads against a handler that only drains the body."""
    if ctx.go_binary is None:
        return None
    log("ingest: client calibration against the Go /discard handler")
    spool = ctx.workdir / "spool-calibrate"
    server = GoRef(
        ctx.go_binary,
        spool,
        workers=1,
        push=False,
        log_path=ctx.workdir / "goref-calibrate.log",
    )
    try:
        server.start()
        requests = _small_requests(ctx, server.port, None, "c", ctx.cfg.small_count, url="/discard")
        result: LoadResult = run_load(
            server.port, requests, concurrency=ctx.cfg.clients, timeout=ctx.cfg.load_timeout
        )
    finally:
        server.stop()
    return result.summary()


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    results: dict[str, dict[str, Any]] = {}
    for name, db in ctx.databases.items():
        results[name] = _ours(ctx, db)
    if ctx.go_binary is not None:
        results["go"] = _go(ctx)
    calibration = _calibrate(ctx)

    rows = []
    for variant, r in results.items():
        big, small = r["big"], r["small"]
        rows.append(
            [
                "Go reference" if variant == "go" else f"uploadsvc/{variant}",
                big["mb_per_s"],
                big["answer_after_last_byte_ms"],
                big["rss"]["rss_before_mib"],
                big["rss"]["growth_mib"],
                small["rate_per_s"],
                small["p50_ms"],
                small["p99_ms"],
                small["requested"] - small["ok"],
                small["server_cores"],
                small["machine_busy_pct"],
                (small["client_cpu_share"] or 0) * 100,
            ]
        )
    if calibration is not None:
        rows.append(
            [
                "client alone (/discard)",
                None,
                None,
                None,
                None,
                calibration["rate_per_s"],
                calibration["p50_ms"],
                calibration["p99_ms"],
                calibration["requested"] - calibration["ok"],
                None,
                None,
                (calibration["client_cpu_share"] or 0) * 100,
            ]
        )
    size = f"{cfg.big_size // MIB} MiB" if cfg.big_size < 1024 * MIB else "1 GiB"
    print(
        table(
            f"ingest: {size} raw upload + {cfg.small_count:,} × {cfg.small_size} B from "
            f"{cfg.clients} clients (workers stopped)",
            [
                "server",
                "big MB/s",
                "202 after last byte ms",
                "RSS before MiB",
                "RSS growth MiB",
                "small accepted/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "server cores",
                "machine busy %",
                "client CPU %",
            ],
            rows,
        )
    )

    go = results.get("go")
    missing = ctx.missing.get("go", "")
    for name in ctx.databases:
        ours = results[name]
        ctx.checks.append(
            ratio_check(
                "ingest big upload MB/s ≥ 0.9× Go",
                name,
                ours["big"]["mb_per_s"],
                go["big"]["mb_per_s"] if go else None,
                unit="MB/s",
                at_least=0.9,
                note=missing,
            )
        )
        growth = ours["big"]["rss"]["growth_mib"]
        ctx.checks.append(
            Check(
                f"ingest big upload RSS growth < {RSS_LIMIT_MIB:.0f} MiB",
                name,
                growth,
                "MiB",
                passed=growth < RSS_LIMIT_MIB,
            )
        )
        ctx.checks.append(
            ratio_check(
                "ingest small uploads/s ≥ 0.9× Go",
                name,
                ours["small"]["rate_per_s"],
                go["small"]["rate_per_s"] if go else None,
                unit="req/s",
                at_least=0.9,
                note=missing,
            )
        )
    notes = []
    if calibration and go:
        bound = go["small"]["rate_per_s"] / calibration["rate_per_s"]
        notes.append(
            f"the Go reference reached {bound:.0%} of the client's own ceiling"
            + (" (client-bound: its figure is a lower bound)" if bound > 0.8 else "")
        )
    for note in notes:
        print(f"   note: {note}")
    payload = {
        "name": "ingest",
        "config": cfg.as_dict(),
        "client_calibration": calibration,
        "results": results,
        "notes": notes,
    }
    path = write_result("ingest", ctx.stamp, payload)
    log(f"ingest results: {path}")
    return payload
