"""Benchmark 3, the queue on its own: claims and completions per second with nothing to deliver,
uploadsvc side by side with Celery + Redis and django-tasks-db at the same process counts.

For each process count P (1, 2, 4), back to back:

- uploadsvc: N pending tasks (5,000 by default or --queue-tasks; 500 with --quick), each with
  its own 1 KiB spool file (a success deletes it), written with the ORM; then P
  `run_push_workers --burst --threads 8` processes with UPLOADS_PUSHER=uploads.pushers.NullPusher
  run until nothing is ready. Claims, leases, claim tokens, the grant re-check and the attempt
  rows are all there; the table shows how many attempts were recorded.
- Celery + Redis (bench/celery_ref.py): N no-op tasks that only count themselves, enqueued first;
  then one `celery worker --pool prefork --concurrency P` (acks_late; gossip, mingle and
  heartbeats off, which only shortens its start) until all N ran. Needs the `bench` extra and
  Redis at 127.0.0.1:6379 (BENCH_REDIS_URL), and is skipped with a note without them.
- django-tasks-db (bench/djtasks): N no-op tasks enqueued in its own PostgreSQL database
  (CONN_MAX_AGE=None), then P `db_worker --batch --no-startup-delay` processes until the queue is
  empty. Needs the `bench` extra and PostgreSQL.

SQLite runs uploadsvc with one process. Two rates, both from the tasks' own timestamps: from the
moment the processes were started to the last completion (start-up included), and from the first
task started to the last completion (steady). The targets compare the steady rates. A run is cut
off (SIGTERM) after the time limit and reports what it completed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from bench.common import (
    CONTAINER,
    ROOT,
    Context,
    Database,
    PushWorkers,
    create_pg_database,
    dbtool,
    drop_pg_database,
    empty_dir,
    log,
    postgres_available,
    ratio_check,
    service_env,
    stop_process,
    table,
    write_result,
)
from bench.profiling import Profiler
from bench.profiling import record as record_profile

NULL_PUSHER = "uploads.pushers.NullPusher"
CELERY_RATIO = 1.0
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
INSTALL_HINT = "make bench installs it: pip install -e '.[bench]'"


def _rates(
    done: int, started: float, first: float | None, last: float | None
) -> dict[str, float | None]:
    return {
        "wall_s": (last - started) if last else None,
        "steady_s": (last - first) if last and first else None,
        "per_s": done / (last - started) if last and last > started else 0.0,
        "steady_per_s": done / (last - first) if last and first and last > first else None,
    }


# --- uploadsvc ----------------------------------------------------------------------------


def _ours(ctx: Context, db: Database, processes: int) -> dict[str, Any]:
    cfg = ctx.cfg
    count = cfg.queue_tasks
    log(f"queue: uploadsvc on {db.name}, {processes} process(es) × {cfg.queue_threads} threads")
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
    left = sum(1 for _ in spool.iterdir())
    empty_dir(spool)
    return {
        "queue": f"uploadsvc/{db.name}",
        "processes": processes,
        "threads": cfg.queue_threads,
        "tasks": count,
        "done": done,
        "counts": counts,
        "attempts": summary["attempts"],
        "cut_off": not finished,
        "exit_codes": codes,
        "spool_files_left": left,
        **_rates(done, started, summary["first_started"], summary["last_finished"]),
    }


# --- Celery + Redis -----------------------------------------------------------------------


def celery_problem() -> str | None:
    """None when the Celery reference can run, else why not."""
    if find_spec("celery") is None or find_spec("redis") is None:
        return f"Celery or redis-py is not installed ({INSTALL_HINT})"
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis not reachable at {REDIS_URL}: {exc}"
    return None


def _celery_tool(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.celery_ref", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _celery(ctx: Context, processes: int) -> dict[str, Any]:
    cfg = ctx.cfg
    count = cfg.queue_tasks
    log(f"queue: Celery + Redis, prefork × {processes}")
    env = dict(
        os.environ,
        BENCH_CELERY_BROKER=REDIS_URL,
        BENCH_CELERY_PREFIX=f"uploadsvc-bench-{cfg.run_id}-{processes}:",
    )
    _celery_tool(env, "enqueue", "--count", str(count))
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.celery_ref",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(processes),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--loglevel",
        "WARNING",
        "--hostname",
        f"bench-{cfg.run_id}-{processes}@%h",
    ]
    try:
        started = time.time()
        with open(ctx.workdir / f"queue-celery-{processes}.log", "ab") as out:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + cfg.queue_timeout
        state = _celery_tool(env, "count")
        while state["done"] < count and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            state = _celery_tool(env, "count")
        cut_off = state["done"] < count
        code = stop_process(proc)
        state = _celery_tool(env, "count")
    finally:
        _celery_tool(env, "clear")
    return {
        "queue": "Celery + Redis",
        "processes": processes,
        "tasks": count,
        "done": state["done"],
        "cut_off": cut_off,
        "exit_codes": [code],
        **_rates(state["done"], started, state["first"], state["last"]),
    }


# --- django-tasks-db ----------------------------------------------------------------------


def djtasks_problem(ctx: Context) -> str | None:
    """None when the django-tasks-db reference can run, else why not."""
    if find_spec("django_tasks_db") is None:
        return f"django-tasks-db is not installed ({INSTALL_HINT})"
    if problem := ctx.missing.get("postgres") or postgres_available():
        return f"django-tasks-db needs PostgreSQL: {problem}"
    return None


def _djtasks_env(url: str) -> dict[str, str]:
    return dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="bench.djtasks.settings",
        BENCH_DJTASKS_DATABASE_URL=url,
        PYTHONUNBUFFERED="1",
    )


def _djtasks_tool(env: dict[str, str], *args: str, timeout: float = 600) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "bench.djtasks", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _djtasks_prepare(ctx: Context) -> tuple[str, str]:
    """A database of its own, migrated: (name, URL)."""
    name = f"bench_djtasks_{ctx.cfg.run_id}"
    url = create_pg_database(name)
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=_djtasks_env(url),
        check=True,
        capture_output=True,
        timeout=300,
    )
    return name, url


def _djtasks(ctx: Context, url: str, processes: int) -> dict[str, Any]:
    cfg = ctx.cfg
    count = cfg.queue_tasks
    log(f"queue: django-tasks-db, db_worker --batch × {processes}")
    env = _djtasks_env(url)
    _djtasks_tool(env, "enqueue", "--count", str(count))
    command = [sys.executable, "-m", "django", "db_worker", "--batch", "--no-startup-delay"]
    log_path: Path = ctx.workdir / f"queue-djtasks-{processes}.log"
    procs: list[subprocess.Popen[bytes]] = []
    started = time.time()
    with open(log_path, "ab") as out:
        for _ in range(processes):
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + cfg.queue_timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    cut_off = any(p.poll() is None for p in procs)
    codes = [stop_process(p) for p in procs]
    summary = _djtasks_tool(env, "summary")
    done = int(summary["counts"].get("SUCCESSFUL", 0))
    return {
        "queue": "django-tasks-db",
        "processes": processes,
        "tasks": count,
        "done": done,
        "counts": summary["counts"],
        "cut_off": cut_off,
        "exit_codes": codes,
        **_rates(done, started, summary["first_started"], summary["last_finished"]),
    }


# --- the benchmark ------------------------------------------------------------------------


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    skipped: dict[str, str] = {}
    if problem := celery_problem():
        skipped["celery"] = problem
    if problem := djtasks_problem(ctx):
        skipped["django-tasks-db"] = problem
    for name, why in skipped.items():
        ctx.missing[name] = why
        log(f"queue: {name} skipped: {why}")

    runs: list[dict[str, Any]] = []
    djtasks_db: tuple[str, str] | None = None
    try:
        if "django-tasks-db" not in skipped:
            djtasks_db = _djtasks_prepare(ctx)
        for processes in cfg.queue_procs:
            if "postgres" in ctx.databases:
                runs.append(_ours(ctx, ctx.databases["postgres"], processes))
            if "celery" not in skipped:
                runs.append(_celery(ctx, processes))
            if djtasks_db is not None:
                runs.append(_djtasks(ctx, djtasks_db[1], processes))
        if "sqlite" in ctx.databases:
            runs.append(_ours(ctx, ctx.databases["sqlite"], 1))
    finally:
        if djtasks_db is not None:
            drop_pg_database(djtasks_db[0])

    print(
        table(
            f"queue: {cfg.queue_tasks:,} tasks, nothing delivered (uploadsvc: null pusher, "
            f"run_push_workers --burst --threads {cfg.queue_threads})",
            [
                "queue",
                "processes",
                "tasks/s (steady)",
                "tasks/s (from start)",
                "seconds",
                "done",
                "not done",
                "attempts recorded",
                "cut off",
            ],
            [
                [
                    r["queue"],
                    r["processes"],
                    r["steady_per_s"],
                    r["per_s"],
                    r["wall_s"],
                    r["done"],
                    r["tasks"] - r["done"],
                    r.get("attempts"),
                    r["cut_off"],
                ]
                for r in runs
            ],
        )
    )
    _checks(ctx, runs, skipped)
    payload = {"name": "queue", "config": cfg.as_dict(), "runs": runs, "skipped": skipped}
    path = write_result("queue", ctx.stamp, payload)
    log(f"queue results: {path}")
    return payload


def _find(runs: list[dict[str, Any]], queue: str, processes: int) -> dict[str, Any] | None:
    return next((r for r in runs if r["queue"] == queue and r["processes"] == processes), None)


def _checks(ctx: Context, runs: list[dict[str, Any]], skipped: dict[str, str]) -> None:
    for processes in ctx.cfg.queue_procs:
        ours = _find(runs, "uploadsvc/postgres", processes)
        celery = _find(runs, "Celery + Redis", processes)
        djtasks = _find(runs, "django-tasks-db", processes)
        notes = []
        if ours is None:
            notes.append(ctx.missing.get("postgres", "uploadsvc on PostgreSQL not run"))
        else:
            if ours["attempts"] < ours["done"]:
                notes.append(f"only {ours['attempts']} attempt rows for {ours['done']} tasks")
            if ours["cut_off"]:
                notes.append("ours cut off")
        if celery is None:
            notes.append(skipped.get("celery", "Celery not run"))
        elif celery["cut_off"]:
            notes.append("Celery cut off")
        ctx.checks.append(
            ratio_check(
                f"queue tasks/s (steady) ≥ {CELERY_RATIO:.1f}× Celery + Redis",
                f"postgres ×{processes}",
                ours["steady_per_s"] if ours else None,
                celery["steady_per_s"] if celery else None,
                unit="tasks/s",
                at_least=CELERY_RATIO,
                note="; ".join(notes),
            )
        )
        info = ratio_check(
            "queue tasks/s (steady) vs django-tasks-db",
            f"postgres ×{processes}",
            ours["steady_per_s"] if ours else None,
            djtasks["steady_per_s"] if djtasks else None,
            unit="tasks/s",
            at_least=0.0,
            note=skipped.get("django-tasks-db", "no target: for the ratio"),
        )
        info.passed = None
        ctx.checks.append(info)
