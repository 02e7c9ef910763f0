"""Where the secret key comes from: DJANGO_SECRET_KEY, else (outside production) the local key
file `make` writes, so manage.py works in a second terminal with nothing exported."""

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PRINT_KEY = "from django.conf import settings; print(settings.SECRET_KEY)"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """manage.py and the project package in a directory of their own, so that its var/ is
    this test's (the app itself is imported from the installed package)."""
    shutil.copy(ROOT / "manage.py", tmp_path / "manage.py")
    shutil.copytree(ROOT / "uploadsvc", tmp_path / "uploadsvc")
    return tmp_path


def manage(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """manage.py as a second terminal runs it: only PATH and HOME, plus `env`."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=project,
        env={"PATH": os.environ["PATH"], "HOME": str(project), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def make_key(project: Path) -> str:
    """`make`'s own rule for the key file."""
    subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "var/secret-key"],
        cwd=project,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return (project / "var" / "secret-key").read_text().strip()


def test_make_writes_a_private_key_once(project: Path) -> None:
    key = make_key(project)
    path = project / "var" / "secret-key"
    assert len(key) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert make_key(project) == key


def test_without_the_variable_manage_py_uses_the_key_make_wrote(project: Path) -> None:
    key = make_key(project)
    result = manage(project, "shell", "-v", "0", "-c", PRINT_KEY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == key
    assert manage(project, "check").returncode == 0


def test_the_variable_wins_over_the_file(project: Path) -> None:
    make_key(project)
    result = manage(
        project, "shell", "-v", "0", "-c", PRINT_KEY, DJANGO_SECRET_KEY="from-the-environment"
    )
    assert result.stdout.strip() == "from-the-environment", result.stderr


def test_without_the_variable_or_the_file_it_says_how_to_get_one(project: Path) -> None:
    result = manage(project, "check")
    assert result.returncode != 0
    assert (
        "ImproperlyConfigured: Set DJANGO_SECRET_KEY, or run `make` once: it writes a local key "
        f"to {project}/var/secret-key, used when the variable is unset." in result.stderr
    )


@pytest.mark.parametrize(
    "production",
    [{"DJANGO_HTTPS": "true"}, {"DJANGO_ALLOWED_HOSTS": "uploads.example.com,localhost"}],
    ids=["https", "allowed-hosts"],
)
def test_production_refuses_to_start_on_the_local_key(
    project: Path, production: dict[str, str]
) -> None:
    make_key(project)
    result = manage(project, "check", **production)
    assert result.returncode != 0
    assert "ImproperlyConfigured: Set DJANGO_SECRET_KEY (50+ random characters)" in result.stderr
    assert manage(project, "check", DJANGO_SECRET_KEY="k" * 50, **production).returncode == 0
