"""The queue's state machine on the real database: claims, leases, completions, reaping, and the
corners where a busy service breaks promises (clocks, purges racing retries, wake-ups that fail,
power cuts)."""

import contextlib
import os
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.db import connection, transaction
from django.db.models.functions import Now
from django.utils import timezone

from tests.conftest import spool_files
from tests.factories import make_batch, make_task
from uploads import queue, services, wakeup
from uploads.models import AuditEvent, Outcome, Status, UploadAttempt, UploadTask
from uploads.queue import Completion, Result
from uploads.spool import SpoolWriter, names

pytestmark = pytest.mark.django_db


def claim_one(worker_id: str = "w") -> queue.Claim:
    (claim,) = queue.claim(worker_id=worker_id, limit=1)
    return claim


def complete(claim: queue.Claim, result: str, error: str = "") -> str | None:
    return queue.complete([Completion(claim, result, error)])[claim]


def expire_leases() -> None:
    UploadTask.objects.update(lease_expires_at=Now() - timedelta(seconds=1))


def test_claim_takes_ready_tasks_once_with_a_token_and_an_attempt_each(user: Any) -> None:
    tasks = [make_task(user) for _ in range(3)]
    claims = queue.claim(worker_id="w1", limit=2)
    assert len(claims) == 2
    assert {c.task.id for c in claims} <= {t.pk for t in tasks}
    assert len({c.token for c in claims}) == 2  # one token per claim, not per batch
    for claim in claims:
        row = UploadTask.objects.get(pk=claim.task.id)
        assert (row.status, row.attempts, row.worker_id) == (Status.RUNNING, 1, "w1")
        assert row.claim_token == claim.token
        assert row.lease_expires_at > timezone.now()
        attempt = UploadAttempt.objects.get(pk=claim.attempt_id)
        assert (attempt.number, attempt.outcome, attempt.claim_token) == (
            1,
            Outcome.RUNNING,
            claim.token,
        )
    assert len(queue.claim(worker_id="w2", limit=10)) == 1
    assert queue.claim(worker_id="w3", limit=10) == []


def test_tasks_waiting_for_backoff_are_not_ready(user: Any) -> None:
    task = make_task(user)
    UploadTask.objects.filter(pk=task.pk).update(next_attempt_at=Now() + timedelta(hours=1))
    assert queue.claim(worker_id="w", limit=5) == []


def test_success_deletes_the_spool_file_and_finishes(user: Any, spool: Path) -> None:
    make_task(user)
    claim = claim_one()
    assert complete(claim, Result.SUCCEEDED) == Status.SUCCEEDED
    task = UploadTask.objects.get()
    assert task.status == Status.SUCCEEDED and task.finished_at is not None
    assert task.claim_token is None and task.lease_expires_at is None
    assert spool_files(spool) == []
    assert UploadAttempt.objects.get().outcome == Outcome.SUCCEEDED


def test_a_spool_file_another_task_may_need_stays_after_a_success(user: Any, spool: Path) -> None:
    first = make_task(user)
    second = make_task(user)
    UploadTask.objects.filter(pk=second.pk).update(
        spool_name=first.spool_name, status=Status.FAILED
    )
    claim = claim_one()
    assert complete(claim, Result.SUCCEEDED) == Status.SUCCEEDED
    assert first.spool_name in spool_files(spool)  # the failed sibling can still be retried


def test_transient_failure_backs_off_then_fails_after_max_attempts(
    user: Any, settings: Any, spool: Path
) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "MAX_ATTEMPTS": 2, "RETRY_BASE_SECONDS": 30}
    make_task(user)
    assert complete(claim_one(), Result.TRANSIENT, "timeout") == Status.PENDING
    task = UploadTask.objects.get()
    assert task.last_error == "timeout"
    delay = (task.next_attempt_at - timezone.now()).total_seconds()
    assert 20 < delay <= 30
    UploadTask.objects.update(next_attempt_at=Now())
    claim = claim_one()
    assert claim.task.attempts == 2
    assert complete(claim, Result.TRANSIENT, "timeout again") == Status.FAILED
    assert UploadTask.objects.get().status == Status.FAILED
    assert [a.outcome for a in UploadAttempt.objects.order_by("number")] == [
        Outcome.RETRY,
        Outcome.FAILED,
    ]
    assert len(spool_files(spool)) == 1  # kept for a retry


