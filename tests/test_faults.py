"""Fault injection with real components (`make faults`, also run by .ci/run): a stopped Incus,
a restarted PostgreSQL, a full spool filesystem, clients that reset. After each: no task lost,
none completed twice, every spool file accounted for, the service still answering.

These stop and start shared daemons, so they run on their own, not in `make test`.
"""

import hashlib
import http.client
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.authtoken.models import Token

from tests.conftest import ROOT, Server, spool_files, subprocess_env
from tests.incus_utils import RUNNING, run_in
from uploads.models import Outcome, Status, UploadAttempt, UploadTask
from uploads.services import purge_finished

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

# The web server stamps max_attempts on each task and the workers schedule the retries, so
# both get these: enough attempts, quickly spaced, to outlast an outage of a few seconds.
FAST_RETRIES = {
    "UPLOADS_RETRY_BASE_SECONDS": "0.2",
    "UPLOADS_RETRY_MAX_SECONDS": "1",
    "UPLOADS_MAX_ATTEMPTS": "100",
    "UPLOADS_INCUS_TIMEOUT": "10",
}


@pytest.fixture
def token(user: Any) -> str:
    return Token.objects.create(user=user).key


def post(server: Server, token: str, body: bytes, **headers: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/api/uploads/",
            body=body,
            headers={
                "Authorization": f"Token {token}",
                "Content-Type": "application/octet-stream",
                **headers,
            },
        )
        response = conn.getresponse()
        return response.status, response.read()
    except (ConnectionError, http.client.HTTPException) as exc:
        return 0, str(exc).encode()
    finally:
        conn.close()


def start_workers(spool: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "run_push_workers",
            "--threads",
            "4",
            "--poll-interval",
            "0.2",
            "-v",
            "2",
        ],
        cwd=ROOT,
        env=subprocess_env(spool, **env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def stop_workers(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.terminate()
    assert proc.wait(timeout=60) == 0, log.read_text()[-4000:]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def assert_consistent(spool: Path) -> None:
    """Every spool file belongs to a task that may still need it (anything but a success; small
    bodies travel in their rows); each success happened once."""
    connection.close()
    live = set(
        UploadTask.objects.exclude(status=Status.SUCCEEDED)
        .exclude(spool_name="")
        .values_list("spool_name", flat=True)
    )
    assert set(spool_files(spool)) == live
    for task in UploadTask.objects.filter(status=Status.SUCCEEDED):
        assert task.attempt_log.filter(outcome=Outcome.SUCCEEDED).count() == 1


def incusd_pid() -> int | None:
    out = subprocess.run(
        ["pgrep", "-f", "^(/usr/libexec/incus/)?incusd --"], capture_output=True, text=True
    ).stdout.split()
    return int(out[0]) if out else None


@pytest.mark.server_env(**FAST_RETRIES)
def test_incusd_stopped_during_a_burst_then_started_everything_lands_once(
    web_server: Server, token: str, spool: Path, tmp_path: Path, incus: str
) -> None:
    directory = f"/tmp/uploadsvc-faults-{uuid.uuid4().hex[:8]}"
    run_in(RUNNING, "mkdir", "-p", directory)
    log = tmp_path / "workers.log"
    workers = start_workers(spool, log, **FAST_RETRIES)
    expected: dict[str, str] = {}
    lock = threading.Lock()

    def send(n: int) -> None:
        body = f"burst {n} {uuid.uuid4()}\n".encode()
        status, _ = post(
            web_server,
            token,
            body,
            **{"X-Container-Name": RUNNING, "X-File-Path": f"{directory}/{n}.txt"},
        )
        assert status == 202
        with lock:
            expected[f"{directory}/{n}.txt"] = hashlib.sha256(body).hexdigest()

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(150)))
            pid = incusd_pid()
            assert pid, "incusd is not running"
            os.kill(pid, 15)
            wait_for(lambda: incusd_pid() is None, 60, "incusd to stop")
            list(pool.map(send, range(150, 500)))
        time.sleep(2)  # pushes fail meanwhile and are rescheduled
        assert UploadAttempt.objects.filter(outcome=Outcome.RETRY).exists()
        subprocess.run(
            [str(ROOT / "scripts" / "incus-test-env")], check=True, capture_output=True, timeout=300
        )
        wait_for(
            lambda: UploadTask.objects.filter(status=Status.SUCCEEDED).count() == 500,
            240,
            "all 500 uploads to land",
        )
    finally:
        stop_workers(workers, log)
        if incusd_pid() is None:
            subprocess.run([str(ROOT / "scripts" / "incus-test-env")], check=False, timeout=300)
    out = run_in(RUNNING, "sh", "-c", f"sha256sum {directory}/*.txt")
    run_in(RUNNING, "rm", "-rf", directory)
    landed = {path: digest for digest, path in (line.split() for line in out.splitlines())}
    assert landed == expected
    assert UploadTask.objects.count() == 500
    assert_consistent(spool)


def pg_cluster() -> str:
    return sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(x) for x in v.split(".")])[-1]


