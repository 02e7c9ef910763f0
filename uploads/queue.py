"""The queue: every state change a worker makes to a task (claim, renew, complete, release,
reap), the worker heartbeat rows, and the wake-up that tells idle workers a task is ready.

- A claim is one task, one random token and one attempt row. Every later write about it is
  conditional on `status = 'running' AND claim_token = <token>`, so a worker whose claim was
  reaped can never overwrite what the new owner does.
- Every time is the database's (its clock in the statements): leases, readiness and backoff
  never depend on a worker host's clock.
- On PostgreSQL each operation is one statement (claim: a locked, materialised pick, the
  update and the attempt rows together; completion of a whole batch: the tasks and their
  attempts together). SQLite runs the same operations through the ORM inside one IMMEDIATE
  transaction, which holds the database's write lock.
- A spool file is deleted only once no task that may still need it refers to it: every task
  using it succeeded (failed and cancelled ones can be retried; purge removes those).
"""

import dataclasses
import functools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Greatest, Now

from uploads import spool, wakeup
from uploads.access import StaleAccess, current_generation
from uploads.audit import audit
from uploads.conf import uploads_settings
from uploads.models import (
    FINISHED,
    AccessGeneration,
    Outcome,
    Status,
    UploadAttempt,
    UploadBatch,
    UploadTask,
    WorkerHeartbeat,
)
from uploads.selectors import unneeded_bodies
from uploads.waiting import FINISHED_CHANNEL

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "uploadsvc_ready"
LOST_ERROR = "the worker pushing this file stopped answering (lease expired)"
INTERRUPTED_ERROR = "the worker shut down during the push"

TASKS = UploadTask._meta.db_table
BATCHES = UploadBatch._meta.db_table
ATTEMPTS = UploadAttempt._meta.db_table


# --- what a worker holds ---------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a claimed task asks for: the destination, the body and its attempt count."""

    id: uuid.UUID
    owner_id: int
    remote: str
    project: str
    instance: str
    path: str
    mode: int | None
    uid: int | None
    gid: int | None
    create_dirs: bool
    size: int
    spool_name: str
    # The body itself when it travels in the row (small uploads), else None: in the spool.
    body: bytes | None
    attempts: int
    max_attempts: int


@dataclass(eq=False)
class Claim:
    """A task this worker holds, with the lease it holds it by."""

    task: Job
    token: uuid.UUID
    attempt_id: int
    # When the lease was last renewed, on this process's monotonic clock, taken before the
    # statement was sent: the lease runs at least LEASE_SECONDS from then.
    renewed_at: float = field(default_factory=time.monotonic)
    # The database did not renew it (another worker reaped it), or this worker let it go.
    revoked: threading.Event = field(default_factory=threading.Event)
    # The access generation when it was claimed: grants read since then still hold.
    generation: int = 0

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID]:
        return (self.task.id, self.token)

    def held(self) -> bool:
        """Whether the push may still publish its file: the claim is ours, and its lease has
        a safety margin left (a push ends with one rename, sent after this check)."""
        if self.revoked.is_set():
            return False
        lease = float(uploads_settings.LEASE_SECONDS)
        return time.monotonic() < self.renewed_at + lease * 0.8


class Result:
    SUCCEEDED = "succeeded"
    TRANSIENT = "transient"  # retried after a backoff while attempts remain
    PERMANENT = "permanent"  # failed at once
    REFUSED = "refused"  # failed at once and audited: the push would have left its grant
    RELEASED = "released"  # interrupted by shutdown: pending again, the attempt not held against it


@dataclass(frozen=True)
class Completion:
    claim: Claim
    result: str
    error: str = ""


def retry_delay(attempt: int) -> float:
    """Capped exponential backoff with jitter: a random delay between the base and
    min(cap, base·2^(attempt-1)). Stored on the row as next_attempt_at; no thread sleeps."""
    base = uploads_settings.RETRY_BASE_SECONDS
    cap = uploads_settings.RETRY_MAX_SECONDS
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return random.uniform(min(base, ceiling), ceiling)  # noqa: S311


def _lease() -> timedelta:
    return timedelta(seconds=float(uploads_settings.LEASE_SECONDS))


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _postgresql() -> bool:
    return connection.vendor == "postgresql"


# --- enqueue ---------------------------------------------------------------------------------

