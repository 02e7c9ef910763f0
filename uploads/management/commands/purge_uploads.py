"""`manage.py purge_uploads`: delete old finished uploads and their spool files, in batches."""

import argparse
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand
from django.utils import timezone

from uploads import selectors, services


def non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


class Command(BaseCommand):
    help = "Delete finished uploads older than a retention period, and their spool files."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            type=non_negative_float,
            default=14.0,
            metavar="DAYS",
            help="retention for succeeded uploads, in days (14)",
        )
        parser.add_argument(
            "--failed-older-than",
            type=non_negative_float,
            default=None,
            metavar="DAYS",
            help="retention for failed and cancelled uploads (default: twice --older-than)",
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=500,
            metavar="N",
            help="uploads deleted per transaction (500)",
        )
        parser.add_argument(
            "--orphans-older-than",
            type=non_negative_float,
            default=1.0,
            metavar="DAYS",
            help="also delete spool files no live task references, older than this (1)",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="say what would be deleted and delete nothing (-v 2 lists it)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        days = options["older_than"]
        failed_days = options["failed_older_than"]
        if failed_days is None:
            failed_days = days * 2
        cutoffs = {
            "succeeded_before": now - timedelta(days=days),
            "failed_before": now - timedelta(days=failed_days),
            "orphans_before": now - timedelta(days=options["orphans_older_than"]),
            "batch_size": options["batch_size"],
        }
        if options["dry_run"]:
            plan = selectors.purge_plan(**cutoffs)
            if options["verbosity"] >= 2:
                for task in plan.tasks:
                    finished = f"{task.finished_at:%Y-%m-%d %H:%M}" if task.finished_at else "?"
                    self.stdout.write(
                        f"upload {task.id}  {task.status} {finished}  "
                        f"{task.project}/{task.instance}:{task.path}"
                    )
                for name in plan.spool_names:
                    self.stdout.write(f"spool file {name}")
            self.stdout.write(
                f"Would delete {len(plan.tasks)} upload(s) and {len(plan.spool_names)} spool "
                "file(s); nothing was deleted (dry run)."
            )
            return
        result = services.purge_finished(**cutoffs)
        self.stdout.write(
            f"Deleted {result.tasks} upload(s) and {result.spool_files} spool file(s)."
        )
