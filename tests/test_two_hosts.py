"""Web and workers on separate hosts: each role runs from a working directory of its own (its own
copy of the code and its own `var/`, so no local disk is shared), the two sharing only the
database and the spool on a real object store (SeaweedFS); files land in the real Incus.

On PostgreSQL this is the deployment the README's "Two hosts" describes; on SQLite the two
directories share the database file by its absolute path, which exercises the same code.
"""

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from rest_framework.authtoken.models import Token

from tests.conftest import ROOT, S3Spool, free_port, subprocess_env, wait_for_port
from tests.incus_utils import RUNNING, run_in, sha256_in, stat_in, unique_dir
from uploads.models import Status, UploadTask

pytestmark = [pytest.mark.incus, pytest.mark.django_db(transaction=True)]

MIB = 1024 * 1024
CODE = ("manage.py", "uploads", "uploadsvc", "scripts")


class Host:
    """A working directory with a copy of the service, as on a machine of its own."""

    def __init__(self, directory: Path, store: S3Spool, incus: str) -> None:
        self.directory = directory
        directory.mkdir()
        for name in CODE:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source, directory / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, directory / name)
        self.env = subprocess_env(
            directory / "var" / "spool",  # never used: the spool is the bucket
            BIN=str(Path(sys.executable).parent),
            PYTHONPATH=str(directory),  # this copy, not the checkout pytest runs from
            # Bytecode written beside the copy shows which code a process imported.
            PYTHONDONTWRITEBYTECODE="",
            UPLOADS_INCUS_ENDPOINT=incus,
            UPLOADS_LEASE_SECONDS="4",
            PROMETHEUS_MULTIPROC_DIR=str(directory / "var" / "prometheus"),
            **store.environment(),
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], log: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.directory / log, "ab") as out:
            proc = subprocess.Popen(
                args,
                cwd=self.directory,
                env={**self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def web(self) -> tuple[str, subprocess.Popen[bytes]]:
        port = free_port()
        proc = self._start(
            ["scripts/run", "web"], "web.log", PORT=str(port), WEB_WORKERS="1", WEB_THREADS="4"
        )
        wait_for_port(port, proc, self.directory / "web.log", timeout=30)
        return f"http://127.0.0.1:{port}", proc

    def workers(self) -> subprocess.Popen[bytes]:
        return self._start(["scripts/run", "workers"], "workers.log", PUSH_THREADS="2")

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def imported_from_here(self) -> bool:
        return any((self.directory / "uploadsvc" / "__pycache__").glob("settings.*.pyc"))

    def log(self, name: str) -> str:
        path = self.directory / name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def hosts(tmp_path: Path, s3_spool: S3Spool, incus: str) -> Iterator[tuple[Host, Host, Host]]:
    """Three hosts: A for the web server, B and C for workers."""
    made = [Host(tmp_path / name, s3_spool, incus) for name in ("host-a", "host-b", "host-c")]
    try:
        yield made[0], made[1], made[2]
    finally:
        for host in made:
            host.stop()


@pytest.fixture
def workdir() -> Iterator[str]:
    path = unique_dir()
    run_in(RUNNING, "mkdir", "-p", path)
    yield path
    run_in(RUNNING, "rm", "-rf", path)


@pytest.fixture
def token(user: Any) -> str:
    return str(Token.objects.create(user=user).key)


def post(url: str, token: str, body: Any, path: str, **headers: str) -> dict[str, Any]:
    answer = requests.post(
        f"{url}/api/uploads/",
        data=body,
        headers={
            "Authorization": f"Token {token}",
            "Content-Type": "application/octet-stream",
            "X-Container-Name": RUNNING,
            "X-File-Path": path,
            **headers,
        },
        timeout=120,
    )
    assert answer.status_code == 202, answer.text
    data: dict[str, Any] = answer.json()
    return data


def wait_for(predicate: Any, timeout: float, what: str, *logs: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(logs))
        time.sleep(0.1)


def statuses(ids: list[str]) -> set[str]:
    return set(UploadTask.objects.filter(pk__in=ids).values_list("status", flat=True))


def test_uploads_through_a_land_via_b_started_after_a_stopped(
    hosts: tuple[Host, Host, Host], s3_spool: S3Spool, token: str, workdir: str
) -> None:
    a, b, _ = hosts
    url, web = a.web()
    bodies = {
        f"{workdir}/small.txt": b"small enough for the task's row\n",
        f"{workdir}/medium.bin": os.urandom(3 * MIB + 7),
        f"{workdir}/large.bin": os.urandom(20 * MIB + 1),
    }
    ids = [
        post(url, token, body, path, X_File_Mode="0640", X_File_Uid="1000", X_File_Gid="1000")["id"]
        for path, body in bodies.items()
    ]
    assert a.imported_from_here()
    web.send_signal(signal.SIGTERM)
    assert web.wait(timeout=60) == 0
    # Accepted, stored in the bucket (the small one travels in its row), nothing pushed yet.
    assert statuses(ids) == {Status.PENDING}
    names = set(UploadTask.objects.filter(pk__in=ids).values_list("spool_name", flat=True))
    assert set(s3_spool.objects()) == names - {""}
    assert not list((a.directory / "var").glob("spool/*"))

    b.workers()
    wait_for(lambda: statuses(ids) == {Status.SUCCEEDED}, 90, "the pushes", b.log("workers.log"))
    assert b.imported_from_here()
    for path, body in bodies.items():
        assert sha256_in(RUNNING, path) == hashlib.sha256(body).hexdigest()
        assert stat_in(RUNNING, path) == ("640", 1000, 1000, len(body))
    assert s3_spool.leftovers() == []


def test_a_worker_killed_mid_push_is_finished_by_another_host(
    hosts: tuple[Host, Host, Host], s3_spool: S3Spool, token: str, workdir: str, tmp_path: Path
) -> None:
    a, b, c = hosts
    url, _ = a.web()
    large = tmp_path / "large.bin"
    with open(large, "wb") as out:
        for _ in range(384):
            out.write(os.urandom(MIB))
    digest = hashlib.sha256(large.read_bytes()).hexdigest()
    path = f"{workdir}/large.bin"
    with open(large, "rb") as body:
        task_id = post(url, token, body, path)["id"]
    worker_b = b.workers()
    wait_for(lambda: statuses([task_id]) == {Status.RUNNING}, 60, "B's claim", b.log("workers.log"))
    time.sleep(0.5)  # into the push: reading from the bucket, writing over SFTP
    worker_b.send_signal(signal.SIGKILL)
    worker_b.wait(timeout=30)
    assert statuses([task_id]) == {Status.RUNNING}
    assert run_in(RUNNING, "ls", "-A", workdir).split() != ["large.bin"]

    c.workers()
    wait_for(
        lambda: statuses([task_id]) == {Status.SUCCEEDED},
        120,
        "C to finish the push",
        c.log("workers.log"),
    )
    assert sha256_in(RUNNING, path) == digest
    task = UploadTask.objects.get(pk=task_id)
    assert task.attempts == 2
    assert s3_spool.leftovers() == []


def test_a_failed_upload_is_retried_by_a_worker_on_another_host_and_cancel_and_purge_empty_it(
    hosts: tuple[Host, Host, Host], s3_spool: S3Spool, token: str, workdir: str
) -> None:
    a, b, c = hosts
    url, _ = a.web()
    body = os.urandom(2 * MIB)
    path = f"{workdir}/not/yet/there.bin"
    failed = post(url, token, body, path)["id"]
    worker_b = b.workers()
    wait_for(lambda: statuses([failed]) == {Status.FAILED}, 60, "the failure", b.log("workers.log"))
    worker_b.send_signal(signal.SIGTERM)
    worker_b.wait(timeout=60)
    task = UploadTask.objects.get(pk=failed)
    assert "not" in task.last_error
    assert s3_spool.objects() == [task.spool_name]  # kept for a retry

    retried = requests.post(
        f"{url}/api/uploads/{failed}/retry/",
        json={"create_dirs": True},
        headers={"Authorization": f"Token {token}"},
        timeout=30,
    )
    assert retried.status_code == 200, retried.text
    c.workers()
    wait_for(
        lambda: statuses([failed]) == {Status.SUCCEEDED},
        60,
        "the retry from C",
        c.log("workers.log"),
    )
    assert sha256_in(RUNNING, path) == hashlib.sha256(body).hexdigest()
    assert s3_spool.leftovers() == []
    c.stop()

    # No worker runs now: a cancelled upload keeps its body (it may be retried) until purge.
    cancelled = post(url, token, os.urandom(MIB), f"{workdir}/cancelled.bin")["id"]
    answer = requests.post(
        f"{url}/api/uploads/{cancelled}/cancel/",
        headers={"Authorization": f"Token {token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert len(s3_spool.objects()) == 1
    out = b.manage("purge_uploads", "--older-than", "0", "--orphans-older-than", "0")
    assert "Deleted" in out
    assert s3_spool.leftovers() == []
    assert not UploadTask.objects.filter(pk=cancelled).exists()


def test_a_client_that_resets_or_stops_short_mid_body_leaves_nothing_in_the_bucket(
    hosts: tuple[Host, Host, Host], s3_spool: S3Spool, token: str
) -> None:
    a, _, _ = hosts
    url, _ = a.web()
    port = int(url.rsplit(":", 1)[1])
    size = 40 * MIB
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
        f"X-Container-Name: {RUNNING}\r\nX-File-Path: /tmp/never.bin\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    for reset in (True, False):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + os.urandom(size // 2))  # parts are on their way to the bucket
            wait_for(lambda: s3_spool.incomplete_uploads() != [], 30, "a multipart upload")
            if reset:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)  # the body ends early: 400 IncompleteBody
                assert b" 400 " in sock.recv(65536).split(b"\r\n")[0]
        wait_for(
            lambda: s3_spool.leftovers() == [], 30, "the upload to be aborted", a.log("web.log")
        )
    assert UploadTask.objects.count() == 0