ENQUEUED_COLUMNS = (
    "id",
    "owner_id",
    "remote",
    "project",
    "instance",
    "path",
    "filename",
    "size",
    "sha256",
    "mode",
    "uid",
    "gid",
    "create_dirs",
    "spool_name",
    "body",
    "idempotency_key",
    "max_attempts",
    "source",
)


@functools.cache
def _enqueue_sql() -> str:
    """PostgreSQL: the task's values, each cast to its column's type (an INSERT ... SELECT
    infers nothing from the target), added only while the access generation holds."""
    values = []
    for column in ENQUEUED_COLUMNS:
        db_type = UploadTask._meta.get_field(column.removesuffix("_id")).db_type(connection)
        cast = "text" if str(db_type).startswith("varchar") else db_type
        values.append(f"%({column})s::{cast}")
    generations = AccessGeneration._meta.db_table
    return f"""
INSERT INTO {TASKS} ({", ".join(ENQUEUED_COLUMNS)}, status, attempts, last_error, worker_id,
                     next_attempt_at, created_at)
SELECT {", ".join(values)}, 'pending', 0, '', '', statement_timestamp(), statement_timestamp()
WHERE (SELECT value FROM {generations} WHERE id = %(singleton)s) = %(generation)s
RETURNING created_at
"""  # noqa: S608


def enqueue(task: UploadTask, *, generation: int | None = None) -> None:
    """Insert a new task, ready now. With `generation`, only if the access generation it was
    checked under still holds (uploads.access); StaleAccess otherwise, and nothing is added.

    On PostgreSQL with a generation this is the single statement an accepted upload costs;
    otherwise a transaction of its own (a SQLite transaction holds the write lock throughout).
    """
    if generation is not None and _postgresql():
        values = {column: getattr(task, column) for column in ENQUEUED_COLUMNS}
        values.update(singleton=AccessGeneration.SINGLETON, generation=generation)
        with connection.cursor() as cursor:
            cursor.execute(_enqueue_sql(), values)
            row = cursor.fetchone()
        if row is None:
            raise StaleAccess()
        task.created_at = task.next_attempt_at = row[0]
        task._state.adding = False
        task._state.db = connection.alias
        return
    with transaction.atomic():
        if generation is not None and current_generation() != generation:
            raise StaleAccess()
        task.save(force_insert=True)


# The columns a batch's tasks share (they differ in id and instance); their idempotency key is
# the batch's.
SHARED_COLUMNS = tuple(
    c for c in ENQUEUED_COLUMNS if c not in ("id", "instance", "idempotency_key")
)
BATCH_COLUMNS = ("id", "owner_id", "requested", "count", "idempotency_key")


def _cast(model: Any, column: str) -> str:
    db_type = str(model._meta.get_field(column.removesuffix("_id")).db_type(connection))
    return "text" if db_type.startswith("varchar") else db_type


@functools.cache
def _enqueue_batch_sql() -> str:
    """PostgreSQL: the batch and its tasks in one statement, added only while the access
    generation holds (the tasks are inserted from the batch's RETURNING, so neither is added
    without the other). The shared values, the body among them, are sent once."""
    batch_values = ", ".join(f"%(b_{c})s::{_cast(UploadBatch, c)}" for c in BATCH_COLUMNS)
    shared = ", ".join(f"%({c})s::{_cast(UploadTask, c)}" for c in SHARED_COLUMNS)
    generations = AccessGeneration._meta.db_table
    return f"""
WITH batch AS (
    INSERT INTO {BATCHES} ({", ".join(BATCH_COLUMNS)}, created_at)
    SELECT {batch_values}, statement_timestamp()
    WHERE (SELECT value FROM {generations} WHERE id = %(singleton)s) = %(generation)s
    RETURNING id, created_at
), tasks AS (
    INSERT INTO {TASKS} (id, instance, idempotency_key, batch_id, {", ".join(SHARED_COLUMNS)},
                         status, attempts, last_error, worker_id, next_attempt_at, created_at)
    SELECT d.id, d.instance, '', batch.id, {shared},
           'pending', 0, '', '', batch.created_at, batch.created_at
    FROM batch, unnest(%(ids)s::uuid[], %(instances)s::text[]) AS d(id, instance)
)
SELECT created_at FROM batch
"""  # noqa: S608


