"""Reads: which tasks a user may see, and how the queue stands."""

from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, TypedDict

from django.db.models import Count, Min, Q, QuerySet

from uploads.models import Grant, Status, UploadTask, WorkerHeartbeat


def visible_tasks(*, user: Any) -> QuerySet[UploadTask]:
    """A user sees their own tasks; staff see all."""
    tasks = UploadTask.objects.all()
    if not user.is_staff:
        tasks = tasks.filter(owner=user)
    return tasks


def task_list(
    *, user: Any, status: str | None = None, container: str | None = None
) -> QuerySet[UploadTask]:
    tasks = visible_tasks(user=user)
    if status:
        tasks = tasks.filter(status=status)
    if container:
        tasks = tasks.filter(instance=container)
    return tasks.order_by("-created_at")


def pending_count() -> int:
    return UploadTask.objects.pending().count()


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


def path_within(path: str, prefix: str) -> bool:
    """Whether a normalised absolute path lies in a directory, respecting boundaries:
    /srv/app holds /srv/app/x but not /srv/application/x."""
    prefix = "/" + prefix.strip("/")
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True)
class UploadPermission:
    allowed: bool
    status: int = 200
    reason: str = ""


def user_grants(*, user: Any) -> QuerySet[Grant]:
    """The grants a user holds, directly or through a group (one row per way it is held)."""
    return Grant.objects.filter(Q(user=user) | Q(group__user=user))


def upload_permission(
    *, user: Any, remote: str, project: str, instance: str, path: str, size: int | None
) -> UploadPermission:
    """May this user write `path` in this instance? Superusers may push anywhere.

    `size` is None when unknown (a chunked body): the size limit is then checked again once
    the body is in. Asked on every upload and before every push, so it is one query that
    fetches only the columns it compares.
    """
    if user.is_superuser:
        return UploadPermission(allowed=True)
    target = f"{instance}' in project '{project}' on remote '{remote}"
    matching = [
        (prefixes, max_size)
        for glob_project, glob_instance, prefixes, max_size in user_grants(user=user)
        .filter(remote=remote)
        .values_list("project", "instance_glob", "path_prefixes", "max_size")
        if fnmatchcase(project, glob_project) and fnmatchcase(instance, glob_instance)
    ]
    if not matching:
        return UploadPermission(False, 403, f"you have no grant for instance '{target}'")
    on_path = [
        max_size
        for prefixes, max_size in matching
        if not prefixes or any(path_within(path, p) for p in prefixes)
    ]
    if not on_path:
        allowed = sorted({p for prefixes, _ in matching for p in prefixes})
        return UploadPermission(
            False,
            403,
            f"{path} is outside the directories granted in '{instance}': {', '.join(allowed)}",
        )
    if size is None or any(limit is None or size <= limit for limit in on_path):
        return UploadPermission(True)
    largest = max(limit or 0 for limit in on_path)
    return UploadPermission(
        False,
        413,
        f"the file is {size} bytes; your grant for '{instance}' allows at most {largest}",
    )


def task_permission(task: UploadTask) -> UploadPermission:
    return upload_permission(
        user=task.owner,
        remote=task.remote,
        project=task.project,
        instance=task.instance,
        path=task.path,
        size=task.size,
    )


def worker_heartbeats() -> QuerySet[WorkerHeartbeat]:
    return WorkerHeartbeat.objects.all()