@pytest.mark.server_env(**FAST_RETRIES)
def test_postgresql_restart_during_a_burst_web_and_workers_reconnect(
    web_server: Server, token: str, spool: Path, tmp_path: Path, incus: str
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("restarts PostgreSQL: run with DATABASE_URL=postgres://… (CI does)")
    directory = f"/tmp/uploadsvc-faults-{uuid.uuid4().hex[:8]}"
    run_in(RUNNING, "mkdir", "-p", directory)
    log = tmp_path / "workers.log"
    workers = start_workers(spool, log, **FAST_RETRIES)
    answers: list[int] = []
    lock = threading.Lock()

    def send(n: int) -> None:
        # A careful client: the same Idempotency-Key on every resend, until it hears 202.
        headers = {
            "X-Container-Name": RUNNING,
            "X-File-Path": f"{directory}/{n}.txt",
            "Idempotency-Key": f"pg-restart-{n}",
        }
        deadline = time.monotonic() + 120
        while True:
            status, answer = post(web_server, token, f"pg {n}\n".encode(), **headers)
            with lock:
                answers.append(status)
            if status == 202:
                return
            assert status in (0, 503), (status, answer)
            assert time.monotonic() < deadline, "the service did not come back"
            time.sleep(0.2)

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, n) for n in range(300)]
            time.sleep(0.5)
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", pg_cluster(), "main", "restart"],
                check=True,
                timeout=120,
            )
            for future in futures:
                future.result()
        connection.close()
        # Every upload was accepted once, however many times it had to be sent…
        wait_for(
            lambda: UploadTask.objects.filter(status=Status.SUCCEEDED).count() >= 300,
            180,
            "the uploads to land",
        )
    finally:
        stop_workers(workers, log)
    landed = run_in(RUNNING, "ls", directory).split()
    run_in(RUNNING, "rm", "-rf", directory)
    # …and delivered once: one task per key, all succeeded, one file each in the container.
    assert len(answers) > 300, "the restart was not felt: no upload had to be resent"
    assert UploadTask.objects.count() == 300, sorted(set(answers))
    assert UploadTask.objects.filter(status=Status.SUCCEEDED).count() == 300
    assert sorted(landed) == sorted(f"{n}.txt" for n in range(300))
    assert_consistent(spool)


@pytest.fixture
def small_spool(spool: Path) -> Iterator[Path]:
    """The spool on an 8 MiB tmpfs: a filesystem that really fills up."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(spool)], check=True)
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def chunked_post(server: Server, token: str, size: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    block = b"c" * (1 << 20)
    try:
        conn.request(
            "POST",
            "/api/uploads/",
            body=(block for _ in range(size // len(block))),
            encode_chunked=True,
            headers={
                "Authorization": f"Token {token}",
                "Transfer-Encoding": "chunked",
                "X-Container-Name": RUNNING,
                "X-File-Path": "/tmp/big.bin",
            },
        )
        return conn.getresponse().status
    except (ConnectionError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


@pytest.mark.server_env(UPLOADS_SPOOL_RESERVE_BYTES="0")
def test_full_spool_filesystem_is_507_with_no_half_file_and_recovers(
    small_spool: Path, web_server: Server, token: str, user: Any
) -> None:
    headers = {"X-Container-Name": RUNNING, "X-File-Path": "/tmp/x.bin"}
    # Announced too large for the free space: refused before a byte of the body is sent.
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
        f"X-Container-Name: {RUNNING}\r\nX-File-Path: /tmp/x.bin\r\n"
        f"Content-Length: {9 << 20}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", web_server.port), timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 507")
    # A chunked body has no announced size: the disk fills mid-write.
    assert chunked_post(web_server, token, 12 << 20) == 507
    assert spool_files(small_spool) == []
    # Fill it with accepted uploads, then one more does not fit.
    accepted = [post(web_server, token, b"a" * (5 << 19), **headers) for _ in range(3)]
    assert [s for s, _ in accepted] == [202, 202, 202]
    status, _ = post(web_server, token, b"b" * (1 << 20), **headers)
    assert status == 507
    assert UploadTask.objects.count() == 3
    assert_consistent(small_spool)
    # Room comes back (an upload is cancelled and purged): uploads are accepted again.
    first = UploadTask.objects.order_by("created_at").first()
    assert first is not None
    conn = http.client.HTTPConnection("127.0.0.1", web_server.port, timeout=30)
    conn.request(
        "POST", f"/api/uploads/{first.pk}/cancel/", headers={"Authorization": f"Token {token}"}
    )
    assert conn.getresponse().status == 200
    free = shutil.disk_usage(small_spool).free
    purge_finished(succeeded_before=timezone.now(), failed_before=timezone.now())
    assert shutil.disk_usage(small_spool).free - free >= first.size
    status, _ = post(web_server, token, b"c" * (2 << 20), **headers)
    assert status == 202
    assert_consistent(small_spool)


def test_clients_that_reset_mid_upload_leave_nothing_and_the_server_answers(
    web_server: Server, token: str, spool: Path
) -> None:
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
        "X-Container-Name: web1\r\nX-File-Path: /srv/f\r\nContent-Length: 50000000\r\n\r\n"
    ).encode()
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", web_server.port))
        sock.sendall(head + b"r" * 2_000_000)
        # SO_LINGER with a zero timeout: close() sends a TCP reset, not a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_for(lambda: not spool_files(spool), 10, "partial files to be removed")
    assert UploadTask.objects.count() == 0
    status, _ = post(
        web_server,
        token,
        b"still here",
        **{"X-Container-Name": "web1", "X-File-Path": "/srv/f"},
    )
    assert status == 202