def test_permanent_failure_stops_at_once(user: Any) -> None:
    make_task(user)
    assert complete(claim_one(), Result.PERMANENT, "no such instance") == Status.FAILED
    assert UploadTask.objects.get().attempts == 1


def test_a_refused_push_is_audited_with_its_failure(user: Any) -> None:
    task = make_task(user)
    reason = "/srv/app/etc is a symbolic link to /etc, outside the directories granted"
    assert complete(claim_one(), Result.REFUSED, reason) == Status.FAILED
    event = AuditEvent.objects.get(action="push")
    assert (event.outcome, event.username, event.task_id) == ("refused", "alice", task.pk)
    assert event.detail["reason"] == reason


def test_backoff_grows_and_is_capped(settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "RETRY_BASE_SECONDS": 2, "RETRY_MAX_SECONDS": 60}
    ceilings = [max(queue.retry_delay(n) for _ in range(200)) for n in (1, 3, 10)]
    assert ceilings[0] <= 2 and 4 < ceilings[1] <= 8 and 30 < ceilings[2] <= 60
    assert min(queue.retry_delay(10) for _ in range(200)) >= 2


def test_a_worker_that_lost_its_lease_cannot_overwrite_the_newer_result(user: Any) -> None:
    make_task(user)
    zombie = claim_one("zombie")
    expire_leases()
    assert queue.reap() == 1
    fresh = claim_one("fresh")
    assert complete(fresh, Result.SUCCEEDED) == Status.SUCCEEDED
    # The zombie finishes late: neither success nor failure may touch the row.
    assert complete(zombie, Result.PERMANENT, "late") is None
    assert complete(zombie, Result.SUCCEEDED) is None
    task = UploadTask.objects.get()
    assert task.status == Status.SUCCEEDED and task.worker_id == "fresh"
    outcomes = dict(UploadAttempt.objects.values_list("worker_id", "outcome"))
    assert outcomes == {"zombie": Outcome.LOST, "fresh": Outcome.SUCCEEDED}


def test_reaper_fails_a_task_whose_last_attempt_was_lost(user: Any, settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "MAX_ATTEMPTS": 1}
    make_task(user)
    claim_one()
    expire_leases()
    queue.reap()
    task = UploadTask.objects.get()
    assert task.status == Status.FAILED
    assert "lease expired" in task.last_error


def test_a_worker_never_reaps_a_claim_it_still_holds(user: Any) -> None:
    """The lease of a push in progress ran out (the database was away for longer than a
    lease): its own worker must not requeue it under its feet, claim it again and push it a
    second time beside the first; another worker may."""
    make_task(user)
    held = claim_one("w1")
    expire_leases()
    assert queue.reap(holding=[held.key]) == 0
    assert UploadTask.objects.get().status == Status.RUNNING
    assert queue.reap(holding=[]) == 1


def test_renewal_extends_the_lease_and_reports_claims_it_lost(user: Any) -> None:
    make_task(user)
    make_task(user)
    kept, lost = queue.claim(worker_id="w", limit=2)
    expire_leases()
    UploadTask.objects.filter(pk=lost.task.id).update(claim_token=None, status=Status.PENDING)
    assert queue.renew([kept, lost]) == [lost]
    assert lost.revoked.is_set() and not lost.held()
    assert kept.held() and not kept.revoked.is_set()
    assert queue.reap() == 0
    assert UploadTask.objects.get(pk=kept.task.id).status == Status.RUNNING


def test_a_claim_whose_lease_may_have_run_out_is_no_longer_held(user: Any, settings: Any) -> None:
    """A push may publish only while its lease surely runs: the last renewal plus most of a
    lease, by this process's clock (the heartbeat could not reach the database since)."""
    settings.UPLOADS = {**settings.UPLOADS, "LEASE_SECONDS": 10}
    make_task(user)
    claim = claim_one()
    assert claim.held()
    claim.renewed_at -= 7.9
    assert claim.held()
    claim.renewed_at -= 0.2
    assert not claim.held()


def test_released_claim_goes_back_without_costing_an_attempt(user: Any, settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "MAX_ATTEMPTS": 1}
    make_task(user)
    assert complete(claim_one(), Result.RELEASED) == Status.PENDING
    task = UploadTask.objects.get()
    assert task.status == Status.PENDING and task.max_attempts == 2
    assert UploadAttempt.objects.get().outcome == Outcome.INTERRUPTED
    assert claim_one("w2").task.attempts == 2


