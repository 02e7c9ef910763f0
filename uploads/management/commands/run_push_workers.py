"""`manage.py run_push_workers`: parse options, build a Worker, run it."""

import argparse
import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from uploads.checks import check_spool_reachable
from uploads.localfiles import make_private
from uploads.worker import Worker


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return number


class Command(BaseCommand):
    help = "Claim queued uploads and push them into their Incus instances."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=positive_int, default=4, help="pushes at once (4)")
        parser.add_argument(
            "--burst", action="store_true", help="process everything ready, then exit"
        )
        parser.add_argument(
            "--poll-interval", type=positive_float, default=1.0, help="seconds between polls (1)"
        )
        parser.add_argument("--worker-id", default=None, help="name in logs and attempts")
        parser.add_argument(
            "--grace-period",
            type=positive_float,
            default=30.0,
            help="seconds in-flight pushes get to finish after SIGTERM (30)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        level = {0: logging.WARNING, 1: logging.INFO}.get(options["verbosity"], logging.DEBUG)
        logging.getLogger("uploads").setLevel(level)
        for error in check_spool_reachable():
            raise CommandError(f"{error.msg} ({error.id}). {error.hint}")
        make_private()
        worker = Worker(
            threads=options["threads"],
            poll_interval=options["poll_interval"],
            burst=options["burst"],
            worker_id=options["worker_id"],
            grace_period=options["grace_period"],
        )
        code = worker.run()
        if code:
            raise CommandError("stopped before every push finished", returncode=code)
