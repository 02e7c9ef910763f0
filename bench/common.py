"""Shared pieces of the benchmarks: the run's configuration, the databases, the processes under
test (the web server, push workers) and their memory, the container, tables and JSON results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS_DIR = ROOT / "var" / "bench"
INCUS_SOCKET = "/var/lib/incus/unix.socket"
CONTAINER = "uploadsvc-run"
PG_ADMIN = ["-h", "127.0.0.1", "-p", "5432", "-U", "postgres"]
PG_URL = "postgres://postgres@127.0.0.1:5432/{name}"
SECRET_KEY = "bench-only-secret-key-3f1c9a7e52b84d0f9e6a1c2b7d8e4f5a6b7c8d9e0f1a2b3c"  # noqa: S105
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass
class Config:
    """What this run measures and how big; `--quick` shrinks every count."""

    quick: bool = False
    profile: bool = False
    databases: tuple[str, ...] = ("sqlite", "postgres")
    web_workers: int = 2
    web_threads: int = 8
    push_threads: int = 4
    clients: int = 16
    big_size: int = GIB
    small_size: int = KIB
    wrk_seconds: float = 10.0
    wrk_threads: int = 2
    idle_count: int = 20
    queue_tasks: int = 5_000
    queue_procs: tuple[int, ...] = (1, 2, 4)
    queue_threads: int = 8
    queue_timeout: float = 150.0
    load_timeout: float = 180.0
    keep: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    tmp: Path = Path("/tmp")

    @classmethod
    def for_run(cls, *, quick: bool, **overrides: Any) -> Config:
        sizes: dict[str, Any] = {}
        if quick:
            sizes = {
                "big_size": 64 * MIB,
                "wrk_seconds": 3.0,
                "idle_count": 5,
                "queue_tasks": 500,
                "queue_timeout": 30.0,
                "load_timeout": 40.0,
            }
        return cls(quick=quick, **{**sizes, **overrides})

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def now_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{what} exited with {proc.returncode} before listening"
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {port} within {timeout}s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 40) -> int | None:
    """SIGTERM (a graceful stop), then SIGKILL to the process group it leads after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Started with start_new_session: the group id is the process's own id.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


# --- memory -------------------------------------------------------------------------------


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB ({} when it is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return values


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


class RssSampler:
    """Samples VmRSS of some processes every `interval` seconds in a thread; keeps the peaks."""

    def __init__(self, pids: Sequence[int], interval: float = 0.02) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.before = {pid: proc_status_kib(pid) for pid in self.pids}
        self.peak_rss = {pid: self.before[pid].get("VmRSS", 0) for pid in self.pids}
        self.after: dict[int, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self.pids:
                rss = proc_status_kib(pid).get("VmRSS", 0)
                self.peak_rss[pid] = max(self.peak_rss[pid], rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = {pid: proc_status_kib(pid) for pid in self.pids}

    def report(self) -> dict[str, Any]:
        """Per process and overall: RSS before, peak RSS (sampled and VmHWM), growth in MiB."""
        per: list[dict[str, Any]] = []
        for pid in self.pids:
            before = self.before[pid]
            after = self.after.get(pid, {})
            peak = max(self.peak_rss[pid], after.get("VmRSS", 0))
            hwm_growth = after.get("VmHWM", 0) - before.get("VmHWM", 0)
            per.append(
                {
                    "pid": pid,
                    "rss_before_mib": before.get("VmRSS", 0) / KIB,
                    "rss_peak_mib": peak / KIB,
                    "hwm_before_mib": before.get("VmHWM", 0) / KIB,
                    "hwm_after_mib": after.get("VmHWM", 0) / KIB,
                    "growth_mib": max(peak - before.get("VmRSS", 0), hwm_growth) / KIB,
                }
            )
        return {
            "processes": per,
            "growth_mib": max((p["growth_mib"] for p in per), default=0.0),
            "rss_before_mib": max((p["rss_before_mib"] for p in per), default=0.0),
            "rss_peak_mib": max((p["rss_peak_mib"] for p in per), default=0.0),
        }


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_jiffies() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:]]


class CpuMeter:
    """CPU used over a span: by the machine (busy and iowait, % of all cores) and by some
    processes (in cores), read from /proc before and after."""

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)

    def __enter__(self) -> CpuMeter:
        self._began = time.monotonic()
        self._machine = _machine_jiffies()
        self._procs = {pid: process_cpu_s(pid) for pid in self.pids}
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._began
        after = _machine_jiffies()
        delta = [b - a for a, b in zip(self._machine, after, strict=False)]
        total = sum(delta[:8]) or 1
        idle, iowait = delta[3], delta[4]
        used = sum(process_cpu_s(pid) - self._procs[pid] for pid in self.pids)
        self.wall = wall
        self.result = {
            "machine_busy_pct": 100 * (total - idle - iowait) / total,
            "machine_iowait_pct": 100 * iowait / total,
            "server_cores": used / wall if wall else 0.0,
        }


