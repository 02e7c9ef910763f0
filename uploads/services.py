"""Writes: every state change of an upload task goes through here.

The API, the admin and the worker all call these functions, so a retry from the admin and a
retry from the API are the same thing. Claims and completions are conditional UPDATEs whose row
count decides, so two workers can never both own or both finish a task.
"""

import json
import logging
import os
import random
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest
from django.utils import timezone

from uploads import spool, wakeup
from uploads.conf import uploads_settings
from uploads.grants import parse_owner
from uploads.models import (
    FINISHED,
    AuditEvent,
    Grant,
    Outcome,
    Status,
    UploadAttempt,
    UploadTask,
    WorkerHeartbeat,
)
from uploads.selectors import task_by_idempotency_key, task_permission

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "uploadsvc_ready"


class TaskStateError(Exception):
    """The task is not in a state that allows this change."""


class SpoolFileMissing(Exception):
    """The task's spool file is gone, so it can never be pushed again."""


class DuplicateUpload(Exception):
    """The owner already sent an upload with this idempotency key; `task` is that upload."""

    def __init__(self, task: UploadTask) -> None:
        super().__init__(f"idempotency key already used by upload {task.pk}")
        self.task = task


class NotGranted(Exception):
    """No grant lets the task's owner write there (any more)."""


audit_logger = logging.getLogger("uploads.audit")


def audit(
    *,
    action: str,
    outcome: str,
    user: Any = None,
    source: str | None = None,
    task_id: uuid.UUID | str | None = None,
    **detail: Any,
) -> AuditEvent:
    """Record who did what, from where, and how it ended: a row and a structured log line."""
    user = user if getattr(user, "is_authenticated", False) else None
    event = AuditEvent.objects.create(
        user=user,
        username=user.get_username() if user else "",
        action=action,
        outcome=outcome,
        source=source,
        task_id=task_id,
        detail=detail,
    )
    audit_logger.info(
        "audit %s",
        json.dumps(
            {
                "action": action,
                "outcome": outcome,
                "user": event.username or None,
                "source": source,
                "task": str(task_id) if task_id else None,
                **detail,
            },
            default=str,
            sort_keys=True,
        ),
    )
    return event


def _notify_workers() -> None:
    # On PostgreSQL a NOTIFY is delivered when the transaction commits, so workers listening
    # on the channel wake at once; on SQLite the wake-up pipe is rung once the commit is done.
    # Polling remains the path that guarantees progress.
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
    else:
        transaction.on_commit(wakeup.ring)


def upload_create(
    *,
    owner: User,
    spooled: spool.SpooledFile,
    container: str,
    path: str,
    project: str = "default",
    remote: str = "local",
    filename: str = "",
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    create_dirs: bool = False,
    idempotency_key: str = "",
    source: str | None = None,
) -> UploadTask:
    """Queue a spooled file for delivery. On any failure the spool file is deleted.

    With an idempotency key the owner already used (two resends racing past the API's own
    look-up), DuplicateUpload carries the task that got the key.

    The task, its audit record and the wake-up commit together: once this returns nothing
    else touches the database, so a client never hears an error for an upload that was
    in fact queued (it would send it again and get it delivered twice).
    """
    try:
        with transaction.atomic():
            task = UploadTask.objects.create(
                owner=owner,
                instance=container,
                project=project,
                remote=remote,
                path=path,
                filename=filename,
                size=spooled.size,
                sha256=spooled.sha256,
                mode=mode,
                uid=uid,
                gid=gid,
                create_dirs=create_dirs,
                spool_name=spooled.name,
                idempotency_key=idempotency_key,
                max_attempts=uploads_settings.MAX_ATTEMPTS,
            )
            audit(
                action="upload",
                outcome="accepted",
                user=owner,
                source=source,
                task_id=task.pk,
                instance=f"{remote}:{project}/{container}",
                path=path,
                size=spooled.size,
            )
            _notify_workers()
    except IntegrityError:
        spool.remove(spooled.name)
        earlier = (
            task_by_idempotency_key(owner=owner, key=idempotency_key) if idempotency_key else None
        )
        if earlier is None:
            raise
        raise DuplicateUpload(earlier) from None
    except BaseException:
        spool.remove(spooled.name)
        raise
    logger.info(
        "task=%s accepted instance=%s/%s path=%s size=%d",
        task.pk,
        project,
        container,
        path,
        spooled.size,
    )
    return task


def upload_retry(
    *, task: UploadTask, actor: Any = None, source: str | None = None, via: str = "api"
) -> UploadTask:
    """Failed or cancelled → pending now, with at least one more attempt; history is kept.

    Audited either way: done, or refused with the reason.
    """
    try:
        _check_retryable(task)
        with transaction.atomic():
            updated = UploadTask.objects.filter(
                pk=task.pk, status__in=[Status.FAILED, Status.CANCELLED]
            ).update(
                status=Status.PENDING,
                next_attempt_at=timezone.now(),
                finished_at=None,
                max_attempts=Greatest(F("max_attempts"), F("attempts") + 1),
            )
            if not updated:
                raise TaskStateError("the upload changed state meanwhile; reload it")
            audit(
                action="retry", outcome="done", user=actor, source=source, task_id=task.pk, via=via
            )
            _notify_workers()
    except (TaskStateError, SpoolFileMissing, NotGranted) as exc:
        audit(
            action="retry",
            outcome="refused",
            user=actor,
            source=source,
            task_id=task.pk,
            via=via,
            reason=str(exc),
        )
        raise
    task.refresh_from_db()
    logger.info("task=%s retried by hand", task.pk)
    return task


