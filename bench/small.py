"""Benchmark: small uploads under wrk, uploadsvc side by side with the Go reference.

`wrk -t2 -c16 -d10s` (3 s with --quick) sends 1 KiB raw uploads with the service's headers and
token (bench/wrk_upload.lua) in two variants, each run for uploadsvc (per database) and then for
the Go reference, so that each pair runs back to back:

- stopped: the web server alone. uploadsvc: the web server (scripts/web), no `run_push_workers`
  (tasks pile up in the queue). Go: `-push=false`, whose goroutines take tasks off the channel
  and push nothing.
- running: uploadsvc as `make run` runs it, the web server plus one `run_push_workers --threads 4`
  pushing into `uploadsvc-run`; the Go reference with its pool of 4 pushing goroutines behind the
  channel of 100, whose handler blocks while the channel is full (the seed's design).

Before the pairs, wrk against the Go reference's /discard handler (reads the body, answers 202)
shows what wrk itself can drive on this machine. Accepted counts only 202 answers; any other
status and socket errors are reported. The latency percentiles are wrk's over all answers, so a
run that had anything but 202s cannot pass a latency target. Each server is warmed up first (every
process has served an upload; in the running variant those uploads are pushed before wrk starts).
"""

from __future__ import annotations

from typing import Any

from bench.client import warm_up
from bench.common import (
    CONTAINER,
    Check,
    Context,
    CpuMeter,
    Database,
    OursProbe,
    PushWorkers,
    WebServer,
    dbtool,
    empty_dir,
    log,
    ratio_check,
    running,
    service_env,
    settled,
    table,
    wait_until,
    write_result,
)
from bench.profiling import Profiler
from bench.profiling import record as record_profile
from bench.reference import GoRef
from bench.wrk import WrkResult, run_wrk, wrk_problem

VARIANTS = ("stopped", "running")
STOPPED_RATIO = 0.25
RUNNING_RATIO = 1.0
P50_LIMIT_MS = 25.0
P99_LIMIT_MS = 100.0


def _wrk(ctx: Context, port: int, token: str | None, directory: str) -> WrkResult:
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


def _directory(ctx: Context, name: str, variant: str) -> str:
    if variant == "running":
        return ctx.prepare_container_dir(f"small-{variant}-{name}")
    return f"{ctx.container_dir}/small-{variant}-{name}"


def _profilers(
    ctx: Context, db: Database, variant: str, server: WebServer, workers: PushWorkers
) -> list[tuple[str, Profiler]]:
    """With --profile, on PostgreSQL: py-spy on the web server's processes, and on the push
    workers when they run."""
    if not ctx.cfg.profile or db.name != "postgres" or server.proc is None:
        return []
    started = [
        (
            f"small uploads, workers {variant}: web server ({db.name})",
            Profiler(
                server.proc.pid,
                ctx.profile_path(f"small-{variant}-web-{db.name}"),
                subprocesses=True,
            ).start(),
        )
    ]
    if variant == "running":
        started.append(
            (
                f"small uploads, workers running: push workers ({db.name})",
                Profiler(
                    workers.pids()[0], ctx.profile_path(f"small-running-workers-{db.name}")
                ).start(),
            )
        )
    return started


def _ours(ctx: Context, db: Database, variant: str) -> dict[str, Any]:
    cfg = ctx.cfg
    log(f"small uploads, workers {variant}: uploadsvc on {db.name}")
    dbtool(db, ctx.workdir, "reset")
    spool = ctx.workdir / f"spool-small-{variant}-{db.name}"
    empty_dir(spool)
    env = service_env(db, spool, ctx.workdir)
    logs = ctx.workdir / f"small-{variant}-{db.name}"
    server = WebServer(
        env,
        workers=cfg.web_workers,
        threads=cfg.web_threads,
        log_path=logs.with_suffix(".web.log"),
    )
    workers = PushWorkers(env, threads=cfg.push_threads, log_path=logs.with_suffix(".workers.log"))
    services: list[WebServer | PushWorkers] = [server]
    if variant == "running":
        services.append(workers)
    directory = _directory(ctx, db.name, variant)
    with running(*services):
        probe = OursProbe(db)
        try:
            warm = warm_up(
                server.port,
                ctx.tokens[db.name],
                server.worker_pids(),
                container=CONTAINER,
                directory=directory,
                clients=cfg.clients,
                size=cfg.small_size,
            )
            if variant == "running":
                wait_until(
                    lambda: probe.done(warm), timeout=cfg.load_timeout, what="the warm-up pushes"
                )
            before = probe.counts()
            profilers = _profilers(ctx, db, variant, server, workers)
            with CpuMeter(server.worker_pids()) as web_cpu, CpuMeter(workers.pids()) as push_cpu:
                load = _wrk(ctx, server.port, ctx.tokens[db.name], directory)
            after = probe.counts()
            for title, profiler in profilers:
                record_profile(ctx.profiles, profiler, title)
            taken = settled(probe.total) - sum(before.values())
        finally:
            probe.close()
    empty_dir(spool)
    pushed = after.get("succeeded", 0) - before.get("succeeded", 0)
    return {
        "load": load.summary(),
        "clean": load.clean,
        "problems": load.problems(),
        "server_accepted": taken,
        "pushed_per_s": pushed / load.seconds if variant == "running" else None,
        "waiting_after": after.get("pending", 0) + after.get("running", 0),
        "failed": after.get("failed", 0),
        "web_cores": web_cpu.result["server_cores"],
        "push_cores": push_cpu.result["server_cores"] if variant == "running" else None,
        "machine_busy_pct": web_cpu.result["machine_busy_pct"],
    }