# --- databases ----------------------------------------------------------------------------


@dataclass
class Database:
    """A database the service runs on for this benchmark run (made fresh, then migrated)."""

    name: str
    url: str
    sqlite_path: Path | None = None
    pg_name: str | None = None

    def connect(self) -> Any:
        if self.sqlite_path is not None:
            return sqlite3.connect(self.sqlite_path, timeout=30, isolation_level=None)
        import psycopg

        return psycopg.connect(self.url.replace("postgres://", "postgresql://"), autocommit=True)

    def status_counts(self, conn: Any) -> dict[str, int]:
        cursor = conn.execute("SELECT status, count(*) FROM uploads_uploadtask GROUP BY status")
        return {str(status): int(count) for status, count in cursor.fetchall()}


def postgres_available() -> str | None:
    """None when PostgreSQL answers at 127.0.0.1:5432, else why not."""
    if shutil.which("pg_isready") is None:
        return "pg_isready not found"
    result = subprocess.run(
        ["pg_isready", *PG_ADMIN], capture_output=True, text=True, check=False, timeout=10
    )
    return None if result.returncode == 0 else result.stdout.strip() or "not ready"


def create_pg_database(name: str) -> str:
    """A new, empty PostgreSQL database; its URL."""
    subprocess.run(["dropdb", *PG_ADMIN, "--if-exists", name], check=True, timeout=60)
    subprocess.run(["createdb", *PG_ADMIN, name], check=True, timeout=60)
    return PG_URL.format(name=name)


def drop_pg_database(name: str) -> None:
    subprocess.run(["dropdb", *PG_ADMIN, "--if-exists", "--force", name], check=False, timeout=60)


def make_database(name: str, workdir: Path, run_id: str) -> Database:
    """SQLite in the run's directory, or a PostgreSQL database named after the run, so that
    runs started at the same time (in other worktrees) never drop each other's database."""
    if name == "sqlite":
        path = workdir / "bench.sqlite3"
        db = Database("sqlite", f"sqlite:///{path}", sqlite_path=path)
    elif name == "postgres":
        pg_name = f"bench_{run_id}"
        db = Database("postgres", create_pg_database(pg_name), pg_name=pg_name)
    else:
        raise ValueError(name)
    run_manage(db, workdir, ["migrate", "--noinput", "-v", "0"], timeout=300)
    return db


def drop_database(db: Database) -> None:
    if db.pg_name is not None:
        drop_pg_database(db.pg_name)


