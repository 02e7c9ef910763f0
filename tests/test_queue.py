"""The queue's state machine on the real database: claims, leases, completions, reaping."""

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from tests.conftest import spool_files
from tests.factories import make_task
from uploads import queue, services
from uploads.models import Outcome, Status, UploadAttempt, UploadTask

pytestmark = pytest.mark.django_db


def test_claim_takes_ready_tasks_once_and_records_an_attempt(user: Any) -> None:
    tasks = [make_task(user) for _ in range(3)]
    claims = queue.claim_tasks(worker_id="w1", limit=2)
    assert len(claims) == 2
    assert {c.task.pk for c in claims} <= {t.pk for t in tasks}
    for claim in claims:
        assert claim.task.status == Status.RUNNING
        assert claim.task.attempts == 1
        assert claim.task.worker_id == "w1"
        assert claim.task.lease_expires_at > timezone.now()
        assert claim.attempt.number == 1 and claim.attempt.outcome == Outcome.RUNNING
    rest = queue.claim_tasks(worker_id="w2", limit=10)
    assert len(rest) == 1
    assert queue.claim_tasks(worker_id="w3", limit=10) == []


def test_tasks_waiting_for_backoff_are_not_ready(user: Any) -> None:
    task = make_task(user)
    UploadTask.objects.filter(pk=task.pk).update(
        next_attempt_at=timezone.now() + timedelta(hours=1)
    )
    assert queue.claim_tasks(worker_id="w", limit=5) == []


def test_success_deletes_the_spool_file_and_finishes(user: Any, spool: Path) -> None:
    make_task(user)
    (claim,) = queue.claim_tasks(worker_id="w", limit=1)
    assert queue.complete_success(claim=claim) is True
    task = UploadTask.objects.get()
    assert task.status == Status.SUCCEEDED and task.finished_at is not None
    assert task.claim_token is None and task.lease_expires_at is None
    assert spool_files(spool) == []
    assert UploadAttempt.objects.get().outcome == Outcome.SUCCEEDED


def test_transient_failure_backs_off_then_fails_after_max_attempts(
    user: Any, settings: Any, spool: Path
) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "MAX_ATTEMPTS": 2, "RETRY_BASE_SECONDS": 30}
    make_task(user)
    (claim,) = queue.claim_tasks(worker_id="w", limit=1)
    assert queue.complete_failure(claim=claim, error="timeout", permanent=False) == Status.PENDING
    task = UploadTask.objects.get()
    assert task.last_error == "timeout"
    delay = (task.next_attempt_at - timezone.now()).total_seconds()
    assert 20 < delay <= 30
    UploadTask.objects.update(next_attempt_at=timezone.now())
    (claim,) = queue.claim_tasks(worker_id="w", limit=1)
    assert claim.task.attempts == 2
    assert (
        queue.complete_failure(claim=claim, error="timeout again", permanent=False) == Status.FAILED
    )
    task = UploadTask.objects.get()
    assert task.status == Status.FAILED
    assert [a.outcome for a in UploadAttempt.objects.order_by("number")] == [
        Outcome.RETRY,
        Outcome.FAILED,
    ]
    assert spool_files(spool) == [task.spool_name]  # kept for a manual retry


def test_permanent_failure_stops_at_once(user: Any) -> None:
    make_task(user)
    (claim,) = queue.claim_tasks(worker_id="w", limit=1)
    assert (
        queue.complete_failure(claim=claim, error="no such instance", permanent=True)
        == Status.FAILED
    )
    assert UploadTask.objects.get().attempts == 1


def test_backoff_grows_and_is_capped(settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "RETRY_BASE_SECONDS": 2, "RETRY_MAX_SECONDS": 60}
    ceilings = [max(queue.retry_delay(n) for _ in range(200)) for n in (1, 3, 10)]
    assert ceilings[0] <= 2 and 4 < ceilings[1] <= 8 and 30 < ceilings[2] <= 60
    assert min(queue.retry_delay(10) for _ in range(200)) >= 2


def test_a_worker_that_lost_its_lease_cannot_overwrite_the_newer_result(user: Any) -> None:
    make_task(user)
    (zombie,) = queue.claim_tasks(worker_id="zombie", limit=1)
    UploadTask.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert queue.reap_expired_leases() == 1
    (fresh,) = queue.claim_tasks(worker_id="fresh", limit=1)
    assert queue.complete_success(claim=fresh) is True
    # The zombie finishes late: neither success nor failure may touch the row.
    assert queue.complete_failure(claim=zombie, error="late", permanent=True) is None
    assert queue.complete_success(claim=zombie) is False
    task = UploadTask.objects.get()
    assert task.status == Status.SUCCEEDED and task.worker_id == "fresh"
    outcomes = dict(UploadAttempt.objects.values_list("worker_id", "outcome"))
    assert outcomes == {"zombie": Outcome.LOST, "fresh": Outcome.SUCCEEDED}


def test_reaper_fails_a_task_whose_last_attempt_was_lost(user: Any, settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "MAX_ATTEMPTS": 1}
    make_task(user)
    queue.claim_tasks(worker_id="w", limit=1)
    UploadTask.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    queue.reap_expired_leases()
    task = UploadTask.objects.get()
    assert task.status == Status.FAILED
    assert "lease expired" in task.last_error


def test_renewed_lease_is_not_reaped(user: Any) -> None:
    make_task(user)
    (claim,) = queue.claim_tasks(worker_id="w", limit=1)
    UploadTask.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert queue.renew_leases(tokens=[claim.token]) == 1
    assert queue.reap_expired_leases() == 0
    assert UploadTask.objects.get().status == Status.RUNNING


def test_released_claim_goes_back_without_costing_an_attempt(user: Any, settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "MAX_ATTEMPTS": 1}
    make_task(user)
    (claim,) = queue.claim_tasks(worker_id="w", limit=1)
    assert queue.release_claim(claim=claim) is True
    task = UploadTask.objects.get()
    assert task.status == Status.PENDING and task.max_attempts == 2
    assert UploadAttempt.objects.get().outcome == Outcome.INTERRUPTED
    (again,) = queue.claim_tasks(worker_id="w2", limit=1)
    assert again.task.attempts == 2


def test_cancel_refuses_a_running_task(user: Any) -> None:
    task = make_task(user)
    queue.claim_tasks(worker_id="w", limit=1)
    with pytest.raises(services.TaskStateError):
        services.upload_cancel(task=task)


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
            while batch := queue.claim_tasks(worker_id=f"t{n}", limit=3):
                mine.extend(str(c.task.pk) for c in batch)
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
