"""`python -m bench.djtasks enqueue --count N | summary`, with DJANGO_SETTINGS_MODULE set to
bench.djtasks.settings: empty the table and enqueue N no-op tasks (before the clock starts), or
print the counts by status and the first start / last finish (epoch seconds) as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import django


def enqueue(count: int) -> dict[str, Any]:
    from django.db import transaction
    from django_tasks_db.models import DBTaskResult

    from bench.djtasks.tasks import noop

    DBTaskResult.objects.all().delete()
    with transaction.atomic():
        for _ in range(count):
            noop.enqueue()
    return {"enqueued": count}


def summary() -> dict[str, Any]:
    from django.db.models import Count, Max, Min
    from django_tasks_db.models import DBTaskResult

    counts = {
        str(row["status"]): row["n"]
        for row in DBTaskResult.objects.values("status").annotate(n=Count("pk")).order_by()
    }
    bounds = DBTaskResult.objects.aggregate(first=Min("started_at"), last=Max("finished_at"))
    return {
        "counts": counts,
        "first_started": bounds["first"].timestamp() if bounds["first"] else None,
        "last_finished": bounds["last"].timestamp() if bounds["last"] else None,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.djtasks")
    sub = parser.add_subparsers(dest="command", required=True)
    fill = sub.add_parser("enqueue")
    fill.add_argument("--count", type=int, required=True)
    sub.add_parser("summary")
    args = parser.parse_args(argv)
    django.setup()
    out = enqueue(args.count) if args.command == "enqueue" else summary()
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