def test_cancel_refuses_a_running_task(user: Any) -> None:
    task = make_task(user)
    claim_one()
    with pytest.raises(services.TaskStateError):
        services.upload_cancel(task=task)


def test_leases_and_readiness_follow_the_database_clock_not_the_hosts(user: Any) -> None:
    """A worker host whose clock runs 50 s ahead (injected: moving the machine's real clock
    would move the database's too) neither reaps live leases nor finds tasks ready early; one
    50 s behind does not delay new tasks."""
    make_task(user)
    ahead = timezone.now() + timedelta(seconds=50)
    with mock.patch("django.utils.timezone.now", return_value=ahead):
        claim = claim_one()
        assert queue.reap() == 0
        assert UploadTask.objects.get().status == Status.RUNNING
        assert complete(claim, Result.TRANSIENT, "blip") == Status.PENDING
        assert queue.claim(worker_id="w", limit=1) == []  # backing off by the database's clock
    behind = timezone.now() - timedelta(seconds=50)
    with mock.patch("django.utils.timezone.now", return_value=behind):
        make_task(user)
        assert len(queue.claim(worker_id="w", limit=5)) == 1


@pytest.mark.django_db(transaction=True)
def test_concurrent_claimers_never_share_a_task(user: Any) -> None:
    """Eight threads, each with its own database connection, claim from one queue at once."""
    for _ in range(120):
        make_task(user, b"x")
    claimed: list[list[str]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claimer(n: int) -> None:
        start.wait()
        mine: list[str] = []
        try:
            while batch := queue.claim(worker_id=f"t{n}", limit=3):
                mine.extend(str(c.task.id) for c in batch)
        finally:
            connection.close()
        with lock:
            claimed.append(mine)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [pk for mine in claimed for pk in mine]
    assert len(everything) == 120
    assert len(set(everything)) == 120
    assert UploadAttempt.objects.count() == 120
    assert not UploadTask.objects.filter(attempts__gt=1).exists()


# --- the spool and the queue ---------------------------------------------------------------------


def test_the_orphan_sweep_keeps_the_files_of_failed_and_cancelled_tasks(
    user: Any, spool: Path, api: Any
) -> None:
    """A failed upload is kept for weeks so that it can be retried; its file must last as long
    as the task, not a day."""
    failed = make_task(user)
    cancelled = make_task(user)
    UploadTask.objects.filter(pk=failed.pk).update(status=Status.FAILED, finished_at=Now())
    services.upload_cancel(task=cancelled)
    ancient = time.time() - 30 * 86400
    for task in (failed, cancelled):
        os.utime(spool / task.spool_name, (ancient, ancient))
    result = services.purge_finished(
        succeeded_before=timezone.now(),
        failed_before=timezone.now() - timedelta(days=28),
        orphans_before=timezone.now(),
    )
    assert result.spool_files == 0
    assert set(spool_files(spool)) == {failed.spool_name, cancelled.spool_name}
    assert api.post(f"/api/uploads/{failed.pk}/retry/").status_code == 200
    assert api.post(f"/api/uploads/{cancelled.pk}/retry/").status_code == 200


def test_purge_removes_only_the_files_of_the_tasks_it_deleted(user: Any, spool: Path) -> None:
    """A task retried between purge's look and its delete stays, and so does its file."""
    old = make_task(user)
    retried = make_task(user)
    UploadTask.objects.update(status=Status.FAILED, finished_at=Now() - timedelta(days=40))
    services.upload_retry(task=UploadTask.objects.get(pk=retried.pk))
    services.purge_finished(
        succeeded_before=timezone.now(), failed_before=timezone.now() - timedelta(days=28)
    )
    assert list(UploadTask.objects.values_list("pk", flat=True)) == [retried.pk]
    assert spool_files(spool) == [retried.spool_name]
    assert old.spool_name not in spool_files(spool)


@pytest.mark.django_db(transaction=True)
def test_a_retry_racing_a_purge_keeps_its_task_and_its_file(user: Any, spool: Path) -> None:
    """The retry's transaction holds the failed task when purge comes for it: on PostgreSQL
    purge skips the locked row, on SQLite it waits for the retry to commit; either way the
    task is pending afterwards, with its file, and the other old task is gone."""
    gone = make_task(user)
    racing = make_task(user)
    UploadTask.objects.update(status=Status.FAILED, finished_at=Now() - timedelta(days=40))
    retrying = threading.Event()
    purged = threading.Event()

    def purge() -> None:
        retrying.wait()
        try:
            services.purge_finished(
                succeeded_before=timezone.now(), failed_before=timezone.now() - timedelta(days=28)
            )
        finally:
            connection.close()
            purged.set()

    purger = threading.Thread(target=purge)
    purger.start()
    with transaction.atomic():
        services.upload_retry(task=UploadTask.objects.get(pk=racing.pk))
        retrying.set()
        if connection.vendor == "postgresql":
            assert purged.wait(30)  # done while we hold the row
        else:
            assert not purged.wait(0.5)  # waiting for our write lock
    purger.join(30)
    assert list(UploadTask.objects.values_list("pk", "status")) == [(racing.pk, Status.PENDING)]
    assert spool_files(spool) == [racing.spool_name]
    assert gone.spool_name not in spool_files(spool)


def test_purge_survives_files_that_vanish_while_it_lists(user: Any, spool: Path) -> None:
    for name in ("a" * 32, "b" * 32, "c" * 32):
        (spool / name).write_bytes(b"orphan")
    listing = names(modified_before=time.time() + 60)
    first = next(listing)
    for path in spool.iterdir():
        if path.name != first:
            path.unlink()  # another purge got there first
    assert list(listing) == []


# --- wake-ups and durability -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_wake_up_that_fails_never_fails_the_upload_or_loses_its_file(
    user: Any, spool: Path, api: Any, settings: Any
) -> None:
    """The upload commits, then waking the workers fails. It must still be a 202 with its
    file in place (a 500 would make the client send it again), and a retry must work too.
    SQLite: the wake-up pipe's path is a directory, a real fault. PostgreSQL: the NOTIFY runs
    on a thread of its own; its failure is injected (mocked) at the call."""
    from tests.api_utils import raw_upload

    if connection.vendor == "sqlite":
        pipe = wakeup.pipe_path()
        assert pipe is not None
        pipe.unlink(missing_ok=True)
        pipe.mkdir()
        fault: Any = contextlib.nullcontext()
    else:
        fault = mock.patch.object(queue._notifier, "ring", side_effect=OSError("injected"))
    try:
        with fault:
            response = raw_upload(api, b"x" * 100_000)  # a spool file, not a body in the row
            assert response.status_code == 202, response.content
            task = UploadTask.objects.get()
            assert spool_files(spool) == [task.spool_name]
            UploadTask.objects.update(status=Status.FAILED)
            assert api.post(f"/api/uploads/{task.pk}/retry/").status_code == 200
    finally:
        if connection.vendor == "sqlite" and pipe.is_dir():
            pipe.rmdir()
    assert UploadTask.objects.get().status == Status.PENDING