def enqueue_batch(
    batch: UploadBatch, tasks: Sequence[UploadTask], *, generation: int | None = None
) -> None:
    """Insert a batch and its tasks (which share every value but id and instance), all or
    none, ready now; with `generation` as for enqueue. On PostgreSQL with a generation one
    statement, else one transaction."""
    if generation is not None and _postgresql():
        first = tasks[0]
        values: dict[str, Any] = {c: getattr(first, c) for c in SHARED_COLUMNS}
        values.update({f"b_{c}": getattr(batch, c) for c in BATCH_COLUMNS})
        values.update(
            ids=[task.id for task in tasks],
            instances=[task.instance for task in tasks],
            singleton=AccessGeneration.SINGLETON,
            generation=generation,
        )
        with connection.cursor() as cursor:
            cursor.execute(_enqueue_batch_sql(), values)
            row = cursor.fetchone()
        if row is None:
            raise StaleAccess()
        batch.created_at = row[0]
        for obj in (batch, *tasks):
            obj._state.adding = False
            obj._state.db = connection.alias
        for task in tasks:
            task.created_at = task.next_attempt_at = row[0]
        return
    with transaction.atomic():
        if generation is not None and current_generation() != generation:
            raise StaleAccess()
        batch.save(force_insert=True)
        UploadTask.objects.bulk_create(tasks)  # the database's defaults come back


# --- claim -----------------------------------------------------------------------------------

JOB_COLUMNS = (
    "id",
    "owner_id",
    "remote",
    "project",
    "instance",
    "path",
    "mode",
    "uid",
    "gid",
    "create_dirs",
    "size",
    "spool_name",
    "body",
    "attempts",
    "max_attempts",
)

# Table and column names come from the models, values are parameters.
CLAIM_SQL = f"""
WITH picked AS MATERIALIZED (
    SELECT id FROM {TASKS}
    WHERE status = 'pending' AND next_attempt_at <= statement_timestamp()
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {TASKS} t
    SET status = 'running', attempts = t.attempts + 1, claim_token = gen_random_uuid(),
        lease_expires_at = statement_timestamp() + %(lease)s * interval '1 second',
        worker_id = %(worker)s, started_at = statement_timestamp()
    FROM picked WHERE t.id = picked.id
    RETURNING {", ".join(f"t.{c}" for c in JOB_COLUMNS)}, t.claim_token, t.started_at
), attempts AS (
    INSERT INTO {ATTEMPTS} (task_id, number, worker_id, claim_token, started_at, outcome, error)
    SELECT id, attempts, %(worker)s, claim_token, started_at, 'running', '' FROM claimed
    RETURNING id, task_id
)
SELECT {", ".join(f"c.{c}" for c in JOB_COLUMNS)},
       (SELECT value FROM {AccessGeneration._meta.db_table} WHERE id = %(singleton)s),
       c.claim_token, a.id
FROM claimed c JOIN attempts a ON a.task_id = c.id
"""  # noqa: S608


def _job(row: Sequence[Any]) -> Job:
    job = Job(*row)
    if job.body is not None and not isinstance(job.body, bytes):
        job = dataclasses.replace(job, body=bytes(job.body))  # a memoryview from some drivers
    return job


def claim(*, worker_id: str, limit: int) -> list[Claim]:
    """Take up to `limit` ready tasks for this worker: each gets a token, a lease and an
    attempt row. Concurrent workers take disjoint sets."""
    if limit <= 0:
        return []
    started = time.monotonic()
    if _postgresql():
        with connection.cursor() as cursor:
            lease = float(uploads_settings.LEASE_SECONDS)
            cursor.execute(
                CLAIM_SQL,
                {
                    "limit": limit,
                    "lease": lease,
                    "worker": worker_id,
                    "singleton": AccessGeneration.SINGLETON,
                },
            )
            rows = cursor.fetchall()
        return [
            Claim(
                task=_job(row[: len(JOB_COLUMNS)]),
                token=row[-2],
                attempt_id=row[-1],
                renewed_at=started,
                generation=row[-3] or 0,
            )
            for row in rows
        ]
    return _claim_orm(worker_id, limit, started)


