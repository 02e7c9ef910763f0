"""Database chores of the benchmarks, run as `python -m bench.dbtool COMMAND` in a subprocess
with the service's environment (DATABASE_URL, UPLOADS_SPOOL_DIR), so one benchmark run can use
several databases. Each command prints JSON on stdout.

- `setup`: a plain user `bench` with a grant on every instance and an API token.
- `reset`: delete every task, attempt, audit event and worker heartbeat.
- `prefill --count N --instance NAME --dir DIR --size BYTES`: N pending tasks, each with its own
  spool file, written with the ORM in batches.
- `summary [--tasks]`: counts by status, attempts recorded, and the first claim / last completion
  times (epoch seconds); with --tasks one row per task.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import uuid
from datetime import datetime
from typing import Any

import django


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def setup() -> dict[str, Any]:
    from django.contrib.auth.models import User
    from rest_framework.authtoken.models import Token

    from uploads.models import Grant

    user, _ = User.objects.get_or_create(username="bench")
    if not Grant.objects.filter(user=user).exists():
        Grant.objects.create(user=user, instance_glob="*", project="*")
    token, _ = Token.objects.get_or_create(user=user)
    return {"token": token.key, "user_id": user.pk}


def reset() -> dict[str, Any]:
    from uploads.models import AuditEvent, UploadAttempt, UploadTask, WorkerHeartbeat

    counts = {
        "attempts": UploadAttempt.objects.all().delete()[0],
        "tasks": UploadTask.objects.all().delete()[0],
        "audit": AuditEvent.objects.all().delete()[0],
        "heartbeats": WorkerHeartbeat.objects.all().delete()[0],
    }
    return counts


def prefill(*, count: int, instance: str, directory: str, size: int) -> dict[str, Any]:
    from django.contrib.auth.models import User
    from django.db import transaction

    from uploads.conf import uploads_settings
    from uploads.models import UploadTask
    from uploads.spool import spool_dir

    owner = User.objects.get(username="bench")
    content = os.urandom(size)
    digest = hashlib.sha256(content).hexdigest()
    spool = spool_dir()
    batch: list[UploadTask] = []
    created = 0
    for n in range(count):
        name = uuid.uuid4().hex
        (spool / name).write_bytes(content)
        batch.append(
            UploadTask(
                owner=owner,
                instance=instance,
                path=f"{directory}/q-{n:06d}",
                size=size,
                sha256=digest,
                spool_name=name,
                max_attempts=uploads_settings.MAX_ATTEMPTS,
            )
        )
        if len(batch) == 2000 or n == count - 1:
            with transaction.atomic():
                UploadTask.objects.bulk_create(batch)
            created += len(batch)
            batch = []
    return {"created": created}


def summary(*, tasks: bool) -> dict[str, Any]:
    from django.db.models import Count, Max, Min

    from uploads.models import UploadAttempt, UploadTask

    counts = {
        row["status"]: row["n"]
        for row in UploadTask.objects.values("status").annotate(n=Count("pk")).order_by()
    }
    bounds = UploadTask.objects.aggregate(
        first_created=Min("created_at"),
        first_started=Min("started_at"),
        last_finished=Max("finished_at"),
    )
    errors = (
        UploadTask.objects.exclude(last_error="")
        .values("last_error")
        .annotate(n=Count("pk"))
        .order_by("-n")[:5]
    )
    result: dict[str, Any] = {
        "counts": counts,
        "attempts": UploadAttempt.objects.count(),
        "errors": {row["last_error"]: row["n"] for row in errors},
        **{key: _epoch(value) for key, value in bounds.items()},
    }
    if tasks:
        attempts: dict[Any, tuple[datetime, datetime | None]] = {}
        for attempt in UploadAttempt.objects.order_by("number").only(
            "task_id", "started_at", "finished_at"
        ):
            attempts.setdefault(attempt.task_id, (attempt.started_at, attempt.finished_at))
        result["tasks"] = [
            {
                "id": str(task.pk),
                "status": task.status,
                "attempts": task.attempts,
                "created": _epoch(task.created_at),
                "started": _epoch(task.started_at),
                "finished": _epoch(task.finished_at),
                "attempt_started": _epoch(attempts.get(task.pk, (None, None))[0]),
                "attempt_finished": _epoch(attempts.get(task.pk, (None, None))[1]),
                "last_error": task.last_error,
            }
            for task in UploadTask.objects.order_by("created_at")
        ]
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dbtool")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup")
    sub.add_parser("reset")
    fill = sub.add_parser("prefill")
    fill.add_argument("--count", type=int, required=True)
    fill.add_argument("--instance", required=True)
    fill.add_argument("--dir", required=True)
    fill.add_argument("--size", type=int, default=1024)
    show = sub.add_parser("summary")
    show.add_argument("--tasks", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "uploadsvc.settings")
    django.setup()
    if args.command == "setup":
        out = setup()
    elif args.command == "reset":
        out = reset()
    elif args.command == "prefill":
        out = prefill(count=args.count, instance=args.instance, directory=args.dir, size=args.size)
    else:
        out = summary(tasks=args.tasks)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