def test_a_spooled_body_is_on_disk_and_named_before_the_202(spool: Path) -> None:
    """What a power cut would test: the data and the rename that names it reach the disk
    before the body counts as spooled. fsync is observed (each call still goes through), not
    replaced."""
    synced: list[str] = []
    real_fsync = os.fsync

    def observed(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    with mock.patch("os.fsync", side_effect=observed), SpoolWriter() as writer:
        writer.write(b"durable")
        spooled = writer.commit()
    assert synced == [str(spool / f"{spooled.name}.part"), str(spool)]


def test_sqlite_commits_are_synced(settings: Any) -> None:
    if connection.vendor != "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == "on"
        return
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA synchronous")
        assert cursor.fetchone()[0] == 2  # FULL


@pytest.mark.django_db(transaction=True)
def test_a_shared_body_goes_when_the_last_two_tasks_complete_at_the_same_moment(
    user: Any, spool: Path
) -> None:
    """Two workers record the last two successes of a fan-out at once: on PostgreSQL each
    statement sees the other task still running (without the look after the commit, about
    half of these rounds left the file behind)."""
    for _ in range(20):
        make_batch(user, ["web1", "web2"], b"x" * 100_000)
        claims = queue.claim(worker_id="w", limit=2)
        together = threading.Barrier(2)

        def record(claim: queue.Claim, together: threading.Barrier = together) -> None:
            try:
                together.wait()
                queue.complete([Completion(claim, Result.SUCCEEDED)])
            finally:
                connection.close()

        workers = [threading.Thread(target=record, args=(claim,)) for claim in claims]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert spool_files(spool) == []