def _go(ctx: Context, variant: str) -> dict[str, Any]:
    assert ctx.go_binary is not None
    cfg = ctx.cfg
    log(f"small uploads, workers {variant}: Go reference")
    spool = ctx.workdir / f"spool-small-{variant}-go"
    empty_dir(spool)
    server = GoRef(
        ctx.go_binary,
        spool,
        workers=cfg.push_threads,
        push=variant == "running",
        log_path=ctx.workdir / f"small-{variant}-go.log",
    )
    directory = _directory(ctx, "go", variant)
    try:
        server.start()
        warm = warm_up(
            server.port,
            None,
            [server.pid()],
            container=CONTAINER,
            directory=directory,
            clients=cfg.clients,
            size=cfg.small_size,
        )
        if variant == "running":
            wait_until(
                lambda: server.done(warm), timeout=cfg.load_timeout, what="the warm-up pushes"
            )
        before = server.stats()
        with CpuMeter([server.pid()]) as cpu:
            load = _wrk(ctx, server.port, None, directory)
        after = server.stats()
        taken = settled(lambda: int(server.stats()["accepted"])) - int(before["accepted"])
    finally:
        server.stop()
    empty_dir(spool)
    pushed = int(after["pushed"]) - int(before["pushed"])
    return {
        "load": load.summary(),
        "clean": load.clean,
        "problems": load.problems(),
        "server_accepted": taken,
        "pushed_per_s": pushed / load.seconds if variant == "running" else None,
        "waiting_after": int(after["queued"]) if variant == "running" else None,
        "failed": int(after["failed"]),
        "web_cores": cpu.result["server_cores"],
        "push_cores": None,
        "machine_busy_pct": cpu.result["machine_busy_pct"],
    }


def _calibrate(ctx: Context) -> dict[str, Any]:
    """wrk alone: the same requests against a handler that only reads the body."""
    assert ctx.go_binary is not None
    log("small uploads: wrk against the Go /discard handler (the load generator's ceiling)")
    server = GoRef(
        ctx.go_binary,
        ctx.workdir / "spool-small-calibrate",
        workers=1,
        push=False,
        log_path=ctx.workdir / "small-calibrate.log",
    )
    try:
        server.start()
        cfg = ctx.cfg
        load = run_wrk(
            server.port,
            seconds=cfg.wrk_seconds,
            directory=f"{ctx.container_dir}/discard",
            container=CONTAINER,
            token=None,
            size=cfg.small_size,
            threads=cfg.wrk_threads,
            connections=cfg.clients,
            url_path="/discard",
        )
    finally:
        server.stop()
    return {"load": load.summary(), "clean": load.clean, "problems": load.problems()}


def _row(label: str, variant: str, r: dict[str, Any]) -> list[Any]:
    load = r["load"]
    other = sum(v for k, v in load["statuses"].items() if k != "202")
    return [
        variant,
        label,
        load["rate_per_s"],
        load["p50_ms"],
        load["p99_ms"],
        other + sum(load["socket_errors"].values()),
        r.get("server_accepted"),
        r.get("pushed_per_s"),
        r.get("waiting_after"),
        r.get("web_cores"),
        r.get("push_cores"),
        r.get("machine_busy_pct"),
        load["client_cores"],
    ]