def _claim_orm(worker_id: str, limit: int, started: float) -> list[Claim]:
    claims = []
    with transaction.atomic():
        # SQLite: the IMMEDIATE transaction holds the write lock until the commit.
        generation = current_generation()
        ready = UploadTask.objects.filter(status=Status.PENDING, next_attempt_at__lte=Now())
        for pk in ready.order_by("next_attempt_at").values_list("pk", flat=True)[:limit]:
            token = uuid.uuid4()
            UploadTask.objects.filter(pk=pk, status=Status.PENDING).update(
                status=Status.RUNNING,
                attempts=F("attempts") + 1,
                claim_token=token,
                lease_expires_at=Now() + _lease(),
                worker_id=worker_id,
                started_at=Now(),
            )
            row = UploadTask.objects.filter(pk=pk).values_list(*JOB_COLUMNS, "started_at").get()
            attempt = UploadAttempt.objects.create(
                task_id=pk,
                number=row[JOB_COLUMNS.index("attempts")],
                worker_id=worker_id,
                claim_token=token,
                started_at=row[-1],
            )
            claims.append(
                Claim(
                    task=_job(row[:-1]),
                    token=token,
                    attempt_id=attempt.pk,
                    renewed_at=started,
                    generation=generation,
                )
            )
    return claims


# --- leases ----------------------------------------------------------------------------------


RENEW_SQL = f"""
UPDATE {TASKS} t
SET lease_expires_at = statement_timestamp() + %(lease)s * interval '1 second'
FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) AS held(id, token)
WHERE t.id = held.id AND t.claim_token = held.token AND t.status = 'running'
RETURNING t.id, t.claim_token
"""  # noqa: S608

REAP_SQL = f"""
WITH expired AS MATERIALIZED (
    SELECT id, claim_token FROM {TASKS}
    WHERE status = 'running' AND lease_expires_at < statement_timestamp()
      AND (id, claim_token) NOT IN (
          SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[])
      )
    FOR UPDATE SKIP LOCKED
), reaped AS (
    UPDATE {TASKS} t SET
        status = CASE WHEN t.attempts >= t.max_attempts THEN 'failed' ELSE 'pending' END,
        finished_at = CASE WHEN t.attempts >= t.max_attempts THEN statement_timestamp() END,
        next_attempt_at = statement_timestamp(),
        last_error = %(error)s,
        claim_token = NULL,
        lease_expires_at = NULL
    FROM expired WHERE t.id = expired.id
    RETURNING t.id, expired.claim_token AS token
), attempts AS (
    UPDATE {ATTEMPTS} a SET outcome = 'lost', error = %(error)s,
        finished_at = statement_timestamp()
    FROM reaped WHERE a.task_id = reaped.id AND a.claim_token = reaped.token
)
SELECT count(*) FROM reaped
"""  # noqa: S608


def renew(claims: Sequence[Claim]) -> list[Claim]:
    """Extend the leases of these claims; returns those the database no longer holds for us
    (their task was reaped and maybe claimed again), each marked revoked.

    On PostgreSQL one statement, and so no lock outlives it: a worker paused right after never
    keeps others from reaping what it held.
    """
    if not claims:
        return []
    started = time.monotonic()
    by_key = {c.key: c for c in claims}
    if _postgresql():
        with connection.cursor() as cursor:
            cursor.execute(
                RENEW_SQL,
                {
                    "lease": float(uploads_settings.LEASE_SECONDS),
                    "ids": [task_id for task_id, _ in by_key],
                    "tokens": [token for _, token in by_key],
                },
            )
            renewed = {(_uuid(pk), _uuid(token)) for pk, token in cursor.fetchall()}
    else:
        owned = Q()
        for task_id, token in by_key:
            owned |= Q(pk=task_id, claim_token=token)
        with transaction.atomic():
            rows = UploadTask.objects.filter(owned, status=Status.RUNNING)
            renewed = {
                (_uuid(pk), _uuid(token)) for pk, token in rows.values_list("pk", "claim_token")
            }
            rows.update(lease_expires_at=Now() + _lease())
    lost = []
    for key, held in by_key.items():
        if key in renewed:
            held.renewed_at = started
        else:
            held.revoked.set()
            lost.append(held)
    return lost


def reap(*, holding: Iterable[tuple[uuid.UUID, uuid.UUID]] = ()) -> int:
    """Requeue tasks whose lease expired (their worker died or stalled), or fail those out of
    attempts. Claims the calling worker still holds are never reaped: it is still pushing them
    and will stop on its own if it cannot renew them. Safe to run from any number of workers;
    on PostgreSQL one statement, holding no lock beyond it."""
    holding = list(holding)
    if _postgresql():
        with connection.cursor() as cursor:
            cursor.execute(
                REAP_SQL,
                {
                    "ids": [task_id for task_id, _ in holding],
                    "tokens": [token for _, token in holding],
                    "error": LOST_ERROR,
                },
            )
            reaped = int(cursor.fetchone()[0])
    else:
        reaped = _reap_orm(holding)
    if reaped:
        logger.warning("requeued %d task(s) whose worker lease expired", reaped)
    return reaped


