"""The queue: every state change a worker makes to a task (claim, renew, complete, release,
reap), the worker heartbeat rows, and the wake-up that tells idle workers a task is ready.

Claims and completions are conditional UPDATEs whose row count decides, so two workers can
never both own or both finish a task.
"""

import logging
import os
import random
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from uploads import spool, wakeup
from uploads.audit import audit
from uploads.conf import uploads_settings
from uploads.models import Outcome, Status, UploadAttempt, UploadTask, WorkerHeartbeat

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "uploadsvc_ready"


def listen_for_work(
    *, wake: threading.Event, stopping: threading.Event, retry: float = 1.0
) -> None:
    """Set `wake` whenever a task may have become ready, until `stopping` is set: a NOTIFY on
    PostgreSQL (on a connection of its own), a ring on the wake-up pipe on SQLite."""
    if connection.vendor == "postgresql":
        _listen_postgresql(wake, stopping, retry)
    elif (pipe := wakeup.pipe_path()) is not None:
        _listen_pipe(pipe, wake, stopping)


def _listen_postgresql(wake: threading.Event, stopping: threading.Event, retry: float) -> None:
    import psycopg

    while not stopping.is_set():
        try:
            params = connection.get_connection_params()
            with psycopg.connect(**params, autocommit=True) as conn:
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                while not stopping.is_set():
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        wake.set()
        except Exception as exc:
            logger.warning("LISTEN connection failed (%s); polling meanwhile", exc)
            stopping.wait(retry * 5)


def _listen_pipe(pipe: Path, wake: threading.Event, stopping: threading.Event) -> None:
    try:
        bell = wakeup.Doorbell(pipe)
    except OSError as exc:
        logger.warning("no wake-up pipe at %s (%s); polling only", pipe, exc)
        return
    with bell:
        while not stopping.is_set():
            if bell.wait(timeout=1.0):
                wake.set()


def notify_workers() -> None:
    # On PostgreSQL a NOTIFY is delivered when the transaction commits, so workers listening
    # on the channel wake at once; on SQLite the wake-up pipe is rung once the commit is done.
    # Polling remains the path that guarantees progress.
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
    else:
        transaction.on_commit(wakeup.ring)


@dataclass(frozen=True)
class Claim:
    task: UploadTask
    token: uuid.UUID
    attempt: UploadAttempt


def retry_delay(attempt: int) -> float:
    """Capped exponential backoff with full jitter (Celery's and AWS's choice): a random delay in
    [base, min(cap, base·2^(attempt-1))]. Stored on the row as next_attempt_at; no thread sleeps."""
    base = uploads_settings.RETRY_BASE_SECONDS
    cap = uploads_settings.RETRY_MAX_SECONDS
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return random.uniform(min(base, ceiling), ceiling)  # noqa: S311


def claim_tasks(*, worker_id: str, limit: int) -> list[Claim]:
    """Take up to `limit` ready tasks for this worker, in one short transaction.

    PostgreSQL: the candidate rows are locked with SKIP LOCKED so concurrent workers pick
    disjoint sets. SQLite ignores row locks, but our connections BEGIN IMMEDIATE, so the whole
    transaction holds the database's write lock. Either way no one else can change the rows
    until the commit; the UPDATE still requires them to be pending, and claims all or none.
    """
    if limit <= 0:
        return []
    now = timezone.now()
    token = uuid.uuid4()
    lease = now + timedelta(seconds=uploads_settings.LEASE_SECONDS)
    with transaction.atomic():
        # The rows come whole, with their owners (the worker re-checks the owner's grants
        # before each push), locked until the commit: nothing can change them under us.
        tasks = list(
            UploadTask.objects.ready(now)
            .select_related("owner")
            .select_for_update(skip_locked=True, of=("self",))
            .order_by("next_attempt_at")[:limit]
        )
        if not tasks:
            return []
        claimed = {
            "status": Status.RUNNING,
            "claim_token": token,
            "lease_expires_at": lease,
            "worker_id": worker_id,
            "started_at": now,
        }
        updated = UploadTask.objects.filter(
            pk__in=[t.pk for t in tasks], status=Status.PENDING
        ).update(attempts=F("attempts") + 1, **claimed)
        if updated != len(tasks):  # cannot happen while the rows are locked; never half-claim
            raise RuntimeError(f"claimed {updated} of {len(tasks)} locked tasks; rolled back")
        for task in tasks:
            task.attempts += 1
            for name, value in claimed.items():
                setattr(task, name, value)
        attempts = UploadAttempt.objects.bulk_create(
            UploadAttempt(
                task=task,
                number=task.attempts,
                worker_id=worker_id,
                claim_token=token,
                started_at=now,
            )
            for task in tasks
        )
    return [Claim(task=t, token=token, attempt=a) for t, a in zip(tasks, attempts, strict=True)]


def renew_leases(*, tokens: list[uuid.UUID]) -> int:
    if not tokens:
        return 0
    lease = timezone.now() + timedelta(seconds=uploads_settings.LEASE_SECONDS)
    return UploadTask.objects.filter(status=Status.RUNNING, claim_token__in=tokens).update(
        lease_expires_at=lease
    )


