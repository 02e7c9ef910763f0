"""Reads: which tasks a user may see, and how the queue stands."""

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, NamedTuple, TypedDict

from django.contrib.auth.models import User
from django.db.models import Count, F, Min, Q, QuerySet

from uploads import spool
from uploads.grants import describe_owners, normal_prefix, owners_allow, path_below
from uploads.models import FINISHED, Grant, Status, UploadBatch, UploadTask, WorkerHeartbeat


def may_see_all_tasks(user: Any) -> bool:
    """Staff with the view permission see everyone's uploads, as in the admin; superusers too."""
    return bool(user.is_superuser or (user.is_staff and user.has_perm("uploads.view_uploadtask")))


def may_change_task(user: Any, task: UploadTask) -> bool:
    """Users retry and cancel their own uploads; staff with the change permission anyone's."""
    if task.owner_id == user.pk or user.is_superuser:
        return True
    return bool(user.is_staff and user.has_perm("uploads.change_uploadtask"))


def body_kept(task: UploadTask) -> bool:
    """Whether the uploaded bytes are still here (in the row, or in the spool), so that the
    upload can be pushed (again)."""
    if task.spool_name:
        return spool.exists(task.spool_name)
    return UploadTask.objects.filter(pk=task.pk, body__isnull=False).exists()


def visible_tasks(*, user: Any) -> QuerySet[UploadTask]:
    """A user sees their own tasks; staff see what their model permissions let them. Bodies
    kept in the rows are not loaded."""
    tasks = UploadTask.objects.defer("body")
    if not may_see_all_tasks(user):
        tasks = tasks.filter(owner=user)
    return tasks


def task_list(
    *,
    user: Any,
    status: str | None = None,
    container: str | None = None,
    batch: Any = None,
) -> QuerySet[UploadTask]:
    tasks = visible_tasks(user=user)
    if status:
        tasks = tasks.filter(status=status)
    if container:
        tasks = tasks.filter(instance=container)
    if batch:
        tasks = tasks.filter(batch=batch)
    return tasks.order_by("-created_at")


def visible_batches(*, user: Any) -> QuerySet[UploadBatch]:
    """As for tasks: a user sees their own batches; staff what their permissions let them."""
    batches = UploadBatch.objects.all()
    if not may_see_all_tasks(user):
        batches = batches.filter(owner=user)
    return batches


def batch_tasks(batch: UploadBatch) -> QuerySet[UploadTask]:
    """A batch's tasks in the order of its destinations (instance names); no bodies."""
    return UploadTask.objects.filter(batch=batch).defer("body").order_by("instance", "pk")


def unfinished_tasks(task_ids: Iterable[Any]) -> list[Any]:
    """Those of these tasks that are not finished."""
    return list(
        UploadTask.objects.filter(pk__in=list(task_ids))
        .exclude(status__in=FINISHED)
        .values_list("pk", flat=True)
    )


def batch_by_idempotency_key(*, owner: Any, key: str) -> UploadBatch | None:
    return UploadBatch.objects.filter(owner=owner, idempotency_key=key).first()


GLOB_CHARACTERS = frozenset("*?[")


def is_glob(name: str) -> bool:
    """Whether an instance name is a pattern (fnmatch's `*`, `?` and `[...]`)."""
    return not GLOB_CHARACTERS.isdisjoint(name)


def unneeded_bodies(names: list[str], *, leaving: Q | None = None) -> list[str]:
    """The spool names no task may still need: every task using it succeeded, or none is left.
    Failed and cancelled tasks keep theirs, since they can be retried. Tasks that match
    `leaving` count as gone already (a purge about to delete them)."""
    if not names:
        return []
    using = UploadTask.objects.filter(spool_name__in=names).exclude(status=Status.SUCCEEDED)
    if leaving is not None:
        using = using.exclude(leaving)
    needed = set(using.values_list("spool_name", flat=True))
    return [name for name in names if name not in needed]


# --- housekeeping --------------------------------------------------------------------------


def purgeable(*, succeeded_before: datetime, failed_before: datetime) -> Q:
    """The finished tasks a purge deletes: succeeded ones that finished before
    `succeeded_before`, failed and cancelled ones before `failed_before`."""
    return Q(status=Status.SUCCEEDED, finished_at__lt=succeeded_before) | Q(
        status__in=[Status.FAILED, Status.CANCELLED], finished_at__lt=failed_before
    )


class PurgeableTask(NamedTuple):
    id: uuid.UUID
    status: str
    finished_at: datetime | None
    project: str
    instance: str
    path: str


@dataclass(frozen=True)
class PurgePlan:
    """What a purge would delete: tasks, oldest first, and spool file names."""

    tasks: list[PurgeableTask]
    spool_names: list[str]