def _reap_orm(holding: list[tuple[uuid.UUID, uuid.UUID]]) -> int:
    held = Q()
    for task_id, token in holding:
        held |= Q(pk=task_id, claim_token=token)
    reaped = 0
    with transaction.atomic():
        expired = UploadTask.objects.filter(status=Status.RUNNING, lease_expires_at__lt=Now())
        if held:
            expired = expired.exclude(held)
        for pk, lost_token in expired.values_list("pk", "claim_token"):
            owned = UploadTask.objects.filter(pk=pk, status=Status.RUNNING, claim_token=lost_token)
            out_of_attempts = Q(attempts__gte=F("max_attempts"))
            updated = owned.update(
                status=Case(
                    When(out_of_attempts, then=Value(Status.FAILED)), default=Value(Status.PENDING)
                ),
                finished_at=Case(When(out_of_attempts, then=Now()), default=None),
                next_attempt_at=Now(),
                last_error=LOST_ERROR,
                claim_token=None,
                lease_expires_at=None,
            )
            if updated and lost_token is not None:
                UploadAttempt.objects.filter(task_id=pk, claim_token=lost_token).update(
                    outcome=Outcome.LOST, error=LOST_ERROR, finished_at=Now()
                )
                reaped += 1
    return reaped


# --- completions -------------------------------------------------------------------------------


COMPLETE_SQL = f"""
WITH done AS (
    SELECT * FROM unnest(
        %(ids)s::uuid[], %(tokens)s::uuid[], %(attempts)s::bigint[], %(results)s::text[],
        %(errors)s::text[], %(delays)s::float8[]
    ) AS d(id, token, attempt_id, result, error, delay)
), tasks AS (
    UPDATE {TASKS} t SET
        status = CASE
            WHEN d.result = 'succeeded' THEN 'succeeded'
            WHEN d.result = 'released' THEN 'pending'
            WHEN d.result = 'transient' AND t.attempts < t.max_attempts THEN 'pending'
            ELSE 'failed' END,
        finished_at = CASE
            WHEN d.result = 'released' THEN NULL
            WHEN d.result = 'transient' AND t.attempts < t.max_attempts THEN NULL
            ELSE statement_timestamp() END,
        next_attempt_at = CASE
            WHEN d.result = 'released' THEN statement_timestamp()
            WHEN d.result = 'transient' AND t.attempts < t.max_attempts
                THEN statement_timestamp() + d.delay * interval '1 second'
            ELSE t.next_attempt_at END,
        last_error = CASE
            WHEN d.result = 'succeeded' THEN ''
            WHEN d.result = 'released' THEN t.last_error
            ELSE d.error END,
        max_attempts = CASE
            WHEN d.result = 'released' THEN GREATEST(t.max_attempts, t.attempts + 1)
            ELSE t.max_attempts END,
        body = CASE WHEN d.result = 'succeeded' THEN NULL ELSE t.body END,
        claim_token = NULL,
        lease_expires_at = NULL
    FROM done d
    WHERE t.id = d.id AND t.status = 'running' AND t.claim_token = d.token
    RETURNING t.id, t.status, t.spool_name
), attempts AS (
    UPDATE {ATTEMPTS} a SET
        outcome = CASE
            WHEN d.result = 'succeeded' THEN 'succeeded'
            WHEN d.result = 'released' THEN 'interrupted'
            WHEN tasks.status = 'pending' THEN 'retry'
            ELSE 'failed' END,
        error = CASE WHEN d.result = 'released' THEN %(interrupted)s ELSE d.error END,
        finished_at = statement_timestamp()
    FROM done d JOIN tasks ON tasks.id = d.id
    WHERE a.id = d.attempt_id
)
SELECT tasks.id, tasks.status,
       tasks.status = 'succeeded' AND tasks.spool_name <> '' AND NOT EXISTS (
           SELECT 1 FROM {TASKS} other
           WHERE other.spool_name = tasks.spool_name AND other.status <> 'succeeded'
             AND other.id NOT IN (SELECT id FROM tasks WHERE status = 'succeeded')
       ),
       tasks.spool_name
FROM tasks
"""  # noqa: S608


