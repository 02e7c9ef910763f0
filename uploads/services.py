"""Writes: every state change of an upload task goes through here.

The API and the admin call these functions, so a retry from the admin and a retry from the API
are the same thing. What a worker does to a task is in uploads.queue.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import F
from django.db.models.functions import Greatest, Now

from uploads import queue, spool
from uploads.access import StaleAccess
from uploads.audit import audit
from uploads.conf import uploads_settings
from uploads.grants import normal_prefix, parse_owner
from uploads.models import (
    Grant,
    Status,
    UploadBatch,
    UploadTask,
)
from uploads.selectors import (
    OwnerGrants,
    batch_by_idempotency_key,
    body_kept,
    check_grants,
    count_pending_upload,
    is_glob,
    purgeable,
    task_by_idempotency_key,
    task_permission,
    unneeded_bodies,
)

logger = logging.getLogger(__name__)


class TaskStateError(Exception):
    """The task is not in a state that allows this change."""


class SpoolFileMissing(Exception):
    """The task's spool file is gone, so it can never be pushed again."""


class DuplicateUpload(Exception):
    """The owner already sent an upload with this idempotency key; `task` is that upload."""

    def __init__(self, task: UploadTask) -> None:
        super().__init__(f"idempotency key already used by upload {task.pk}")
        self.task = task


class DuplicateBatch(Exception):
    """The owner already sent a fan-out with this idempotency key; `batch` is that one."""

    def __init__(self, batch: UploadBatch) -> None:
        super().__init__(f"idempotency key already used by batch {batch.pk}")
        self.batch = batch


class NoMatchingInstance(Exception):
    """A glob matched no instance the owner may write this file to."""


class TooManyDestinations(Exception):
    """More destinations than UPLOADS['MAX_FANOUT']."""