def service_env(db: Database, spool: Path, workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of every process of the service under test."""
    prom = workdir / f"prometheus-{uuid.uuid4().hex[:6]}"
    prom.mkdir(parents=True, exist_ok=True)
    spool.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        DATABASE_URL=db.url,
        DJANGO_SECRET_KEY=SECRET_KEY,
        DJANGO_ALLOWED_HOSTS="127.0.0.1,localhost",
        DJANGO_SETTINGS_MODULE="uploadsvc.settings",
        UPLOADS_SPOOL_DIR=str(spool),
        UPLOADS_MAX_PENDING="10000000",
        UPLOADS_INCUS_ENDPOINT=INCUS_SOCKET,
        PROMETHEUS_MULTIPROC_DIR=str(prom),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_manage(
    db: Database, workdir: Path, args: list[str], *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = service_env(db, workdir / "spool-manage", workdir)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dbtool(
    db: Database, workdir: Path, *args: str, spool: Path | None = None, timeout: float = 300
) -> Any:
    """Run `python -m bench.dbtool ARGS` against this database; its stdout is JSON."""
    env = service_env(db, spool or workdir / "spool-manage", workdir)
    result = subprocess.run(
        [sys.executable, "-m", "bench.dbtool", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bench.dbtool {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


# --- the service's processes ---------------------------------------------------------------


class WebServer:
    """The web server exactly as scripts/run starts it (scripts/web), on a free port."""

    name = "granian (scripts/web)"

    def __init__(self, env: dict[str, str], *, workers: int, threads: int, log_path: Path) -> None:
        self.env = env
        self.workers = workers
        self.threads = threads
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [str(ROOT / "scripts" / "web")]

    def start(self) -> WebServer:
        env = {
            **self.env,
            "BIN": str(BIN),
            "PORT": str(self.port),
            "WEB_WORKERS": str(self.workers),
            "WEB_THREADS": str(self.threads),
        }
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, self.proc, self.name)
        deadline = time.monotonic() + 30
        while len(self.worker_pids()) < self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start its workers")
            time.sleep(0.05)
        return self

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class PushWorkers:
    """`manage.py run_push_workers` processes."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        processes: int = 1,
        threads: int = 4,
        burst: bool = False,
        log_path: Path,
    ) -> None:
        self.env = env
        self.count = processes
        self.threads = threads
        self.burst = burst
        self.log_path = log_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> PushWorkers:
        command = [
            sys.executable,
            "manage.py",
            "run_push_workers",
            "--threads",
            str(self.threads),
        ]
        if self.burst:
            command.append("--burst")
        with open(self.log_path, "ab") as out:
            for _ in range(self.count):
                self.procs.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=self.env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.running()

    def stop(self) -> list[int | None]:
        codes = [stop_process(p) for p in self.procs]
        self.procs = []
        return codes


@contextmanager
def running(*services: WebServer | PushWorkers) -> Iterator[None]:
    try:
        for service in services:
            service.start()
        yield
    finally:
        for service in reversed(services):
            service.stop()


# --- the container ------------------------------------------------------------------------


