"""Benchmark 3, the queue on its own: claims and completions per second with the null pusher.

N pending tasks (10,000 by default or --queue-tasks; 1,000 with --quick), each with its own
1 KiB spool file (a success deletes it), are written with the ORM; then P
`run_push_workers --burst --threads 8` processes with UPLOADS_PUSHER=uploads.pushers.NullPusher
start at once and run until nothing is ready.
PostgreSQL with 1, 2 and 4 processes, SQLite with one. Two rates: from the moment the processes
were started to the last completion (with their start-up), and from the first claim to the last
completion (steady state), both from the rows' own timestamps. A run is cut off (SIGTERM) after
the time limit and reports what it completed.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    CONTAINER,
    Check,
    Context,
    Database,
    PushWorkers,
    dbtool,
    empty_dir,
    log,
    service_env,
    table,
    write_result,
)
from bench.profiling import Profiler
from bench.profiling import record as record_profile

TARGET_PER_S = 2000.0
NULL_PUSHER = "uploads.pushers.NullPusher"


def _run_once(ctx: Context, db: Database, processes: int) -> dict[str, Any]:
    cfg = ctx.cfg
    count = cfg.queue_tasks
    log(f"queue: {db.name}, {processes} process(es) × {cfg.queue_threads} threads, {count:,} tasks")
    spool = ctx.workdir / f"spool-queue-{db.name}-{processes}"
    empty_dir(spool)
    dbtool(db, ctx.workdir, "reset")
    dbtool(
        db,
        ctx.workdir,
        "prefill",
        "--count",
        str(count),
        "--instance",
        CONTAINER,
        "--dir",
        f"{ctx.container_dir}/queue",
        spool=spool,
    )
    env = service_env(db, spool, ctx.workdir, UPLOADS_PUSHER=NULL_PUSHER)
    workers = PushWorkers(
        env,
        processes=processes,
        threads=cfg.queue_threads,
        burst=True,
        log_path=ctx.workdir / f"queue-{db.name}-{processes}.log",
    )
    started = time.time()
    workers.start()
    profiler = None
    title = f"queue workers ({db.name}, {processes} process)"
    if cfg.profile and db.name == "postgres" and processes == 1:
        profiler = Profiler(workers.pids()[0], ctx.profile_path(f"queue-{db.name}")).start()
    finished = workers.wait(cfg.queue_timeout)
    codes = workers.stop()
    if profiler is not None:
        record_profile(ctx.profiles, profiler, title)
    summary = dbtool(db, ctx.workdir, "summary")
    counts = summary["counts"]
    done = counts.get("succeeded", 0)
    last = summary["last_finished"]
    first = summary["first_started"]
    left = sum(1 for _ in spool.iterdir())
    empty_dir(spool)
    return {
        "database": db.name,
        "processes": processes,
        "threads": cfg.queue_threads,
        "tasks": count,
        "counts": counts,
        "cut_off": not finished,
        "exit_codes": codes,
        "spool_files_left": left,
        "wall_s": (last - started) if last else None,
        "steady_s": (last - first) if last and first else None,
        "per_s": done / (last - started) if last else 0.0,
        "steady_per_s": done / (last - first) if last and first and last > first else None,
    }


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    runs: list[dict[str, Any]] = []
    if "postgres" in ctx.databases:
        for processes in cfg.queue_procs:
            runs.append(_run_once(ctx, ctx.databases["postgres"], processes))
    if "sqlite" in ctx.databases:
        runs.append(_run_once(ctx, ctx.databases["sqlite"], 1))
    print(
        table(
            f"queue: {cfg.queue_tasks:,} tasks, null pusher, run_push_workers --burst "
            f"--threads {cfg.queue_threads}",
            [
                "database",
                "processes",
                "tasks/s (from start)",
                "tasks/s (steady)",
                "seconds",
                "succeeded",
                "other",
                "cut off",
            ],
            [
                [
                    r["database"],
                    r["processes"],
                    r["per_s"],
                    r["steady_per_s"],
                    r["wall_s"],
                    r["counts"].get("succeeded", 0),
                    r["tasks"] - r["counts"].get("succeeded", 0),
                    r["cut_off"],
                ]
                for r in runs
            ],
        )
    )
    for r in runs:
        if r["database"] != "postgres":
            continue
        ctx.checks.append(
            Check(
                f"queue claims+completions/s ≥ {TARGET_PER_S:,.0f} on PostgreSQL",
                f"postgres ×{r['processes']}",
                r["per_s"],
                "tasks/s",
                passed=r["per_s"] >= TARGET_PER_S,
                note=f"steady {r['steady_per_s']:,.0f}/s" if r["steady_per_s"] else "",
            )
        )
    if "postgres" in ctx.missing:
        ctx.checks.append(
            Check(
                f"queue claims+completions/s ≥ {TARGET_PER_S:,.0f} on PostgreSQL",
                "postgres",
                None,
                "tasks/s",
                note=ctx.missing["postgres"],
            )
        )
    payload = {"name": "queue", "config": cfg.as_dict(), "runs": runs}
    path = write_result("queue", ctx.stamp, payload)
    log(f"queue results: {path}")
    return payload