def _checks(ctx: Context, results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
    for variant in VARIANTS:
        go = results.get(variant, {}).get("go")
        for name in ctx.databases:
            ours = results.get(variant, {}).get(name)
            why_not = skipped.get(variant) or ctx.missing.get("go", "")
            value = ours["load"]["rate_per_s"] if ours else None
            at_least = STOPPED_RATIO if variant == "stopped" else RUNNING_RATIO
            problems = []
            if ours and ours["problems"]:
                problems.append(f"ours not 202: {ours['problems']}")
            if go and go["problems"]:
                problems.append(f"Go not 202: {go['problems']}")
            rate_check = ratio_check(
                f"small uploads, workers {variant}: accepted/s ≥ {at_least:.2f}× Go",
                name,
                value,
                go["load"]["rate_per_s"] if go else None,
                unit="req/s",
                at_least=at_least,
                note="; ".join(problems) or ("" if ours and go else why_not),
            )
            ctx.checks.append(rate_check)
            if variant != "running":
                continue
            for quantile, limit in (("p50", P50_LIMIT_MS), ("p99", P99_LIMIT_MS)):
                latency = ours["load"][f"{quantile}_ms"] if ours else None
                passed: bool | None = None
                note = skipped.get(variant, "")
                if latency is not None and ours is not None:
                    passed = latency <= limit and ours["clean"]
                    note = f"not only 202s: {ours['problems']}" if not ours["clean"] else "all 202"
                ctx.checks.append(
                    Check(
                        f"small uploads, workers running: {quantile} ≤ {limit:.0f} ms",
                        name,
                        latency,
                        "ms",
                        reference=go["load"][f"{quantile}_ms"] if go else None,
                        passed=passed,
                        note=note,
                    )
                )


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    problem = wrk_problem()
    if problem is not None:
        ctx.missing["wrk"] = problem
        log(f"small uploads skipped: {problem}")
        _checks(ctx, {}, dict.fromkeys(VARIANTS, problem))
        return {"name": "small", "skipped": problem}
    skipped: dict[str, str] = {}
    if "incus" in ctx.missing:
        skipped["running"] = f"workers running needs Incus: {ctx.missing['incus']}"
    calibration = _calibrate(ctx) if ctx.go_binary is not None else None
    results: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        if variant in skipped:
            log(f"small uploads, workers {variant}: skipped ({skipped[variant]})")
            continue
        by_server: dict[str, dict[str, Any]] = {}
        for name, db in ctx.databases.items():
            by_server[name] = _ours(ctx, db, variant)
        if ctx.go_binary is not None:
            by_server["go"] = _go(ctx, variant)
        results[variant] = by_server

    rows = []
    if calibration is not None:
        rows.append(_row("wrk alone (Go /discard)", "—", calibration))
    for variant, by_server in results.items():
        for name, r in by_server.items():
            label = "Go reference" if name == "go" else f"uploadsvc/{name}"
            rows.append(_row(label, variant, r))
    print(
        table(
            f"small uploads: wrk -t{cfg.wrk_threads} -c{cfg.clients} -d{cfg.wrk_seconds:g}s, "
            f"{cfg.small_size} B bodies ({cfg.push_threads} push threads when running)",
            [
                "workers",
                "server",
                "accepted/s",
                "p50 ms",
                "p99 ms",
                "not 202",
                "server accepted",
                "pushed/s",
                "waiting after",
                "web cores",
                "push cores",
                "machine busy %",
                "wrk cores",
            ],
            rows,
        )
    )
    notes = []
    for variant, by_server in results.items():
        for name, r in by_server.items():
            if r["problems"]:
                notes.append(f"{variant}, {name}: not 202: {r['problems']}")
    if calibration is not None:
        for variant, by_server in results.items():
            if "go" in by_server:
                share = by_server["go"]["load"]["rate_per_s"] / calibration["load"]["rate_per_s"]
                notes.append(
                    f"workers {variant}: the Go reference reached {share:.0%} of what wrk drives "
                    "against /discard"
                    + (" (close to wrk's ceiling: a lower bound)" if share > 0.8 else "")
                )
    for note in notes:
        print(f"   note: {note}")
    _checks(ctx, results, skipped)
    payload = {
        "name": "small",
        "config": cfg.as_dict(),
        "calibration": calibration,
        "results": results,
        "skipped": skipped,
        "notes": notes,
    }
    path = write_result("small", ctx.stamp, payload)
    log(f"small results: {path}")
    return payload