def purge_plan(
    *,
    succeeded_before: datetime,
    failed_before: datetime,
    orphans_before: datetime | None = None,
    batch_size: int = 500,
) -> PurgePlan:
    """What `services.purge_finished` with the same arguments would delete now, deleting
    nothing: the purgeable tasks, and the spool files that no task left after them may need
    (theirs, and with `orphans_before` the files last modified before it that no task
    references)."""
    old = purgeable(succeeded_before=succeeded_before, failed_before=failed_before)
    tasks: list[PurgeableTask] = []
    names: dict[str, None] = {}
    rows = (
        UploadTask.objects.filter(old)
        .order_by("finished_at", "pk")
        .values_list("pk", "status", "finished_at", "project", "instance", "path", "spool_name")
    )
    for pk, status, finished_at, project, instance, path, name in rows.iterator(batch_size):
        tasks.append(PurgeableTask(pk, status, finished_at, project, instance, path))
        if name:
            names[name] = None
    # Listed by the spool: there now, finished or not (a partial file, an incomplete multipart
    # upload), unlike a task's name, whose body may be gone already.
    listed: set[str] = set()
    if orphans_before is not None:
        listed.update(spool.names(modified_before=orphans_before.timestamp()))
        names.update(dict.fromkeys(listed))
    candidates = list(names)
    spool_names = [
        name
        for start in range(0, len(candidates), batch_size)
        for name in unneeded_bodies(candidates[start : start + batch_size], leaving=old)
        if name in listed or spool.exists(name)
    ]
    return PurgePlan(tasks=tasks, spool_names=spool_names)


def pending_count() -> int:
    return UploadTask.objects.pending().count()


_pending: tuple[int, float] | None = None
PENDING_COUNT_MAX_AGE = 1.0


def pending_count_recent() -> int:
    """The number of pending tasks, counted at most once a second per process and kept up to
    date with this process's own uploads in between: uploads check it against
    UPLOADS['MAX_PENDING'], a soft limit, and counting on each would cost a scan of the queue
    per upload."""
    global _pending
    now = time.monotonic()
    if _pending is None or now - _pending[1] > PENDING_COUNT_MAX_AGE:
        _pending = (pending_count(), now)
    return _pending[0]


def count_pending_upload() -> None:
    """This process queued a task: the recent count includes it."""
    global _pending
    if _pending is not None:
        _pending = (_pending[0] + 1, _pending[1])


def forget_pending_count() -> None:
    global _pending
    _pending = None


class QueueSummary(TypedDict):
    counts: dict[str, int]
    oldest_pending_at: datetime | None
    waiting_for_retry: int


def task_by_idempotency_key(*, owner: Any, key: str) -> UploadTask | None:
    return UploadTask.objects.filter(owner=owner, idempotency_key=key).first()


def queue_summary() -> QueueSummary:
    counts = dict.fromkeys(Status.values, 0)
    for row in UploadTask.objects.values("status").annotate(n=Count("pk")).order_by():
        counts[row["status"]] = row["n"]
    pending = UploadTask.objects.pending()
    return {
        "counts": counts,
        "oldest_pending_at": pending.aggregate(oldest=Min("created_at"))["oldest"],
        "waiting_for_retry": pending.filter(attempts__gt=0).count(),
    }


# --- grants --------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadPermission:
    allowed: bool
    reason: str = ""
    # Refused only for the file's size (the rest would be allowed).
    too_large: bool = False
    # The granted directories the file must really land in (after the instance's symlinks),
    # or None when the user may write anywhere in the instance (a superuser, or a grant
    # without path prefixes).
    confined_to: tuple[str, ...] | None = None


# What a grant says, as the permission check compares it: (remote, project glob, instance glob,
# path prefixes, owners, max size).
GrantRow = tuple[str, str, str, list[str], list[str], int | None]
GRANT_COLUMNS = ("remote", "project", "instance_glob", "path_prefixes", "owners", "max_size")


@dataclass(frozen=True)
class OwnerGrants:
    """Everything the permission check needs to know about one user."""

    is_superuser: bool
    grants: tuple[GrantRow, ...]


def user_grants(*, user: Any) -> QuerySet[Grant]:
    """The grants a user holds, directly or through a group (one row per way it is held)."""
    return Grant.objects.filter(Q(user=user) | Q(group__user=user))


def grant_list(*, user: Any = None, group: Any = None) -> QuerySet[Grant]:
    """Every grant, or those a user holds (directly or through a group), or a group's: users'
    grants first, then groups', each by name, remote, project and instance glob."""
    grants = Grant.objects.select_related("user", "group")
    if user is not None:
        grants = grants.filter(Q(user=user) | Q(group__user=user))
    elif group is not None:
        grants = grants.filter(group=group)
    return grants.order_by(
        F("user__username").asc(nulls_last=True),
        F("group__name").asc(nulls_last=True),
        "remote",
        "project",
        "instance_glob",
        "pk",
    )


