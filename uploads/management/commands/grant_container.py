"""`manage.py grant_container USER|@GROUP GLOB`: let a user or group push into instances."""

import argparse
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from uploads import services
from uploads.grants import parse_owner
from uploads.models import Grant


def _owner(text: str) -> str:
    try:
        return parse_owner(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


class Command(BaseCommand):
    help = (
        "Grant a user (or @group) the right to push into instances matching GLOB, "
        "optionally only under some directories and up to a size; --revoke takes it back."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("who", help="a user name, or @group")
        parser.add_argument("glob", help="instance-name glob, e.g. web-* or ci-runner")
        parser.add_argument("--project", default="default", help="project name or glob")
        parser.add_argument("--remote", default="local")
        parser.add_argument(
            "--path-prefix",
            action="append",
            default=[],
            dest="path_prefixes",
            help="directory files may be written under (repeatable; default: anywhere)",
        )
        parser.add_argument("--max-size", type=int, default=None, help="largest file, bytes")
        parser.add_argument(
            "--owner",
            action="append",
            default=[],
            dest="owners",
            type=_owner,
            metavar="UID[:GID]",
            help=(
                "an owner uploads may give their files and created directories (repeatable; "
                "* for any); without one, uploads may not ask for a uid or gid"
            ),
        )
        parser.add_argument("--revoke", action="store_true", help="remove matching grants")

    def handle(self, *args: Any, **options: Any) -> None:
        who: str = options["who"]
        target: dict[str, Any] = {}
        try:
            if who.startswith("@"):
                target["group"] = Group.objects.get(name=who[1:])
            else:
                target["user"] = get_user_model().objects.get(username=who)
        except (Group.DoesNotExist, get_user_model().DoesNotExist) as exc:
            raise CommandError(f"no such user or group: {who}") from exc
        scope = {
            "instance_glob": options["glob"],
            "project": options["project"],
            "remote": options["remote"],
        }
        if options["revoke"]:
            count = services.grant_revoke(
                actor=None, grants=Grant.objects.filter(**target, **scope)
            )
            self.stdout.write(f"Revoked {count} grant(s).")
            return
        grant = services.grant_create(
            actor=None,
            **target,
            **scope,
            path_prefixes=options["path_prefixes"],
            max_size=options["max_size"],
            owners=options["owners"],
        )
        self.stdout.write(f"Granted {grant}.")
