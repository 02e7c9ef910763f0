"""What the service's management commands say about themselves: every option explains itself."""

import argparse
from pathlib import Path

import pytest
from django.core.management import load_command_class

import uploads

COMMANDS = sorted(
    path.stem
    for path in (Path(uploads.__file__).parent / "management" / "commands").glob("*.py")
    if not path.stem.startswith("_")
)


def test_the_commands_are_found() -> None:
    assert {"grant_container", "purge_uploads", "run_push_workers"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name: str) -> None:
    command = load_command_class("uploads", name)
    parser = command.create_parser("manage.py", name)
    assert command.help
    silent = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert silent == []