def incus(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["incus", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def incus_problem() -> str | None:
    """None when the container to push into is running, else why not."""
    if shutil.which("incus") is None:
        return "the incus client is not installed"
    if not Path(INCUS_SOCKET).exists():
        return f"{INCUS_SOCKET} does not exist (run scripts/incus-test-env as root)"
    try:
        state = incus("list", CONTAINER, "--format", "csv", "--columns", "s", timeout=30)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"incus list failed: {exc}"
    if state.stdout.strip() != "RUNNING":
        return f"container {CONTAINER} is not running (run scripts/incus-test-env as root)"
    return None


def in_container(*command: str, timeout: float = 600) -> str:
    return incus("exec", CONTAINER, "--", *command, timeout=timeout).stdout


def count_in_container(path: str, prefix: str) -> int:
    out = in_container("sh", "-c", f"ls {path} | grep -c '^{prefix}' || true")
    return int(out.strip() or 0)


def size_in_container(path: str) -> int:
    return int(in_container("stat", "-c", "%s", path).strip())


# --- waiting for the queue ----------------------------------------------------------------


def wait_until(
    probe: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str = ""
) -> float:
    """Poll until probe() is true; the time.time() it first was. Raises after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return time.time()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def settled(read: Callable[[], int], *, quiet: float = 1.0, timeout: float = 60.0) -> int:
    """read() once it has not changed for `quiet` seconds. After a load generator stops, the
    server still finishes the requests it was in the middle of (their bodies had arrived)."""
    value = read()
    changed = time.monotonic()
    deadline = changed + timeout
    while time.monotonic() - changed < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != value:
            value, changed = now, time.monotonic()
    return value


class OursProbe:
    """Counts of tasks by status, read straight from the database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn = db.connect()

    def counts(self) -> dict[str, int]:
        return self.db.status_counts(self.conn)

    def total(self) -> int:
        return sum(self.counts().values())

    def done(self, total: int) -> bool:
        counts = self.counts()
        finished = counts.get("succeeded", 0) + counts.get("failed", 0)
        return finished >= total

    def close(self) -> None:
        self.conn.close()


# --- files --------------------------------------------------------------------------------


def make_big_file(path: Path, size: int) -> Path:
    """A file of `size` random-looking bytes (1 MiB of random data, repeated)."""
    if path.exists() and path.stat().st_size == size:
        return path
    block = os.urandom(MIB)
    with open(path, "wb") as out:
        remaining = size
        while remaining > 0:
            out.write(block[: min(remaining, MIB)])
            remaining -= MIB
    return path


def empty_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# --- tables and results -------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}" if abs(value) >= 1 else f"{value:.{digits + 2}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    left: Sequence[int] = (0,),
) -> str:
    """A plain-text table; numbers right-aligned, the `left` columns (text) left-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [f"\n== {title} ==", "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    out.append(line)
    for row in cells:
        out.append(
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(out)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def write_result(name: str, stamp: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# --- the run ------------------------------------------------------------------------------


@dataclass
class Check:
    """One target: our figure, the reference's, and whether the target is met (None: unmeasured)."""

    target: str
    variant: str
    value: float | None
    unit: str
    reference: float | None = None
    ratio: float | None = None
    passed: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "info" if self.value is not None else "n/a"
        return "PASS" if self.passed else "MISS"


def ratio_check(
    target: str,
    variant: str,
    value: float | None,
    reference: float | None,
    *,
    unit: str,
    at_least: float,
    note: str = "",
) -> Check:
    """ours/reference ≥ at_least (higher is better for both figures)."""
    if value is None or not reference:
        return Check(target, variant, value, unit, reference, None, None, note or "not measured")
    ratio = value / reference
    return Check(target, variant, value, unit, reference, ratio, ratio >= at_least, note)


@dataclass
class Context:
    """What every benchmark of one run shares."""

    cfg: Config
    workdir: Path
    stamp: str
    databases: dict[str, Database] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    go_binary: Path | None = None
    go_version: str = ""
    checks: list[Check] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    # SeaweedFS for the object-store variants, started the first time one runs.
    object_store: Any = None

    def object_store_env(self, tag: str) -> dict[str, str]:
        """The environment that puts the spool on the run's object store, under a prefix of
        its own (`uploads.seaweedfs` starts it, as the tests' fixture does)."""
        if self.object_store is None:
            from uploads import seaweedfs

            log("starting SeaweedFS (S3) for the object-store variants")
            self.object_store = seaweedfs.start(self.workdir / "seaweedfs")
        env: dict[str, str] = self.object_store.environment(f"bench-{tag}")
        return env

    def empty_object_store(self, tag: str) -> int:
        """Delete what the prefix holds (objects and incomplete uploads); how many objects."""
        client = self.object_store.client()
        bucket, prefix = self.object_store.bucket, f"bench-{tag}/"
        found = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        for entry in found:
            client.delete_object(Bucket=bucket, Key=entry["Key"])
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        for upload in uploads:
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        return len(found)

    def stop_object_store(self) -> None:
        if self.object_store is not None:
            self.object_store.stop()
            self.object_store = None

    @property
    def container_dir(self) -> str:
        return f"/tmp/uploadsvc-bench-{self.cfg.run_id}"

    def prepare_container_dir(self, name: str) -> str:
        """A directory under container_dir in the container, made now (pushes need the parent)."""
        path = f"{self.container_dir}/{name}"
        in_container("mkdir", "-p", path)
        return path

    def big_file(self) -> Path:
        return make_big_file(self.workdir / "big.bin", self.cfg.big_size)

    def profile_path(self, name: str) -> Path:
        return RESULTS_DIR / f"profile-{name}-{self.stamp}.speedscope.json"
