"""The task the reference runs: nothing (the queue's own work is what is measured)."""

try:
    from django.tasks import task
except ImportError:  # Django < 6: the django-tasks package
    from django_tasks import task  # type: ignore[no-redef]


@task()
def noop() -> None:
    return None
