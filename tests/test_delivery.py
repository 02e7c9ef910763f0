"""End to end against the real Incus: HTTP upload → worker → file inside a real instance."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from tests.conftest import ROOT, spool_files, subprocess_env
from tests.incus_utils import (
    IMAGE,
    P2_PROJECT,
    P2_RUNNING,
    RUNNING,
    STOPPED,
    incus,
    run_in,
    run_worker,
    sha256_in,
    stat_in,
    task_of,
    unique_dir,
    upload,
)
from uploads.incus import IncusPusher
from uploads.models import AuditEvent, Outcome, Status, UploadAttempt, UploadTask
from uploads.selectors import body_kept
from uploads.worker import Worker

pytestmark = [pytest.mark.incus, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _needs_incus(incus: str) -> None:
    """Every test here talks to the real daemon."""


@pytest.fixture
def workdir() -> Iterator[str]:
    """A fresh directory inside the running test instance, removed afterwards."""
    path = unique_dir()
    run_in(RUNNING, "mkdir", "-p", path)
    yield path
    run_in(RUNNING, "rm", "-rf", path)


def test_upload_lands_in_running_instance_with_mode_and_owner(
    api: APIClient, workdir: str, spool: Path
) -> None:
    body = os.urandom(300_000)
    data = upload(
        api,
        body,
        RUNNING,
        f"{workdir}/app.bin",
        x_file_mode="0640",
        x_file_uid="1000",
        x_file_gid="1000",
    )
    run_worker()
    task = task_of(data)
    assert task.status == Status.SUCCEEDED, task.last_error
    assert task.attempts == 1
    assert sha256_in(RUNNING, f"{workdir}/app.bin") == hashlib.sha256(body).hexdigest()
    assert stat_in(RUNNING, f"{workdir}/app.bin") == ("640", 1000, 1000, len(body))
    assert spool_files(spool) == []
    assert api.get(f"/api/uploads/{task.pk}/").json()["status"] == "succeeded"


def test_upload_lands_in_stopped_instance(api: APIClient) -> None:
    body = os.urandom(50_000)
    path = f"/root/uploadsvc-{uuid.uuid4().hex}.bin"
    data = upload(api, body, STOPPED, path)
    run_worker()
    assert task_of(data).status == Status.SUCCEEDED, task_of(data).last_error
    assert sha256_in(STOPPED, path) == hashlib.sha256(body).hexdigest()
    assert incus("list", STOPPED, "--format", "csv", "--columns", "s").strip() == "STOPPED"


def test_second_project_is_honoured(api: APIClient) -> None:
    body = b"project two\n"
    path = f"/tmp/uploadsvc-{uuid.uuid4().hex}.txt"
    data = upload(api, body, P2_RUNNING, path, x_incus_project=P2_PROJECT)
    run_worker()
    assert task_of(data).status == Status.SUCCEEDED, task_of(data).last_error
    assert sha256_in(P2_RUNNING, path, project=P2_PROJECT) == hashlib.sha256(body).hexdigest()
    # The same name in the default project does not exist: a permanent failure there.
    other = upload(api, body, P2_RUNNING, path)
    run_worker()
    assert task_of(other).last_error == f"instance '{P2_RUNNING}' not found in project 'default'"


def test_missing_instance_fails_once_then_retry_after_creating_it_succeeds(
    api: APIClient, spool: Path
) -> None:
    name = f"uploadsvc-t{uuid.uuid4().hex[:8]}"
    body = b"late instance\n"
    data = upload(api, body, name, "/root/hello.txt")
    run_worker()
    task = task_of(data)
    assert task.status == Status.FAILED
    assert task.attempts == 1
    assert task.last_error == f"instance '{name}' not found in project 'default'"
    assert body_kept(task)  # for the retry

    incus("create", IMAGE, name)
    try:
        response = api.post(f"/api/uploads/{task.pk}/retry/")
        assert response.status_code == 200
        run_worker()
        task.refresh_from_db()
        assert task.status == Status.SUCCEEDED, task.last_error
        assert task.attempts == 2
        assert sha256_in(name, "/root/hello.txt") == hashlib.sha256(body).hexdigest()
        outcomes = list(
            UploadAttempt.objects.filter(task=task)
            .order_by("number")
            .values_list("outcome", flat=True)
        )
        assert outcomes == [Outcome.FAILED, Outcome.SUCCEEDED]
    finally:
        incus("delete", "--force", name, check=False)


def test_missing_parent_fails_without_create_dirs_and_lands_with_it(
    api: APIClient, workdir: str
) -> None:
    path = f"{workdir}/a/b/c.txt"
    refused = upload(api, b"deep", RUNNING, path)
    run_worker()
    task = task_of(refused)
    assert task.status == Status.FAILED and task.attempts == 1
    assert (
        task.last_error
        == f"parent directory {workdir}/a/b does not exist in {RUNNING} (set create_dirs)"
    )

    created = upload(api, b"deep", RUNNING, path, x_create_dirs="true", x_file_uid="1000")
    run_worker()
    assert task_of(created).status == Status.SUCCEEDED, task_of(created).last_error
    assert stat_in(RUNNING, f"{workdir}/a")[:2] == ("755", 1000)
    assert stat_in(RUNNING, f"{workdir}/a/b")[:2] == ("755", 1000)
    assert run_in(RUNNING, "cat", path) == "deep"


def test_a_retry_may_correct_create_dirs_and_the_owner_without_sending_the_file_again(
    api: APIClient, workdir: str
) -> None:
    path = f"{workdir}/x/y.conf"
    failed = upload(api, b"config\n", RUNNING, path)
    run_worker()
    assert task_of(failed).status == Status.FAILED
    response = api.post(
        f"/api/uploads/{failed['id']}/retry/",
        {"create_dirs": True, "mode": "0640", "uid": 1000, "gid": 1000},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert (response.json()["create_dirs"], response.json()["mode"]) == (True, "0640")
    run_worker()
    task = task_of(failed)
    assert task.status == Status.SUCCEEDED and task.attempts == 2
    assert stat_in(RUNNING, path) == ("640", 1000, 1000, 7)
    assert run_in(RUNNING, "cat", path) == "config\n"
    event = AuditEvent.objects.get(action="retry", outcome="done")
    assert event.detail["changes"] == {"create_dirs": True, "mode": 0o640, "uid": 1000, "gid": 1000}


def test_destination_that_is_a_directory_fails_permanently(api: APIClient, workdir: str) -> None:
    data = upload(api, b"x", RUNNING, workdir)
    run_worker()
    task = task_of(data)
    assert task.status == Status.FAILED and task.attempts == 1
    assert task.last_error == f"{workdir} is a directory in {RUNNING}"


class RefusingThenForwardingSocket:
    """A unix socket path that first refuses connections (bound, not listening) and later
    forwards to the real Incus socket: an Incus endpoint that is down, then comes up."""

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self._stop = threading.Event()

    def come_up(self) -> None:
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def test_refused_connection_is_transient_and_lands_once_incus_comes_up(
    api: APIClient, workdir: str, settings: Any, tmp_path: Path, incus: str
) -> None:
    endpoint = RefusingThenForwardingSocket(tmp_path / "incus.sock", incus)
    settings.UPLOADS = {
        **settings.UPLOADS,
        "INCUS_ENDPOINT": str(endpoint.path),
        "RETRY_BASE_SECONDS": 600,
    }
    try:
        data = upload(api, b"patience\n", RUNNING, f"{workdir}/p.txt")
        run_worker()
        task = task_of(data)
        assert task.status == Status.PENDING
        assert "cannot reach Incus" in task.last_error
        endpoint.come_up()
        UploadTask.objects.filter(pk=task.pk).update(next_attempt_at=timezone.now())
        run_worker()
        task.refresh_from_db()
        assert task.status == Status.SUCCEEDED, task.last_error
        assert task.attempts == 2
        assert run_in(RUNNING, "cat", f"{workdir}/p.txt") == "patience\n"
    finally:
        endpoint.close()


def start_worker(spool: Path, log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_push_workers", "-v", "2", *args],
        cwd=ROOT,
        env=subprocess_env(spool, **env),
        stdout=open(log, "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_200_concurrent_uploads_two_processes_each_pushed_exactly_once(
    api: APIClient, workdir: str, spool: Path, tmp_path: Path
) -> None:
    second_dir = f"/tmp/uploadsvc-test-{uuid.uuid4().hex[:12]}"
    run_in(P2_RUNNING, "mkdir", "-p", second_dir, project=P2_PROJECT)
    expected: dict[tuple[str, str], str] = {}
    for n in range(200):
        body = f"file {n} {uuid.uuid4()}\n".encode()
        if n % 2:
            upload(api, body, RUNNING, f"{workdir}/{n}.txt")
            expected[(RUNNING, f"{workdir}/{n}.txt")] = hashlib.sha256(body).hexdigest()
        else:
            upload(api, body, P2_RUNNING, f"{second_dir}/{n}.txt", x_incus_project=P2_PROJECT)
            expected[(P2_RUNNING, f"{second_dir}/{n}.txt")] = hashlib.sha256(body).hexdigest()
    log = tmp_path / "workers.log"
    workers = [start_worker(spool, log, "--threads", "4", "--burst") for _ in range(2)]
    try:
        for proc in workers:
            assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        for proc in workers:
            proc.kill()
    assert UploadTask.objects.filter(status=Status.SUCCEEDED).count() == 200
    assert not UploadTask.objects.exclude(attempts=1).exists()
    assert UploadAttempt.objects.count() == 200
    assert set(UploadAttempt.objects.values_list("outcome", flat=True)) == {Outcome.SUCCEEDED}
    assert len(set(UploadAttempt.objects.values_list("worker_id", flat=True))) == 2
    landed: dict[tuple[str, str], str] = {}
    for instance, directory, project in (
        (RUNNING, workdir, "default"),
        (P2_RUNNING, second_dir, P2_PROJECT),
    ):
        out = run_in(instance, "sh", "-c", f"sha256sum {directory}/*.txt", project=project)
        for line in out.splitlines():
            digest, path = line.split()
            landed[(instance, path)] = digest
    run_in(P2_RUNNING, "rm", "-rf", second_dir, project=P2_PROJECT)
    assert landed == expected
    assert spool_files(spool) == []


def test_killed_worker_task_is_reclaimed_after_lease_and_lands_once(
    api: APIClient, workdir: str, spool: Path, tmp_path: Path
) -> None:
    # 200 MiB takes about a second to push here: long enough to kill the worker mid-push.
    body = os.urandom(200 << 20)
    digest = hashlib.sha256(body).hexdigest()
    data = upload(api, body, RUNNING, f"{workdir}/big.bin")
    del body
    log = tmp_path / "worker.log"
    env = {"UPLOADS_LEASE_SECONDS": "2"}
    victim = start_worker(spool, log, "--poll-interval", "0.05", **env)
    try:
        wait_for(lambda: UploadTask.objects.filter(status=Status.RUNNING).exists(), timeout=30)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
    finally:
        victim.kill()
    task = task_of(data)
    if task.status == Status.SUCCEEDED:
        pytest.fail("the push finished before the kill; make the file larger")
    rescuer = start_worker(spool, log, "--poll-interval", "0.1", **env)
    try:
        wait_for(lambda: task_of(data).status == Status.SUCCEEDED, timeout=60)
    finally:
        rescuer.send_signal(signal.SIGTERM)
        rescuer.wait(timeout=30)
    task.refresh_from_db()
    assert task.attempts == 2
    outcomes = list(
        UploadAttempt.objects.filter(task=task).order_by("number").values_list("outcome", flat=True)
    )
    assert outcomes == [Outcome.LOST, Outcome.SUCCEEDED]
    assert sha256_in(RUNNING, f"{workdir}/big.bin") == digest
    assert spool_files(spool) == []


def test_sigterm_during_a_real_push_lets_it_land_and_exits_0(
    api: APIClient, workdir: str, spool: Path, tmp_path: Path
) -> None:
    body = os.urandom(32 << 20)
    data = upload(api, body, RUNNING, f"{workdir}/drain.bin")
    log = tmp_path / "worker.log"
    proc = start_worker(spool, log, "--poll-interval", "0.05")
    try:
        wait_for(lambda: task_of(data).status != Status.PENDING, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    assert task_of(data).status == Status.SUCCEEDED
    assert sha256_in(RUNNING, f"{workdir}/drain.bin") == hashlib.sha256(body).hexdigest()


def test_a_push_still_running_when_the_grace_period_ends_cannot_publish_after_its_release(
    api: APIClient, workdir: str, spool: Path
) -> None:
    """The grace period runs out during a long push. Its claim is released for another worker
    only after its connection to Incus is closed, so it can never rename its file into place
    later, over what the next worker delivers."""
    body = os.urandom(400 << 20)
    digest = hashlib.sha256(body).hexdigest()
    data = upload(api, body, RUNNING, f"{workdir}/late.bin")
    del body
    worker = Worker(threads=1, poll_interval=0.05, grace_period=0.1, pusher_factory=IncusPusher)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(worker.run()))
    runner.start()
    try:
        wait_for(lambda: task_of(data).status == Status.RUNNING, timeout=30)
        time.sleep(0.1)  # into the push, which takes a second or more
        worker.stop()
        runner.join(timeout=60)
    finally:
        worker.stop()
    assert result == [1]
    task = task_of(data)
    assert task.status == Status.PENDING
    assert UploadAttempt.objects.get(task=task).outcome == Outcome.INTERRUPTED
    time.sleep(2)  # the stopped push would have finished by now
    assert "late.bin" not in listing_of(workdir)
    run_worker()
    assert task_of(data).status == Status.SUCCEEDED
    assert sha256_in(RUNNING, f"{workdir}/late.bin") == digest


def listing_of(directory: str) -> list[str]:
    return run_in(RUNNING, "ls", "-a", directory).split()