def _check_retryable(task: UploadTask) -> None:
    if task.status not in (Status.FAILED, Status.CANCELLED):
        raise TaskStateError(
            f"only failed or cancelled uploads can be retried (this one is {task.status})"
        )
    if not spool.exists(task.spool_name):
        raise SpoolFileMissing("the uploaded file is no longer on the server; upload it again")
    permission = task_permission(task)
    if not permission.allowed:
        raise NotGranted(permission.reason)


def upload_cancel(
    *, task: UploadTask, actor: Any = None, source: str | None = None, via: str = "api"
) -> UploadTask:
    """Pending → cancelled, and the spool file is removed. Audited either way."""
    with transaction.atomic():
        updated = UploadTask.objects.filter(pk=task.pk, status=Status.PENDING).update(
            status=Status.CANCELLED, finished_at=timezone.now()
        )
        if updated:
            audit(
                action="cancel", outcome="done", user=actor, source=source, task_id=task.pk, via=via
            )
    if not updated:
        task.refresh_from_db(fields=["status"])
        reason = f"only pending uploads can be cancelled (this one is {task.status})"
        audit(
            action="cancel",
            outcome="refused",
            user=actor,
            source=source,
            task_id=task.pk,
            via=via,
            reason=reason,
        )
        raise TaskStateError(reason)
    spool.remove(task.spool_name)
    task.refresh_from_db()
    logger.info("task=%s cancelled", task.pk)
    return task


# --- the worker's side ---------------------------------------------------------------------


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
        _notify_workers()
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


# --- housekeeping --------------------------------------------------------------------------


@dataclass(frozen=True)
class PurgeResult:
    tasks: int
    spool_files: int


def purge_finished(
    *,
    succeeded_before: datetime,
    failed_before: datetime,
    batch_size: int = 500,
    orphans_before: datetime | None = None,
) -> PurgeResult:
    """Delete finished tasks (with their attempts and spool files) in batches.

    Succeeded tasks older than `succeeded_before`, failed and cancelled ones older than
    `failed_before`. With `orphans_before`, spool files that no task references and that were
    last modified before it (left by a crash between spooling and queueing) go too.
    """
    deleted_tasks = 0
    deleted_files = 0
    old = UploadTask.objects.filter(
        Q(status=Status.SUCCEEDED, finished_at__lt=succeeded_before)
        | Q(status__in=[Status.FAILED, Status.CANCELLED], finished_at__lt=failed_before)
    )
    while batch := list(old.values_list("pk", "spool_name")[:batch_size]):
        with transaction.atomic():
            _, per_model = UploadTask.objects.filter(
                pk__in=[pk for pk, _ in batch], status__in=FINISHED
            ).delete()
        deleted_tasks += per_model.get(UploadTask._meta.label, 0)
        deleted_files += sum(spool.remove(name) for _, name in batch)
    if orphans_before is not None:
        cutoff = orphans_before.timestamp()
        for path in spool.spool_dir().iterdir():
            name = path.name.removesuffix(spool.PART_SUFFIX)
            if path.stat().st_mtime >= cutoff:
                continue
            if not UploadTask.objects.filter(spool_name=name).exclude(status__in=FINISHED).exists():
                path.unlink(missing_ok=True)
                deleted_files += 1
    logger.info("purged %d task(s) and %d spool file(s)", deleted_tasks, deleted_files)
    return PurgeResult(tasks=deleted_tasks, spool_files=deleted_files)


# --- grants --------------------------------------------------------------------------------


def grant_create(
    *,
    actor: Any,
    user: Any = None,
    group: Any = None,
    instance_glob: str,
    project: str = "default",
    remote: str = "local",
    path_prefixes: list[str] | None = None,
    max_size: int | None = None,
    owners: list[str] | None = None,
) -> Grant:
    grant = Grant.objects.create(
        user=user,
        group=group,
        instance_glob=instance_glob,
        project=project,
        remote=remote,
        path_prefixes=["/" + p.strip("/") for p in path_prefixes or []],
        max_size=max_size,
        owners=sorted({parse_owner(owner) for owner in owners or []}),
    )
    audit(action="grant", outcome="created", user=actor, grant=str(grant), grant_id=grant.pk)
    return grant


def grant_revoke(*, actor: Any, grants: Any, source: str | None = None) -> int:
    count = 0
    for grant in list(grants):
        description, pk = str(grant), grant.pk
        grant.delete()
        audit(
            action="grant",
            outcome="revoked",
            user=actor,
            source=source,
            grant=description,
            grant_id=pk,
        )
        count += 1
    return count