def complete(completions: Sequence[Completion]) -> dict[Claim, str | None]:
    """Record how pushes ended: each task's new status, or None where the claim was lost
    (another worker owns the task now and nothing was written).

    Succeeded tasks free their spool file once nothing else may need it; refused pushes are
    audited with their failure. On PostgreSQL a batch is one statement (tasks, attempts and
    which files nobody needs any more together); refused ones, rare, go through the ORM.
    """
    if not completions:
        return {}
    statuses: dict[Claim, str | None] = {}
    freed: list[str] = []
    one_by_one = list(completions)
    if _postgresql():
        one_by_one = [done for done in completions if done.result == Result.REFUSED]
        batch = [done for done in completions if done.result != Result.REFUSED]
        by_id = {done.claim.task.id: done.claim for done in batch}
        statuses.update(dict.fromkeys(by_id.values()))
        shared: list[str] = []
        for task_id, new_status, free, name in _complete_batch(batch):
            statuses[by_id[_uuid(task_id)]] = new_status
            if free:
                freed.append(name)
            elif new_status == Status.SUCCEEDED and name:
                shared.append(name)
        # A body shared by a fan-out's tasks: a worker completing the last sibling at the same
        # moment saw this one as still running, and this statement saw it so too. Asked again
        # now, after this commit, the later of the two sees both successes.
        freed.extend(unneeded_bodies(sorted(set(shared))))
    if one_by_one:
        with transaction.atomic():
            for done in one_by_one:
                status = _complete_one(done)
                statuses[done.claim] = status
                if status == Status.SUCCEEDED and done.claim.task.spool_name:
                    freed.append(done.claim.task.spool_name)
        freed = unneeded_bodies(freed)
    # After the commit: a body nobody else needs goes; a retried sibling keeps it.
    for name in freed:
        spool.remove(name)
    if any(done.result == Result.RELEASED for done in completions):
        notify_workers()  # ready again at once
    announce_finished(c.task.id for c, status in statuses.items() if status in FINISHED)
    return statuses


def _complete_batch(batch: Sequence[Completion]) -> list[tuple[Any, str, bool, str]]:
    if not batch:
        return []
    params: dict[str, Any] = {
        "ids": [done.claim.task.id for done in batch],
        "tokens": [done.claim.token for done in batch],
        "attempts": [done.claim.attempt_id for done in batch],
        "results": [done.result for done in batch],
        "errors": [done.error for done in batch],
        "delays": [
            retry_delay(done.claim.task.attempts) if done.result == Result.TRANSIENT else 0.0
            for done in batch
        ],
        "interrupted": INTERRUPTED_ERROR,
    }
    with connection.cursor() as cursor:
        cursor.execute(COMPLETE_SQL, params)
        return list(cursor.fetchall())


def _complete_one(done: Completion) -> str | None:
    claim, task = done.claim, done.claim.task
    owned = UploadTask.objects.filter(pk=task.id, status=Status.RUNNING, claim_token=claim.token)
    finished = {"claim_token": None, "lease_expires_at": None}
    if done.result == Result.SUCCEEDED:
        status, outcome = Status.SUCCEEDED, Outcome.SUCCEEDED
        updated = owned.update(
            status=status, finished_at=Now(), last_error="", body=None, **finished
        )
    elif done.result == Result.RELEASED:
        status, outcome = Status.PENDING, Outcome.INTERRUPTED
        updated = owned.update(
            status=status,
            next_attempt_at=Now(),
            max_attempts=Greatest(F("max_attempts"), F("attempts") + 1),
            **finished,
        )
    else:
        final = done.result != Result.TRANSIENT or task.attempts >= task.max_attempts
        if final:
            status, outcome = Status.FAILED, Outcome.FAILED
            updated = owned.update(
                status=status, finished_at=Now(), last_error=done.error, **finished
            )
        else:
            status, outcome = Status.PENDING, Outcome.RETRY
            delay = timedelta(seconds=retry_delay(task.attempts))
            updated = owned.update(
                status=status,
                next_attempt_at=Now() + delay,
                last_error=done.error,
                **finished,
            )
    if not updated:
        return None
    error = INTERRUPTED_ERROR if done.result == Result.RELEASED else done.error
    UploadAttempt.objects.filter(pk=claim.attempt_id).update(
        outcome=outcome, error=error, finished_at=Now()
    )
    if done.result == Result.REFUSED:
        audit(
            action="push",
            outcome="refused",
            user=get_user_model().objects.get(pk=task.owner_id),
            task_id=task.id,
            instance=f"{task.remote}:{task.project}/{task.instance}",
            path=task.path,
            reason=done.error,
        )
    return status


