"""Files on the service's disk that hold secrets or users' data are its user's alone."""

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT, spool_files, subprocess_env
from tests.factories import spooled
from uploads.localfiles import make_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_spooled_files_and_a_new_spool_directory_are_private(settings: Any, tmp_path: Path) -> None:
    fresh = tmp_path / "new-spool"
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_DIR": fresh}
    written = spooled(b"someone's file")
    assert mode(fresh) == 0o700
    assert mode(fresh / written.name) == 0o600


def test_files_made_before_are_made_private_at_start(
    settings: Any, spool: Path, tmp_path: Path
) -> None:
    key = tmp_path / "secret-key"
    key.write_text("k")
    key.chmod(0o644)
    old = spool / "0123456789abcdef0123456789abcdef"
    old.write_bytes(b"uploaded before")
    old.chmod(0o644)
    spool.chmod(0o755)
    settings.LOCAL_SECRET_KEY_FILE = key
    assert make_private() == 3
    assert (mode(key), mode(spool), mode(old)) == (0o600, 0o700, 0o600)
    assert make_private() == 0


def test_the_database_manage_py_creates_is_private(tmp_path: Path) -> None:
    database = tmp_path / "fresh.sqlite3"
    env = subprocess_env(tmp_path / "spool", DATABASE_URL=f"sqlite:///{database}")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
    )
    assert mode(database) == 0o600


@pytest.mark.django_db(transaction=True)
def test_the_web_server_makes_the_spool_private_when_it_starts(
    spool: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    old = spool / "fedcba9876543210fedcba9876543210"
    old.write_bytes(b"uploaded before")
    os.chmod(old, 0o644)
    spool.chmod(0o755)
    server = request.getfixturevalue("web_server")
    assert requests.get(f"{server.url}/api/schema/", timeout=30).ok  # the app is loaded
    assert (mode(spool), mode(old)) == (0o700, 0o600)
    assert spool_files(spool) == [old.name]