class NotGranted(Exception):
    """No grant lets the task's owner write there (any more); `too_large` when only the size
    stands in the way."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.too_large = too_large


def upload_create(
    *,
    owner: User,
    spooled: spool.SpooledFile,
    instance: str,
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
    generation: int | None = None,
) -> UploadTask:
    """Queue a received body for delivery. The task row is the record of the accepted upload
    (owner, source address, time).

    With `generation` (the access generation the upload's token and grants were checked
    under, see uploads.access), the task is added only if it still holds: StaleAccess
    otherwise, and the body is kept for the caller to check again. With an idempotency key the
    owner already used (two resends racing past the API's own look-up), DuplicateUpload carries
    the task that got the key. On any other failure the spooled file is deleted.

    Nothing after the commit can fail the upload: a client never hears an error for an upload
    that was in fact queued (it would send it again and get it delivered twice).
    """
    task = UploadTask(
        owner=owner,
        instance=instance,
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
        body=spooled.data,
        idempotency_key=idempotency_key,
        max_attempts=uploads_settings.MAX_ATTEMPTS,
        source=source,
    )
    try:
        queue.enqueue(task, generation=generation)
    except StaleAccess:
        raise
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
    count_pending_upload()
    transaction.on_commit(queue.notify_workers, robust=True)
    logger.info(
        "task=%s accepted instance=%s/%s path=%s size=%d",
        task.pk,
        project,
        instance,
        path,
        spooled.size,
    )
    return task


def fanout_destinations(
    grants: OwnerGrants,
    *,
    requested: Sequence[str],
    list_instances: Callable[[], list[str]],
    remote: str,
    project: str,
    path: str,
    size: int | None,
    uid: int | None = None,
    gid: int | None = None,
) -> list[str]:
    """The instances a fan-out goes to: each name as given, each glob's matches in name order
    (among the instances `list_instances` gives, asked once and only for a glob), without
    repeats.

    A glob keeps the instances the grants let the owner write this file to, and leaves out
    the others; one that keeps none raises NoMatchingInstance. A named instance the grants
    refuse refuses the whole upload: NotGranted names every one (too_large when the size alone
    stands in the way). More than UPLOADS['MAX_FANOUT'] raises TooManyDestinations.
    """

    def allows(instance: str) -> Any:
        return check_grants(
            grants,
            remote=remote,
            project=project,
            instance=instance,
            path=path,
            size=size,
            uid=uid,
            gid=gid,
        )

    existing: list[str] | None = None
    chosen: dict[str, None] = {}
    refused: dict[str, Any] = {}
    for item in requested:
        if not is_glob(item):
            permission = allows(item)
            if permission.allowed:
                chosen[item] = None
            else:
                refused[item] = permission
            continue
        if existing is None:
            existing = list_instances()
        matches = [name for name in existing if fnmatchcase(name, item) and allows(name).allowed]
        if not matches:
            raise NoMatchingInstance(
                f"no instance you may write {path} to matches '{item}' in project "
                f"'{project}' on remote '{remote}'"
            )
        chosen.update(dict.fromkeys(matches))
    if refused:
        reasons = "; ".join(f"{name}: {p.reason}" for name, p in refused.items())
        raise NotGranted(
            f"refused for {', '.join(refused)} ({reasons}); nothing was queued",
            too_large=all(p.too_large for p in refused.values()),
        )
    limit = int(uploads_settings.MAX_FANOUT)
    if len(chosen) > limit:
        raise TooManyDestinations(
            f"{len(chosen)} destinations; one upload goes to at most {limit} instances"
        )
    return list(chosen)


def upload_fanout(
    *,
    owner: User,
    spooled: spool.SpooledFile,
    instances: Sequence[str],
    requested: str,
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
    generation: int | None = None,
) -> UploadBatch:
    """Queue one received body for delivery to several instances: a batch and one task per
    instance, added together or not at all, all referring to the one body.

    The body stays in the rows (a copy in each) only while the copies together fit in
    UPLOADS['INLINE_MAX_BYTES'], as one small upload would; a larger fan-out keeps it once in
    the spool, shared by every task, and deleted once every one of them succeeded (or by
    purge). `generation`, StaleAccess, DuplicateBatch and the clean-up on failure are as for
    upload_create.
    """
    stored_here = False
    if spooled.data is not None and len(spooled.data) * len(instances) > int(
        uploads_settings.INLINE_MAX_BYTES
    ):
        spooled, stored_here = spool.store(spooled.data), True
    batch = UploadBatch(
        owner=owner,
        requested=requested,
        count=len(instances),
        idempotency_key=idempotency_key,
    )
    tasks = [
        UploadTask(
            owner=owner,
            batch=batch,
            instance=instance,
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
            body=spooled.data,
            max_attempts=uploads_settings.MAX_ATTEMPTS,
            source=source,
        )
        for instance in instances
    ]
    try:
        queue.enqueue_batch(batch, tasks, generation=generation)
    except StaleAccess:
        if stored_here:  # the caller still holds the body, and may try again with it
            spool.remove(spooled.name)
        raise
    except IntegrityError:
        spool.remove(spooled.name)
        earlier = (
            batch_by_idempotency_key(owner=owner, key=idempotency_key) if idempotency_key else None
        )
        if earlier is None:
            raise
        raise DuplicateBatch(earlier) from None
    except BaseException:
        spool.remove(spooled.name)
        raise
    for _ in tasks:
        count_pending_upload()
    transaction.on_commit(queue.notify_workers, robust=True)
    logger.info(
        "batch=%s accepted instances=%s/%s (%d) path=%s size=%d",
        batch.pk,
        project,
        requested,
        len(tasks),
        path,
        spooled.size,
    )
    return batch


RETRY_CHANGES = ("create_dirs", "mode", "uid", "gid")


def upload_retry(
    *,
    task: UploadTask,
    actor: Any = None,
    source: str | None = None,
    via: str = "api",
    changes: dict[str, Any] | None = None,
) -> UploadTask:
    """Failed or cancelled → pending now, with at least one more attempt; history is kept.

    `changes` corrects how the file is to be written (create_dirs, mode, uid, gid; None clears
    mode, uid or gid): the upload failed for want of create_dirs, say, and need not be sent
    again. They are checked against the owner's grants like a new upload's. Audited either
    way: done (with the changes), or refused with the reason.
    """
    changes = {name: value for name, value in (changes or {}).items() if name in RETRY_CHANGES}
    try:
        for name, value in changes.items():
            setattr(task, name, value)
        _check_retryable(task)
        with transaction.atomic():
            updated = UploadTask.objects.filter(
                pk=task.pk, status__in=[Status.FAILED, Status.CANCELLED]
            ).update(
                status=Status.PENDING,
                next_attempt_at=Now(),
                finished_at=None,
                max_attempts=Greatest(F("max_attempts"), F("attempts") + 1),
                **changes,
            )
            if not updated:
                raise TaskStateError("the upload changed state meanwhile; reload it")
            audit(
                action="retry",
                outcome="done",
                user=actor,
                source=source,
                task_id=task.pk,
                via=via,
                **({"changes": changes} if changes else {}),
            )
            transaction.on_commit(queue.notify_workers, robust=True)
    except (TaskStateError, SpoolFileMissing, NotGranted) as exc:
        audit(
            action="retry",
            outcome="refused",
            user=actor,
            source=source,
            task_id=task.pk,
            via=via,
            reason=str(exc),
            **({"changes": changes} if changes else {}),
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
    if not body_kept(task):
        raise SpoolFileMissing("the uploaded file is no longer on the server; upload it again")
    permission = task_permission(task)
    if not permission.allowed:
        raise NotGranted(permission.reason, too_large=permission.too_large)


def upload_cancel(
    *, task: UploadTask, actor: Any = None, source: str | None = None, via: str = "api"
) -> UploadTask:
    """Pending → cancelled. The spool file stays until purge, so the upload can still be
    retried. Audited either way."""
    with transaction.atomic():
        updated = UploadTask.objects.filter(pk=task.pk, status=Status.PENDING).update(
            status=Status.CANCELLED, finished_at=Now()
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
    queue.announce_finished([task.pk])
    task.refresh_from_db()
    logger.info("task=%s cancelled", task.pk)
    return task


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
    """Delete finished tasks (with their attempts) in batches, and then the spool files of the
    tasks deleted that no remaining task may need.

    Succeeded tasks older than `succeeded_before`, failed and cancelled ones older than
    `failed_before`. Each batch is locked while it is deleted: a retry that comes first keeps
    its task (and its file); one that comes after finds the task gone. With `orphans_before`,
    spool files last modified before it that no task may still need go too (left by a crash
    between spooling and queueing, or after a success). `selectors.purge_plan` says what this
    would delete, deleting nothing.
    """
    deleted_tasks = deleted_files = 0
    old = purgeable(succeeded_before=succeeded_before, failed_before=failed_before)
    while True:
        with transaction.atomic():
            batch = list(
                UploadTask.objects.filter(old)
                .select_for_update(skip_locked=True)
                .values_list("pk", "spool_name")[:batch_size]
            )
            if not batch:
                break
            _, per_model = UploadTask.objects.filter(pk__in=[pk for pk, _ in batch]).delete()
        deleted_tasks += per_model.get(UploadTask._meta.label, 0)
        names = sorted({name for _, name in batch if name})
        deleted_files += sum(spool.remove(name) for name in unneeded_bodies(names))
    # A batch goes with its last task.
    UploadBatch.objects.filter(tasks__isnull=True).delete()
    if orphans_before is not None:
        chunk: list[str] = []
        for name in spool.names(modified_before=orphans_before.timestamp()):
            chunk.append(name)
            if len(chunk) == batch_size:
                deleted_files += sum(spool.remove(n) for n in unneeded_bodies(chunk))
                chunk = []
        deleted_files += sum(spool.remove(n) for n in unneeded_bodies(chunk))
    logger.info("purged %d task(s) and %d spool file(s)", deleted_tasks, deleted_files)
    return PurgeResult(tasks=deleted_tasks, spool_files=deleted_files)


# --- grants --------------------------------------------------------------------------------


GRANT_FIELDS = (
    "user",
    "group",
    "remote",
    "project",
    "instance_glob",
    "path_prefixes",
    "owners",
    "max_size",
)


def grant_create(
    *,
    actor: Any,
    source: str | None = None,
    user: Any = None,
    group: Any = None,
    instance_glob: str,
    project: str = "default",
    remote: str = "local",
    path_prefixes: list[str] | None = None,
    max_size: int | None = None,
    owners: list[str] | None = None,
) -> Grant:
    return grant_save(
        actor=actor,
        source=source,
        grant=Grant(
            user=user,
            group=group,
            instance_glob=instance_glob,
            project=project,
            remote=remote,
            path_prefixes=list(path_prefixes or []),
            max_size=max_size,
            owners=list(owners or []),
        ),
    )


def grant_save(*, actor: Any, grant: Grant, source: str | None = None) -> Grant:
    """Save a new grant, or the changes made to an existing one, and audit it: `created`, or
    `changed` with what it was and which fields changed. Directories and owners are normalised
    as the grant check compares them. An unchanged grant is not saved again and leaves no event.

    It takes the object itself so that the admin goes on with the one it saved.
    """
    grant.path_prefixes = list(dict.fromkeys(normal_prefix(p) for p in grant.path_prefixes))
    grant.owners = sorted({parse_owner(owner) for owner in grant.owners})
    with transaction.atomic():
        if grant.pk is None:
            grant.save()
            audit(
                action="grant",
                outcome="created",
                user=actor,
                source=source,
                grant=str(grant),
                grant_id=grant.pk,
            )
            return grant
        previous = Grant.objects.select_for_update().get(pk=grant.pk)
        attnames = {field.name: field.attname for field in Grant._meta.concrete_fields}
        changed = [
            name
            for name in GRANT_FIELDS
            if getattr(previous, attnames[name]) != getattr(grant, attnames[name])
        ]
        if not changed:
            return grant
        grant.save(update_fields=changed)
        audit(
            action="grant",
            outcome="changed",
            user=actor,
            source=source,
            grant=str(grant),
            grant_id=grant.pk,
            previous=str(previous),
            changed=changed,
        )
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