# --- heartbeat rows --------------------------------------------------------------------------


def worker_beat(*, worker_id: str, threads: int, in_flight: int, processed: int) -> None:
    updated = WorkerHeartbeat.objects.filter(worker_id=worker_id).update(
        last_seen_at=Now(), in_flight=in_flight, processed=processed
    )
    if not updated:
        WorkerHeartbeat.objects.create(
            worker_id=worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            threads=threads,
            in_flight=in_flight,
            processed=processed,
        )


def worker_gone(*, worker_id: str) -> None:
    WorkerHeartbeat.objects.filter(worker_id=worker_id).delete()


# --- wake-ups --------------------------------------------------------------------------------


def notify_workers() -> None:
    """Wake idle workers: a task became ready. Best effort and never raises (a worker polls
    anyway): call it after the commit that made the task ready, never inside it."""
    try:
        if _postgresql():
            _notifier.ring()
        else:
            wakeup.ring()
    except Exception:
        logger.warning("could not wake the workers; they find the task at their next poll")


def announce_finished(task_ids: Iterable[uuid.UUID]) -> None:
    """Tell requests waiting for these tasks (uploads.waiting) that they finished. PostgreSQL:
    a NOTIFY with their ids, sent like the wake-ups; SQLite's waiters poll. Never raises."""
    ids = [str(task_id) for task_id in task_ids]
    if not ids:
        return
    try:
        if _postgresql():
            _notifier.ring(finished=ids)
    except Exception:
        logger.warning("could not announce finished uploads; waiting clients find out later")


class _Notifier:
    """Sends NOTIFY from a thread and a connection of its own, at most once every `interval`
    seconds however many uploads ask: a notifying transaction holds a database-wide lock through
    its commit, so it must stay out of the uploads' own transactions and be rare. Finished task
    ids gathered meanwhile go in the same round, on FINISHED_CHANNEL."""

    interval = 0.005
    idle = 1.0  # close the connection after this long without a ring
    payload_ids = 200  # a NOTIFY payload stays under 8000 bytes

    def __init__(self) -> None:
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = False
        self._finished: list[str] = []

    def ring(self, finished: Sequence[str] = ()) -> None:
        with self._lock:
            if finished:
                self._finished.extend(finished)
            else:
                self._ready = True
            self._wanted.set()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
                self._thread.start()

    def _take(self) -> tuple[bool, list[str]]:
        with self._lock:
            ready, finished = self._ready, self._finished
            self._ready, self._finished = False, []
            return ready, finished

    def _send(self, conn: Any) -> None:
        ready, finished = self._take()
        if ready:
            conn.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
        for start in range(0, len(finished), self.payload_ids):
            payload = ",".join(finished[start : start + self.payload_ids])
            conn.execute("SELECT pg_notify(%s, %s)", [FINISHED_CHANNEL, payload])

    def _run(self) -> None:
        import psycopg

        conn = None
        try:
            while self._wanted.wait(timeout=self.idle):
                self._wanted.clear()
                try:
                    if conn is None:
                        params = connection.get_connection_params()
                        conn = psycopg.connect(**params, autocommit=True)
                    self._send(conn)
                except Exception as exc:
                    logger.warning("NOTIFY failed (%s); workers will poll", exc)
                    if conn is not None:
                        conn.close()
                    conn = None
                time.sleep(self.interval)
        finally:
            if conn is not None:
                conn.close()

    def stop(self) -> None:
        """Wait until the thread has closed its connection (it does after `idle` seconds)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


_notifier = _Notifier()


def stop_notifier() -> None:
    """Wait until the NOTIFY thread has closed its connection (it does when idle)."""
    _notifier.stop()


def listen_for_work(
    *, wake: threading.Event, stopping: threading.Event, retry: float = 1.0
) -> None:
    """Set `wake` whenever a task may have become ready, until `stopping` is set: a NOTIFY on
    PostgreSQL (on a connection of its own), a ring on the wake-up pipe on SQLite."""
    if _postgresql():
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
