"""Benchmark 1, ingest: one big raw upload into the real web server, push workers stopped.

Per database (SQLite, PostgreSQL) and for the Go reference (its workers dequeue without pushing):
one raw upload of 1 GiB (64 MiB with --quick), sent with sendfile(2) on one connection:

- MB/s from the client's first byte written to the whole 202 read;
- the 202 after the last byte, timed on the client from the moment its last write of the body
  returned (the last byte is in the client's kernel then; when the server reads slower, that
  kernel still holds some of the body, and draining it is part of what the client waits for).
  A helper thread also notes when the client's send queue emptied (the server's kernel had
  acknowledged every byte, SIOCOUTQ), reported as a second, smaller figure;
- the RSS growth of the server's worker processes (its children, sampled every 20 ms,
  and VmHWM), after a warm-up in which every process served a small upload.

With the spool on object storage (UPLOADS_SPOOL_URL=s3://…, a local SeaweedFS started for the
run), the same upload again per database: variants `<database>+s3`, side by side.

Small uploads are measured by the `small` benchmark (wrk).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.client import big_upload, upload_request, warm_up
from bench.common import (
    CONTAINER,
    MIB,
    Check,
    Context,
    Database,
    RssSampler,
    WebServer,
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
MB_RATIO = 0.8
ANSWER_LIMIT_MS = 300.0


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
    s3_tag: str | None = None,
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
    if s3_tag is not None:
        ctx.empty_object_store(s3_tag)
    return {
        "bytes": big.size,
        "seconds": big.seconds,
        "mb_per_s": big.mb_per_s,
        "answer_after_last_byte_ms": big.answer_after_sent_ms,
        "answer_after_acknowledged_ms": big.answer_after_delivered_ms,
        "in_flight_at_last_write_mib": big.in_flight_bytes / MIB,
        "rss": rss,
    }


def _ours(ctx: Context, db: Database, *, s3: bool = False) -> dict[str, Any]:
    variant = f"{db.name}+s3" if s3 else db.name
    log(f"ingest: uploadsvc on {variant}")
    dbtool(db, ctx.workdir, "reset")
    spool = ctx.workdir / f"spool-ingest-{db.name}"
    empty_dir(spool)
    s3_tag = f"ingest-{db.name}" if s3 else None
    extra = ctx.object_store_env(s3_tag) if s3_tag else {}
    env = service_env(db, spool, ctx.workdir, **extra)
    server = WebServer(
        env,
        workers=ctx.cfg.web_workers,
        threads=ctx.cfg.web_threads,
        log_path=ctx.workdir / f"web-ingest-{variant}.log",
    )
    with running(server):
        assert server.proc is not None
        profile = (server.proc.pid, f"ingest-{variant}") if ctx.cfg.profile else None
        result = _measure(
            ctx,
            port=server.port,
            token=ctx.tokens[db.name],
            pids=server.worker_pids(),
            spool=spool,
            profile=profile,
            s3_tag=s3_tag,
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


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    results: dict[str, dict[str, Any]] = {}
    for name, db in ctx.databases.items():
        results[name] = _ours(ctx, db)
    for name, db in ctx.databases.items():
        results[f"{name}+s3"] = _ours(ctx, db, s3=True)
    if ctx.go_binary is not None:
        results["go"] = _go(ctx)

    rows = [
        [
            "Go reference" if variant == "go" else f"uploadsvc/{variant}",
            r["mb_per_s"],
            r["answer_after_last_byte_ms"],
            r["answer_after_acknowledged_ms"],
            r["in_flight_at_last_write_mib"],
            r["rss"]["rss_before_mib"],
            r["rss"]["growth_mib"],
        ]
        for variant, r in results.items()
    ]
    size = f"{cfg.big_size // MIB} MiB" if cfg.big_size < 1024 * MIB else "1 GiB"
    print(
        table(
            f"ingest: one {size} raw upload (workers stopped)",
            [
                "server",
                "MB/s",
                "202 after last byte written ms",
                "after last byte acked ms",
                "in flight at last write MiB",
                "RSS before MiB",
                "RSS growth MiB",
            ],
            rows,
        )
    )

    go = results.get("go")
    missing = ctx.missing.get("go", "")
    quick = "" if cfg.big_size >= 1024 * MIB else f"{size} (--quick)"
    for name in [*ctx.databases, *(f"{n}+s3" for n in ctx.databases)]:
        ours = results[name]
        ctx.checks.append(
            ratio_check(
                f"ingest 1 GiB MB/s ≥ {MB_RATIO}× Go",
                name,
                ours["mb_per_s"],
                go["mb_per_s"] if go else None,
                unit="MB/s",
                at_least=MB_RATIO,
                note=missing or quick,
            )
        )
        after = ours["answer_after_last_byte_ms"]
        acked = ours["answer_after_acknowledged_ms"]
        note = "from the client's last write"
        if acked is not None:
            note += f"; {acked:.0f} ms from the server's ack of the last byte"
        if quick:
            note += f"; {quick}"
        ctx.checks.append(
            Check(
                f"ingest 1 GiB: 202 ≤ {ANSWER_LIMIT_MS:.0f} ms after the last byte",
                name,
                after,
                "ms",
                reference=go["answer_after_last_byte_ms"] if go else None,
                passed=after <= ANSWER_LIMIT_MS,
                note=note,
            )
        )
        growth = ours["rss"]["growth_mib"]
        ctx.checks.append(
            Check(
                f"ingest 1 GiB: RSS growth < {RSS_LIMIT_MIB:.0f} MiB",
                name,
                growth,
                "MiB",
                reference=go["rss"]["growth_mib"] if go else None,
                passed=growth < RSS_LIMIT_MIB,
                note=quick,
            )
        )
    payload = {"name": "ingest", "config": cfg.as_dict(), "results": results}
    path = write_result("ingest", ctx.stamp, payload)
    log(f"ingest results: {path}")
    return payload
