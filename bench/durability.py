"""Benchmark: what making a 202 survive a power cut costs, on this machine's disk.

Before it answers 202 the service commits the task row durably (SQLite `synchronous=FULL`,
PostgreSQL `synchronous_commit=on`) and, for a body kept in the spool rather than in the row,
fsyncs the file, renames it into place and fsyncs the spool directory. Each is timed here with
and without its sync, in the run's own databases and directory (the disk the spool uses):

- commit: one INSERT of a row shaped like a small upload (1 KiB inline body) per transaction,
  in a table of its own, durable versus not (`synchronous=NORMAL`, `synchronous_commit=off`);
- spool: write a body, optionally fsync it, rename it, optionally fsync the directory, for a body
  just over the inline limit, 1 MiB and 64 MiB.

There is no reference and no target: the figures say what durability adds to each upload, to be
read beside a small upload's latency in `small` and a big one's in `ingest`.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import KIB, MIB, Context, Database, log, percentile, table, write_result

INLINE_LIMIT = 64 * KIB
SPOOL_SIZES = (INLINE_LIMIT + 1, MIB, 64 * MIB)
TABLE = "bench_durability"


def _commits(db: Database, *, durable: bool, count: int) -> list[float]:
    """Seconds per one-row transaction."""
    conn = db.connect()
    body = os.urandom(KIB)
    try:
        if db.sqlite_path is not None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            blob = "BLOB"
        else:
            conn.execute(f"SET synchronous_commit = {'on' if durable else 'off'}")
            blob = "BYTEA"
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id VARCHAR(32) PRIMARY KEY, status VARCHAR(16),"
            f" path VARCHAR(4096), body {blob})"
        )
        marker = "?" if db.sqlite_path is not None else "%s"
        insert = f"INSERT INTO {TABLE} VALUES ({marker}, {marker}, {marker}, {marker})"  # noqa: S608
        times = []
        for _ in range(count):
            started = time.perf_counter()
            if db.sqlite_path is not None:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(insert, (uuid.uuid4().hex, "pending", "/srv/app/config.json", body))
                conn.execute("COMMIT")
            else:
                conn.execute(insert, (uuid.uuid4().hex, "pending", "/srv/app/config.json", body))
            times.append(time.perf_counter() - started)
        conn.execute(f"DROP TABLE {TABLE}")
        return times
    finally:
        conn.close()


def _spool_writes(directory: Path, size: int, *, durable: bool, count: int) -> list[float]:
    """Seconds per body written, (synced,) renamed into place (and the directory synced)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(min(size, MIB))
    times = []
    for _ in range(count):
        name = uuid.uuid4().hex
        part, final = directory / f"{name}.part", directory / name
        started = time.perf_counter()
        with open(part, "wb") as file:
            left = size
            while left:
                left -= file.write(data[: min(left, len(data))])
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.rename(part, final)
        if durable:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        times.append(time.perf_counter() - started)
        final.unlink()
    return times


def _summary(times: list[float]) -> dict[str, float | None]:
    return {
        "count": len(times),
        "mean_ms": 1000 * sum(times) / len(times),
        "p50_ms": 1000 * (percentile(times, 0.5) or 0),
        "p99_ms": 1000 * (percentile(times, 0.99) or 0),
    }


def run(ctx: Context) -> dict[str, Any]:
    commits = 200 if ctx.cfg.quick else 1000
    results: dict[str, Any] = {"commit": {}, "spool": {}}
    rows: list[list[Any]] = []
    for db in ctx.databases.values():
        log(f"durability: {commits} commits on {db.name}, durable and not")
        pair = {
            kind: _summary(_commits(db, durable=kind == "durable", count=commits))
            for kind in ("not durable", "durable")
        }
        results["commit"][db.name] = pair
        rows.append(_row(f"commit, {db.name}", pair))
    directory = ctx.workdir / "durability-spool"
    for size in SPOOL_SIZES:
        count = (
            commits if size < MIB else {MIB: 10, 64 * MIB: 3}[size] * (1 if ctx.cfg.quick else 4)
        )
        log(f"durability: {count} spool writes of {size} bytes, synced and not")
        pair = {
            kind: _summary(_spool_writes(directory, size, durable=kind == "durable", count=count))
            for kind in ("not durable", "durable")
        }
        results["spool"][str(size)] = pair
        rows.append(_row(f"spool file, {_size(size)}", pair))
    print(
        table(
            "durability: what the syncs before a 202 add (ms each)",
            [
                "step",
                "count",
                "p50 without",
                "p50 with",
                "mean without",
                "mean with",
                "adds (mean)",
            ],
            rows,
            left=(0,),
        )
    )
    write_result("durability", ctx.stamp, results)
    return results


def _row(step: str, pair: dict[str, dict[str, Any]]) -> list[Any]:
    off, on = pair["not durable"], pair["durable"]
    return [
        step,
        on["count"],
        off["p50_ms"],
        on["p50_ms"],
        off["mean_ms"],
        on["mean_ms"],
        on["mean_ms"] - off["mean_ms"],
    ]


def _size(size: int) -> str:
    if size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size // KIB} KiB + {size % KIB} B"
