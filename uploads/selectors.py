"""Reads: which tasks a user may see, and how the queue stands."""

from datetime import datetime
from typing import Any, TypedDict

from django.db.models import Count, Min, QuerySet

from uploads.models import Status, UploadTask


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
