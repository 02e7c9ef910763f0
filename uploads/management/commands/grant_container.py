"""`manage.py grant_container USER|@GROUP GLOB`: let a user or group push into instances;
`--revoke` takes it back, `--list [USER|@GROUP]` shows who may push where."""

import argparse
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError

from uploads import selectors, services
from uploads.grants import parse_owner
from uploads.models import Grant

COLUMNS = ("WHO", "REMOTE", "PROJECT", "INSTANCES", "PREFIXES", "OWNERS", "MAX SIZE")


def _owner(text: str) -> str:
    try:
        return parse_owner(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _row(grant: Grant) -> tuple[str, ...]:
    return (
        str(grant.user) if grant.user_id else f"@{grant.group}",
        grant.remote,
        grant.project,
        grant.instance_glob,
        ", ".join(grant.path_prefixes) or "any path",
        ", ".join(grant.owners) or "none",
        "no limit" if grant.max_size is None else f"{grant.max_size} bytes",
    )


def table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns two spaces apart, under a header."""
    lines = [COLUMNS, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


class Command(BaseCommand):
    help = (
        "Grant a user (or @group) the right to push into instances matching GLOB, "
        "optionally only under some directories and up to a size; --revoke takes it back, "
        "--list shows the grants."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "who",
            nargs="?",
            metavar="USER|@GROUP",
            help="a user name, or @group (with --list: whose grants to show; optional)",
        )
        parser.add_argument(
            "glob", nargs="?", metavar="GLOB", help="instance-name glob, e.g. web-* or ci-runner"
        )
        parser.add_argument(
            "--project", default="default", help="project name or glob (default: default)"
        )
        parser.add_argument(
            "--remote",
            default="local",
            help="Incus remote, as UPLOADS_REMOTES names it (default: local)",
        )
        parser.add_argument(
            "--path-prefix",
            action="append",
            default=[],
            dest="path_prefixes",
            metavar="DIR",
            help="directory files may be written under (repeatable; default: anywhere)",
        )
        parser.add_argument(
            "--max-size",
            type=int,
            default=None,
            metavar="BYTES",
            help="largest file (default: no limit)",
        )
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
        action = parser.add_mutually_exclusive_group()
        action.add_argument(
            "--revoke",
            action="store_true",
            help="remove the grants of USER|@GROUP for GLOB in --project on --remote",
        )
        action.add_argument(
            "--list",
            action="store_true",
            help="show every grant, or those USER (directly or through a group) or @GROUP holds",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        who: str | None = options["who"]
        if options["list"]:
            if options["glob"] is not None:
                raise CommandError("--list takes at most USER|@GROUP, no GLOB")
            self.list_grants(who)
            return
        if who is None or options["glob"] is None:
            raise CommandError("give USER|@GROUP and an instance GLOB (or --list)")
        holder = self.holder(who)
        scope = {
            "instance_glob": options["glob"],
            "project": options["project"],
            "remote": options["remote"],
        }
        if options["revoke"]:
            count = services.grant_revoke(
                actor=None, grants=Grant.objects.filter(**holder, **scope)
            )
            if not count:
                raise CommandError(
                    f"no grant of {who} for {scope['remote']}:{scope['project']}/"
                    f"{scope['instance_glob']} to revoke (--list {who} shows theirs)"
                )
            self.stdout.write(f"Revoked {count} grant(s).")
            return
        grant = services.grant_create(
            actor=None,
            **holder,
            **scope,
            path_prefixes=options["path_prefixes"],
            max_size=options["max_size"],
            owners=options["owners"],
        )
        self.stdout.write(f"Granted {grant}.")

    def holder(self, who: str) -> dict[str, Any]:
        try:
            if who.startswith("@"):
                return {"group": Group.objects.get(name=who[1:])}
            return {"user": get_user_model().objects.get(username=who)}
        except (Group.DoesNotExist, get_user_model().DoesNotExist) as exc:
            raise CommandError(f"no such user or group: {who}") from exc

    def list_grants(self, who: str | None) -> None:
        grants = list(selectors.grant_list(**(self.holder(who) if who else {})))
        if not grants:
            self.stdout.write(f"{who} holds no grants." if who else "No grants.")
            return
        self.stdout.write(table([_row(grant) for grant in grants]))
