"""The app's settings (one place for defaults and types) and the system checks that catch a
misconfiguration at start-up."""

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection
from django.test import override_settings

from uploads.checks import (
    check_the_wsgi_application,
    check_uploads_settings,
    check_what_uploads_rely_on,
)
from uploads.conf import uploads_settings

plain_wsgi_application = WSGIHandler()


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def test_text_from_the_environment_is_parsed_into_each_settings_type() -> None:
    environment = {"MAX_PENDING": "7", "LEASE_SECONDS": "2.5", "VERIFY_SHA256": "yes"}
    with override_settings(UPLOADS={**environment, "TOKEN_TTL_SECONDS": ""}):
        assert uploads_settings.MAX_PENDING == 7
        assert uploads_settings.LEASE_SECONDS == 2.5
        assert uploads_settings.VERIFY_SHA256 is True
        assert uploads_settings.TOKEN_TTL_SECONDS is None
    with override_settings(UPLOADS={"REMOTES": '{"edge": {"endpoint": "https://e:8443"}}'}):
        assert uploads_settings.remotes == {"edge": {"endpoint": "https://e:8443"}}


def test_the_spool_is_beside_the_project_unless_an_absolute_path_is_given(tmp_path: Path) -> None:
    with override_settings(UPLOADS={}):
        assert uploads_settings.spool_dir == Path(settings.BASE_DIR) / "var" / "spool"
    with override_settings(UPLOADS={"SPOOL_DIR": "data/spool"}):
        assert uploads_settings.spool_dir == Path(settings.BASE_DIR) / "data" / "spool"
    with override_settings(UPLOADS={"SPOOL_DIR": str(tmp_path)}):
        assert uploads_settings.spool_dir == tmp_path


def test_values_that_do_not_parse_and_unknown_names_are_reported(spool: Path) -> None:
    with override_settings(UPLOADS={"SPOOL_DIR": spool, "MAX_PENDING": "lots", "COLOUR": "1"}):
        messages = check_uploads_settings()
    assert ids(messages) == ["uploads.W001", "uploads.E005"]
    assert "UPLOADS['MAX_PENDING'] = 'lots'" in messages[1].msg


def test_a_pusher_that_cannot_be_imported_is_reported(spool: Path) -> None:
    with override_settings(UPLOADS={"SPOOL_DIR": spool, "PUSHER": "uploads.nowhere.Pusher"}):
        assert ids(check_uploads_settings()) == ["uploads.E003"]


def test_the_project_settings_uploads_rely_on_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_what_uploads_rely_on() == []
    with override_settings(
        REST_FRAMEWORK={}, FILE_UPLOAD_HANDLERS=["uploads.spool.SpoolUploadHandler"]
    ):
        assert ids(check_what_uploads_rely_on()) == ["uploads.E007", "uploads.W002"]
    if connection.vendor == "sqlite":
        # Injected misconfiguration: the settings module always sets the mode for SQLite.
        options = {**connection.settings_dict["OPTIONS"], "transaction_mode": "DEFERRED"}
        monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)
        assert ids(check_what_uploads_rely_on()) == ["uploads.E006"]


def test_the_deploy_check_finds_a_wsgi_application_that_does_not_count_body_bytes() -> None:
    assert check_the_wsgi_application() == []
    with override_settings(WSGI_APPLICATION="tests.test_checks.plain_wsgi_application"):
        assert ids(check_the_wsgi_application()) == ["uploads.E008", "uploads.E009"]