def owner_grants(owner_ids: Iterable[int]) -> dict[int, OwnerGrants]:
    """The grants of several users at once, for a worker re-checking a batch of claims."""
    ids = set(owner_ids)
    rows: dict[int, list[GrantRow]] = {pk: [] for pk in ids}
    held = Grant.objects.filter(Q(user__in=ids) | Q(group__user__in=ids))
    for user_id, member_id, *grant in held.values_list("user", "group__user", *GRANT_COLUMNS):
        holder = user_id if user_id in ids else member_id
        rows.setdefault(holder, []).append(tuple(grant))
    superusers = set(
        User.objects.filter(pk__in=ids, is_superuser=True).values_list("pk", flat=True)
    )
    return {pk: OwnerGrants(pk in superusers, tuple(rows.get(pk, ()))) for pk in ids}


def upload_permission(
    *,
    user: Any,
    remote: str,
    project: str,
    instance: str,
    path: str,
    size: int | None,
    uid: int | None = None,
    gid: int | None = None,
) -> UploadPermission:
    """May this user write `path` in this instance, with this owner? One query that fetches
    only the columns the check compares (none for a superuser)."""
    grants: tuple[GrantRow, ...] = ()
    if not user.is_superuser:
        grants = tuple(user_grants(user=user).filter(remote=remote).values_list(*GRANT_COLUMNS))
    return check_grants(
        OwnerGrants(user.is_superuser, grants),
        remote=remote,
        project=project,
        instance=instance,
        path=path,
        size=size,
        uid=uid,
        gid=gid,
    )


def check_grants(
    owner: OwnerGrants,
    *,
    remote: str,
    project: str,
    instance: str,
    path: str,
    size: int | None,
    uid: int | None = None,
    gid: int | None = None,
) -> UploadPermission:
    """Whether these grants let their holder write `path` in this instance, with this owner.
    Superusers may push anywhere.

    A grant allows a path strictly inside one of its directories (never the directory itself),
    the owners it names, and files up to its size. `size` is None when unknown (a chunked
    body): the limit is then checked again once the body is in.
    """
    if owner.is_superuser:
        return UploadPermission(allowed=True)
    target = f"{instance}' in project '{project}' on remote '{remote}"
    matching = [
        (prefixes, owners, max_size)
        for grant_remote, glob_project, glob_instance, prefixes, owners, max_size in owner.grants
        if grant_remote == remote
        and fnmatchcase(project, glob_project)
        and fnmatchcase(instance, glob_instance)
    ]
    if not matching:
        return UploadPermission(False, f"you have no grant for instance '{target}'")
    on_path = [
        grant
        for grant in matching
        if not grant[0] or any(path_below(path, prefix) for prefix in grant[0])
    ]
    if not on_path:
        granted = sorted({normal_prefix(p) for prefixes, _, _ in matching for p in prefixes})
        if path in granted:
            return UploadPermission(
                False,
                f"{path} is a directory granted to you in '{instance}', not a file: "
                "name a file inside it",
            )
        return UploadPermission(
            False,
            f"{path} is outside the directories granted in '{instance}': {', '.join(granted)}",
        )
    as_owner = [grant for grant in on_path if owners_allow(grant[1], uid, gid)]
    if not as_owner:
        asked = " and ".join(
            f"{name} {value}" for name, value in (("uid", uid), ("gid", gid)) if value is not None
        )
        allowed = describe_owners(named for _, owners, _ in on_path for named in owners)
        return UploadPermission(
            False,
            f"your grants for {path} in '{instance}' do not allow {asked}; owners allowed: "
            f"{allowed}",
        )
    fitting = [grant for grant in as_owner if size is None or grant[2] is None or size <= grant[2]]
    if not fitting:
        largest = max(max_size or 0 for _, _, max_size in as_owner)
        return UploadPermission(
            False,
            f"the file is {size} bytes; your grant for '{instance}' allows at most {largest}",
            too_large=True,
        )
    if any(not prefixes for prefixes, _, _ in fitting):
        return UploadPermission(True)
    # Every directory of a grant that allows this owner and size: a symlink from one granted
    # directory into another stays inside what the user may write anyway.
    roots = sorted({normal_prefix(p) for prefixes, _, _ in fitting for p in prefixes})
    return UploadPermission(True, confined_to=tuple(roots))


def task_permission(task: UploadTask) -> UploadPermission:
    return upload_permission(
        user=task.owner,
        remote=task.remote,
        project=task.project,
        instance=task.instance,
        path=task.path,
        size=task.size,
        uid=task.uid,
        gid=task.gid,
    )


def worker_heartbeats() -> QuerySet[WorkerHeartbeat]:
    return WorkerHeartbeat.objects.all()
