"""The Worker loop and the run_push_workers command, with pushers that need no Incus.

Faults are injected with the test pushers in tests/pushers.py; delivery itself is proven
against the real Incus in test_incus.py (the pusher) and test_delivery.py (end to end).
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.core.management import call_command

from tests.conftest import ROOT, spool_files, subprocess_env
from tests.factories import make_task
from tests.pushers import CrashingPusher, FailTwicePusher, PublishingPusher
from uploads import queue
from uploads.models import Outcome, Status, UploadAttempt, UploadTask
from uploads.pushers import NullPusher
from uploads.worker import Worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_burst_processes_everything_ready_and_exits(user: Any, spool: Path) -> None:
    for _ in range(25):
        make_task(user)
    worker = Worker(threads=4, burst=True, poll_interval=0.05, pusher_factory=NullPusher)
    assert worker.run() == 0
    assert UploadTask.objects.filter(status=Status.SUCCEEDED).count() == 25
    assert UploadAttempt.objects.filter(outcome=Outcome.SUCCEEDED).count() == 25
    assert spool_files(spool) == []


def test_transient_failures_are_retried_without_sleeping_in_the_worker(
    user: Any, settings: Any
) -> None:
    # A fault injector: Incus cannot be made to fail exactly twice on demand.
    settings.UPLOADS = {**settings.UPLOADS, "RETRY_BASE_SECONDS": 0.01, "RETRY_MAX_SECONDS": 0.02}
    FailTwicePusher.failures.clear()
    task = make_task(user, path="/srv/flaky")
    worker = Worker(threads=2, burst=True, poll_interval=0.01, pusher_factory=FailTwicePusher)
    deadline = time.monotonic() + 10
    while UploadTask.objects.get(pk=task.pk).status != Status.SUCCEEDED:
        assert time.monotonic() < deadline
        worker.run()
        time.sleep(0.03)
    task.refresh_from_db()
    assert task.attempts == 3
    outcomes = list(UploadAttempt.objects.order_by("number").values_list("outcome", "error"))
    assert outcomes == [
        (Outcome.RETRY, "injected transient failure 1"),
        (Outcome.RETRY, "injected transient failure 2"),
        (Outcome.SUCCEEDED, ""),
    ]


def test_a_pusher_bug_is_recorded_not_fatal(user: Any) -> None:
    make_task(user)
    worker = Worker(threads=1, burst=True, pusher_factory=CrashingPusher)
    assert worker.run() == 0
    task = UploadTask.objects.get()
    assert task.status == Status.PENDING
    assert task.last_error == "internal error: RuntimeError: injected bug"


def test_missing_spool_file_fails_permanently(user: Any, spool: Path) -> None:
    task = make_task(user)
    (spool / task.spool_name).unlink()
    Worker(threads=1, burst=True, pusher_factory=NullPusher).run()
    task.refresh_from_db()
    assert task.status == Status.FAILED
    assert "missing" in task.last_error and task.attempts == 1


def test_command_runs_the_worker(user: Any, settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "PUSHER": "uploads.pushers.NullPusher"}
    make_task(user)
    call_command("run_push_workers", "--burst", "--threads", "2", verbosity=0)
    assert UploadTask.objects.get().status == Status.SUCCEEDED


def test_command_rejects_bad_options() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--threads"):
        call_command("run_push_workers", "--threads", "0")


def start_worker(spool: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "manage.py", "run_push_workers", "-v", "2", *args],
        cwd=ROOT,
        env=subprocess_env(spool, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for(predicate: Any, timeout: float = 20.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"condition not reached in time\n{tail}")
        time.sleep(0.05)


def test_sigterm_lets_in_flight_pushes_finish_and_exits_0(
    user: Any, spool: Path, tmp_path: Path
) -> None:
    # SlowPusher keeps a push in flight for a known time; SIGTERM must wait for it.
    for _ in range(2):
        make_task(user)
    proc = start_worker(
        spool,
        tmp_path,
        "--threads",
        "2",
        "--poll-interval",
        "0.1",
        UPLOADS_PUSHER="tests.pushers.SlowPusher",
        SLOW_PUSH_SECONDS="2",
    )
    try:
        wait_for(lambda: UploadTask.objects.filter(status=Status.RUNNING).count() == 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, (tmp_path / "worker.log").read_text()
    finally:
        proc.kill()
    assert UploadTask.objects.filter(status=Status.SUCCEEDED).count() == 2
    assert spool_files(spool) == []


def test_second_signal_exits_at_once_and_grace_expiry_releases_claims(
    user: Any, spool: Path, tmp_path: Path
) -> None:
    make_task(user)
    proc = start_worker(
        spool,
        tmp_path,
        "--threads",
        "1",
        "--poll-interval",
        "0.1",
        "--grace-period",
        "1",
        UPLOADS_PUSHER="tests.pushers.SlowPusher",
        SLOW_PUSH_SECONDS="30",
    )
    try:
        wait_for(lambda: UploadTask.objects.filter(status=Status.RUNNING).exists())
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
    assert code == 1
    task = UploadTask.objects.get()
    assert task.status == Status.PENDING  # released for another worker, not lost
    assert UploadAttempt.objects.get().outcome == Outcome.INTERRUPTED

    proc = start_worker(
        spool,
        tmp_path,
        "--threads",
        "1",
        "--poll-interval",
        "0.1",
        UPLOADS_PUSHER="tests.pushers.SlowPusher",
        SLOW_PUSH_SECONDS="30",
    )
    try:
        wait_for(lambda: UploadTask.objects.filter(status=Status.RUNNING).exists())
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) != 0
    finally:
        proc.kill()


def test_worker_reclaims_a_dead_workers_task_after_its_lease(
    user: Any, spool: Path, tmp_path: Path
) -> None:
    make_task(user)
    env = {"UPLOADS_LEASE_SECONDS": "1", "UPLOADS_PUSHER": "tests.pushers.SlowPusher"}
    victim = start_worker(spool, tmp_path, "--poll-interval", "0.1", SLOW_PUSH_SECONDS="60", **env)
    try:
        wait_for(lambda: UploadTask.objects.filter(status=Status.RUNNING).exists())
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=5)
    finally:
        victim.kill()
    rescuer = start_worker(spool, tmp_path, "--poll-interval", "0.1", SLOW_PUSH_SECONDS="0", **env)
    try:
        wait_for(lambda: UploadTask.objects.get().status == Status.SUCCEEDED)
    finally:
        rescuer.terminate()
        rescuer.wait(timeout=20)
    task = UploadTask.objects.get()
    assert task.attempts == 2
    assert list(UploadAttempt.objects.order_by("number").values_list("outcome", flat=True)) == [
        Outcome.LOST,
        Outcome.SUCCEEDED,
    ]


def test_a_paused_worker_never_publishes_a_task_another_worker_took_over(
    user: Any, spool: Path, tmp_path: Path
) -> None:
    """Worker A claims the task and is paused (SIGSTOP) longer than its lease; worker B reaps
    the lease, claims the task and delivers it. When A resumes, its heartbeat learns the
    claim is gone and its push stops before publishing: one delivery, and the task's record
    says so (A's attempt lost, B's succeeded), however long A was away."""
    make_task(user, path="/srv/once")
    log = tmp_path / "published"
    env = {
        "UPLOADS_LEASE_SECONDS": "2",
        "UPLOADS_PUSHER": "tests.pushers.PublishingPusher",
        "PUBLISH_LOG": str(log),
    }
    paused = start_worker(spool, tmp_path, "--poll-interval", "0.1", SLOW_PUSH_SECONDS="3", **env)
    rescuer = None
    try:
        wait_for(
            lambda: UploadTask.objects.filter(status=Status.RUNNING).exists(),
            60,
            tmp_path / "worker.log",
        )
        os.kill(paused.pid, signal.SIGSTOP)
        time.sleep(2.5)  # longer than the lease
        rescuer = start_worker(
            spool, tmp_path, "--poll-interval", "0.1", SLOW_PUSH_SECONDS="0.2", **env
        )
        wait_for(
            lambda: UploadTask.objects.get().status == Status.SUCCEEDED, 60, tmp_path / "worker.log"
        )
        os.kill(paused.pid, signal.SIGCONT)
        time.sleep(4)  # A's push "ends" now; it must not publish
    finally:
        os.kill(paused.pid, signal.SIGCONT)
        for proc in (paused, rescuer):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    assert log.read_text().splitlines() == [f"/srv/once {rescuer.pid}"]
    task = UploadTask.objects.get()
    assert (task.status, task.attempts) == (Status.SUCCEEDED, 2)
    assert list(UploadAttempt.objects.order_by("number").values_list("outcome", flat=True)) == [
        Outcome.LOST,
        Outcome.SUCCEEDED,
    ]


def test_a_push_that_outlives_its_lease_stops_and_is_pushed_again_by_the_same_worker(
    user: Any, spool: Path, tmp_path: Path
) -> None:
    """The database is away for longer than a lease (here: the worker is paused, so its
    heartbeat cannot renew), and nobody else reaped the task. The worker must neither reap its
    own claim and push the task a second time beside the first, nor publish on a lease that
    may have run out: the push stops, the task goes back without costing an attempt, and the
    same worker delivers it once."""
    make_task(user, path="/srv/alone")
    log = tmp_path / "published"
    env = {
        "UPLOADS_LEASE_SECONDS": "2",
        "UPLOADS_PUSHER": "tests.pushers.PublishingPusher",
        "PUBLISH_LOG": str(log),
    }
    worker = start_worker(spool, tmp_path, "--poll-interval", "0.1", SLOW_PUSH_SECONDS="1", **env)
    try:
        wait_for(
            lambda: UploadTask.objects.filter(status=Status.RUNNING).exists(),
            60,
            tmp_path / "worker.log",
        )
        os.kill(worker.pid, signal.SIGSTOP)
        time.sleep(2.5)
        os.kill(worker.pid, signal.SIGCONT)
        wait_for(
            lambda: UploadTask.objects.get().status == Status.SUCCEEDED, 60, tmp_path / "worker.log"
        )
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        worker.terminate()
        worker.wait(timeout=30)
    assert log.read_text().splitlines() == [f"/srv/alone {worker.pid}"]
    task = UploadTask.objects.get()
    assert task.status == Status.SUCCEEDED
    outcomes = list(UploadAttempt.objects.order_by("number").values_list("outcome", flat=True))
    assert outcomes[-1] == Outcome.SUCCEEDED
    assert set(outcomes[:-1]) <= {Outcome.INTERRUPTED, Outcome.LOST}
    assert task.attempts - outcomes.count(Outcome.INTERRUPTED) <= task.max_attempts


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_heartbeat_thread_is_started_again(
    user: Any, spool: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, settings: Any
) -> None:
    """If the heartbeat thread dies (injected: an exception no handler catches, which the real
    database cannot raise on demand), a push longer than the lease could never publish; the
    worker starts a new heartbeat, which keeps the lease alive: one attempt, one delivery."""
    settings.UPLOADS = {**settings.UPLOADS, "LEASE_SECONDS": 1}
    make_task(user, path="/srv/long")
    log = tmp_path / "published"
    real_beat = queue.worker_beat
    calls = []

    def dies_once(**kwargs: Any) -> None:
        calls.append(kwargs)
        if len(calls) == 1:
            raise SystemExit("injected: the heartbeat thread dies")
        real_beat(**kwargs)

    worker = Worker(threads=1, burst=True, poll_interval=0.05, pusher_factory=PublishingPusher)
    environment = {"SLOW_PUSH_SECONDS": "2.5", "PUBLISH_LOG": str(log)}
    with (
        mock.patch.object(queue, "worker_beat", side_effect=dies_once),
        mock.patch.dict(os.environ, environment),
    ):
        runner = threading.Thread(target=worker.run)
        runner.start()
        runner.join(timeout=20)
        if runner.is_alive():
            worker.stop()
            runner.join()
    assert "the heartbeat thread died; starting a new one" in caplog.text
    assert log.read_text().splitlines() == [f"/srv/long {os.getpid()}"]
    task = UploadTask.objects.get()
    assert (task.status, task.attempts) == (Status.SUCCEEDED, 1)


def test_worker_says_plainly_when_incus_is_unreachable(
    settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "INCUS_ENDPOINT": str(tmp_path / "missing.sock")}
    with caplog.at_level("WARNING", logger="uploads.worker"):
        Worker(threads=1, burst=True).run()
    assert "push target not reachable: the Incus socket" in caplog.text
    assert "tasks will wait and be retried" in caplog.text


def test_a_new_upload_wakes_an_idle_worker_at_once(user: Any, spool: Path, tmp_path: Path) -> None:
    # PostgreSQL: LISTEN/NOTIFY. SQLite: the wake-up pipe beside the database file.
    proc = start_worker(
        spool, tmp_path, "--poll-interval", "30", UPLOADS_PUSHER="uploads.pushers.NullPusher"
    )
    try:
        time.sleep(3)  # the worker is idle, waiting out its 30 s poll
        task = make_task(user)
        wait_for(lambda: UploadTask.objects.get(pk=task.pk).status == Status.SUCCEEDED, timeout=5)
        task.refresh_from_db()
        assert task.started_at is not None
        assert (task.started_at - task.created_at).total_seconds() < 1.0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
