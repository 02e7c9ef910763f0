"""`python -m bench [NAME ...] [--quick] [--profile]`: run benchmarks (all, or those named).

Prepares one run (a temporary directory, fresh SQLite and PostgreSQL databases, a user with a
token, the Go reference built when `go` is on PATH), runs the chosen benchmarks in order, prints
each one's table and a closing summary of the targets (PASS/MISS with ours/reference ratios), and
writes var/bench/<name>-<timestamp>.json per benchmark plus var/bench/latest.json for the run.
Everything it started is stopped, and what it wrote (spool files, files in the container, the
`bench_<run id>` database) is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import reference
from bench.common import (
    RESULTS_DIR,
    ROOT,
    Config,
    Context,
    dbtool,
    drop_database,
    fmt,
    in_container,
    incus_problem,
    log,
    make_database,
    now_stamp,
    postgres_available,
    table,
    write_result,
)
from bench.profiling import py_spy

# In the order of the performance targets they check.
BENCHMARKS = {
    "small": "bench.small",
    "e2e": "bench.e2e",
    "queue": "bench.queuebench",
    "ingest": "bench.ingest",
    "durability": "bench.durability",
    "push_speed": "bench.push_speed_runner",
    "webserver": "bench.webserver",
    "fanout": "bench.fanout",
}
NEEDS_INCUS = {"e2e", "push_speed", "fanout"}
# Runs without Incus, but one of its variants pushes into the container.
USES_INCUS = {"small"}


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="NAME",
        help=f"which to run: {', '.join(BENCHMARKS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy profiles of the server and the workers into var/bench/",
    )
    parser.add_argument(
        "--db",
        default="sqlite,postgres",
        help="databases for uploadsvc, comma-separated (sqlite,postgres)",
    )
    parser.add_argument("--web-workers", type=positive_int, default=2, help="web workers (2)")
    parser.add_argument("--web-threads", type=positive_int, default=8, help="threads each (8)")
    parser.add_argument(
        "--push-threads",
        type=positive_int,
        default=4,
        help="run_push_workers threads and Go push goroutines when they push (4)",
    )
    parser.add_argument("--clients", type=positive_int, default=16, help="concurrent clients (16)")
    parser.add_argument(
        "--queue-tasks",
        type=positive_int,
        default=None,
        help="tasks per queue run (5,000; 500 with --quick)",
    )
    parser.add_argument(
        "--wrk-seconds",
        type=float,
        default=None,
        help="length of each wrk run (small, e2e): 10 s; 3 s with --quick",
    )
    parser.add_argument("--no-go", action="store_true", help="skip the Go reference")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.benchmarks) - set(BENCHMARKS))
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return args


def prepare(ctx: Context, *, want_go: bool, no_go: bool, needs_incus: bool) -> None:
    for name in ctx.cfg.databases:
        if name == "postgres" and (problem := postgres_available()):
            ctx.missing["postgres"] = f"PostgreSQL not reachable: {problem}"
            log(ctx.missing["postgres"])
            continue
        log(f"creating and migrating the {name} database")
        db = make_database(name, ctx.workdir, ctx.cfg.run_id)
        ctx.databases[name] = db
        ctx.tokens[name] = dbtool(db, ctx.workdir, "setup")["token"]
    if want_go and no_go:
        ctx.missing["go"] = "Go reference skipped (--no-go)"
    elif want_go:
        binary, detail = reference.build(ctx.workdir)
        if binary is None:
            ctx.missing["go"] = f"Go reference missing: {detail}"
            log(ctx.missing["go"])
        else:
            ctx.go_binary, ctx.go_version = binary, detail
            log(f"Go reference built with {detail}")
    if needs_incus and (problem := incus_problem()):
        ctx.missing["incus"] = problem
        log(f"Incus not usable: {problem}")
    if ctx.cfg.profile and py_spy() is None:
        ctx.missing["py-spy"] = "py-spy not installed (pip install py-spy): no profiles"
        log(ctx.missing["py-spy"])


def cleanup(ctx: Context) -> None:
    ctx.stop_object_store()
    if "incus" not in ctx.missing:
        try:
            in_container("rm", "-rf", ctx.container_dir, timeout=300)
        except (subprocess.SubprocessError, OSError) as exc:
            log(f"could not remove {ctx.container_dir} from the container: {exc}")
    for db in ctx.databases.values():
        drop_database(db)
    if ctx.cfg.keep:
        log(f"kept {ctx.workdir}")
    else:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def print_summary(ctx: Context) -> None:
    rows: list[list[Any]] = []
    for check in ctx.checks:
        value = f"{fmt(check.value)} {check.unit}" if check.value is not None else None
        reference_value = (
            f"{fmt(check.reference)} {check.unit}" if check.reference is not None else None
        )
        rows.append(
            [
                check.target,
                check.variant,
                value,
                reference_value,
                f"{check.ratio:.2f}×" if check.ratio is not None else None,
                check.verdict,
                check.note,
            ]
        )
    if rows:
        print(
            table(
                "targets",
                ["target", "variant", "ours", "reference", "ours/ref", "result", "note"],
                rows,
                left=(0, 1, 6),
            )
        )
    for what, why in ctx.missing.items():
        print(f"   missing: {what}: {why}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.benchmarks)) or list(BENCHMARKS)
    databases = tuple(d.strip() for d in args.db.split(",") if d.strip())
    for name in databases:
        if name not in ("sqlite", "postgres"):
            raise SystemExit(f"unknown database {name!r} (sqlite, postgres)")
    cfg = Config.for_run(
        quick=args.quick,
        profile=args.profile,
        databases=databases,
        web_workers=args.web_workers,
        web_threads=args.web_threads,
        push_threads=args.push_threads,
        clients=args.clients,
        keep=args.keep,
        **({"queue_tasks": args.queue_tasks} if args.queue_tasks else {}),
        **({"wrk_seconds": args.wrk_seconds} if args.wrk_seconds else {}),
    )
    stamp = now_stamp()
    workdir = Path(tempfile.mkdtemp(prefix="uploadsvc-bench-"))
    ctx = Context(cfg=cfg, workdir=workdir, stamp=stamp)
    began = time.monotonic()
    log(f"run {cfg.run_id}: {', '.join(names)}{' (quick)' if cfg.quick else ''}; work in {workdir}")
    outcomes: dict[str, Any] = {}
    try:
        prepare(
            ctx,
            want_go=bool({"ingest", "small", "e2e"} & set(names)),
            no_go=args.no_go,
            needs_incus=bool((NEEDS_INCUS | USES_INCUS) & set(names)),
        )
        for name in names:
            if name in NEEDS_INCUS and "incus" in ctx.missing:
                outcomes[name] = {"skipped": ctx.missing["incus"]}
                continue
            started = time.monotonic()
            load_before = os.getloadavg()[0]
            module = importlib.import_module(BENCHMARKS[name])
            try:
                outcomes[name] = module.run(ctx)
            except Exception as exc:
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                outcomes[name] = {"error": f"{type(exc).__name__}: {exc}"}
                if not isinstance(exc, (RuntimeError, OSError, subprocess.SubprocessError)):
                    raise
            # Other work on the machine moves every figure: say how busy it was.
            load_after = os.getloadavg()[0]
            outcomes[name]["load_average"] = {"start": load_before, "end": load_after}
            log(
                f"{name} took {time.monotonic() - started:.0f}s (1-minute load average "
                f"{load_before:.1f} → {load_after:.1f} on {os.cpu_count()} CPUs)"
            )
    finally:
        cleanup(ctx)
    print_summary(ctx)
    elapsed = time.monotonic() - began
    log(f"all done in {elapsed:.0f}s")
    latest = {
        "stamp": stamp,
        "elapsed_s": elapsed,
        "config": cfg.as_dict(),
        "go_version": ctx.go_version,
        "missing": ctx.missing,
        "checks": [{**c.__dict__, "verdict": c.verdict} for c in ctx.checks],
        "profiles": ctx.profiles,
        "benchmarks": outcomes,
    }
    path = write_result("run", stamp, latest)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(latest, indent=2, default=str) + "\n")
    log(f"summary: {path.relative_to(ROOT)} and var/bench/latest.json")
    return 1 if any("error" in o for o in outcomes.values() if isinstance(o, dict)) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