def _finish_attempt(claim: Claim, outcome: str, error: str, now: datetime) -> None:
    UploadAttempt.objects.filter(pk=claim.attempt.pk).update(
        outcome=outcome, error=error, finished_at=now
    )


def _owned(claim: Claim) -> Any:
    return UploadTask.objects.filter(
        pk=claim.task.pk, status=Status.RUNNING, claim_token=claim.token
    )


def complete_success(*, claim: Claim) -> bool:
    """Record a delivered file and delete its spool copy. False if the claim was lost."""
    now = timezone.now()
    with transaction.atomic():
        updated = _owned(claim).update(
            status=Status.SUCCEEDED,
            finished_at=now,
            last_error="",
            claim_token=None,
            lease_expires_at=None,
        )
        if updated:
            _finish_attempt(claim, Outcome.SUCCEEDED, "", now)
    if updated:
        spool.remove(claim.task.spool_name)
    return bool(updated)


def complete_failure(
    *, claim: Claim, error: str, permanent: bool, refused: bool = False
) -> str | None:
    """Record a failed attempt: pending again after a backoff, or failed for good.

    Returns the new status, or None if the claim was lost (another worker owns the task now).
    The spool file is kept after a failure so a retry can run. `refused`: the push would have
    left the grant; an audit event records it with the failure.
    """
    now = timezone.now()
    task = claim.task
    final = permanent or task.attempts >= task.max_attempts
    with transaction.atomic():
        if final:
            updated = _owned(claim).update(
                status=Status.FAILED,
                finished_at=now,
                last_error=error,
                claim_token=None,
                lease_expires_at=None,
            )
        else:
            updated = _owned(claim).update(
                status=Status.PENDING,
                next_attempt_at=now + timedelta(seconds=retry_delay(task.attempts)),
                last_error=error,
                claim_token=None,
                lease_expires_at=None,
            )
        if not updated:
            return None
        _finish_attempt(claim, Outcome.FAILED if final else Outcome.RETRY, error, now)
        if refused:
            audit(
                action="push",
                outcome="refused",
                user=task.owner,
                task_id=task.pk,
                instance=f"{task.remote}:{task.project}/{task.instance}",
                path=task.path,
                reason=error,
            )
    if not final:
        notify_workers()
    return Status.FAILED if final else Status.PENDING


def release_claim(*, claim: Claim) -> bool:
    """Give a task back after a shutdown interrupted its push; the attempt is not held against
    the task (max_attempts grows if needed so it keeps at least one more attempt)."""
    now = timezone.now()
    with transaction.atomic():
        updated = _owned(claim).update(
            status=Status.PENDING,
            next_attempt_at=now,
            claim_token=None,
            lease_expires_at=None,
            max_attempts=Greatest(F("max_attempts"), F("attempts") + 1),
        )
        if updated:
            _finish_attempt(claim, Outcome.INTERRUPTED, "the worker shut down during the push", now)
    return bool(updated)


LOST_ERROR = "the worker pushing this file stopped answering (lease expired)"


def reap_expired_leases() -> int:
    """Requeue tasks whose worker died (lease expired); fail those out of attempts.

    Idempotent conditional UPDATEs: any number of workers may run it at once.
    """
    now = timezone.now()
    reaped = 0
    with transaction.atomic():
        expired = list(
            UploadTask.objects.expired_leases(now)
            .select_for_update(skip_locked=True)
            .values_list("pk", "claim_token", "attempts", "max_attempts")
        )
        for pk, token, attempts, max_attempts in expired:
            owned = UploadTask.objects.filter(pk=pk, status=Status.RUNNING, claim_token=token)
            if attempts >= max_attempts:
                n = owned.update(
                    status=Status.FAILED,
                    finished_at=now,
                    last_error=LOST_ERROR,
                    claim_token=None,
                    lease_expires_at=None,
                )
            else:
                n = owned.update(
                    status=Status.PENDING,
                    next_attempt_at=now,
                    last_error=LOST_ERROR,
                    claim_token=None,
                    lease_expires_at=None,
                )
            if n and token is not None:
                UploadAttempt.objects.filter(task_id=pk, claim_token=token).update(
                    outcome=Outcome.LOST, error=LOST_ERROR, finished_at=now
                )
                reaped += n
    if reaped:
        logger.warning("requeued %d task(s) whose worker lease expired", reaped)
    return reaped


def worker_beat(*, worker_id: str, threads: int, in_flight: int, processed: int) -> None:
    now = timezone.now()
    WorkerHeartbeat.objects.update_or_create(
        worker_id=worker_id,
        defaults={"last_seen_at": now, "in_flight": in_flight, "processed": processed},
        create_defaults={
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "threads": threads,
            "started_at": now,
            "last_seen_at": now,
        },
    )


def worker_gone(*, worker_id: str) -> None:
    WorkerHeartbeat.objects.filter(worker_id=worker_id).delete()
