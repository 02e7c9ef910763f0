"""System checks: catch a misconfiguration at start-up, not at the first upload -- the spool
(a directory, or a bucket that must exist and accept the credentials), the pusher, the UPLOADS
values, and what the upload path relies on from the project's settings.

Whether the bucket answers is asked only where it matters: `check --deploy`, and
`run_push_workers` at start (the web server says it in its log and on /healthz). Commands that
never touch the spool (`migrate`, `createsuperuser`, `grant_container`) work while it is out of
reach."""

import os
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.checks import CheckMessage, Error, register
from django.db import connections
from django.utils.module_loading import import_string

from uploads.conf import DEFINITIONS, S3Location, parse, uploads_settings
from uploads.pushers import pusher_class

EXCEPTION_HANDLER = "uploads.exceptions.exception_handler"


@register()
def check_uploads_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    configured = getattr(settings, "UPLOADS", {})
    for name in sorted(set(configured) - set(DEFINITIONS)):
        errors.append(
            checks.Warning(
                f"UPLOADS['{name}'] (UPLOADS_{name}) is not a setting of uploadsvc; it is ignored",
                id="uploads.W001",
            )
        )
    for name in sorted(set(configured) & set(DEFINITIONS)):
        try:
            parse(name, configured[name])
        except ValueError as exc:
            errors.append(Error(str(exc), id="uploads.E005"))
    if any(e.id == "uploads.E005" for e in errors):
        return errors  # the checks below would read the values that do not parse
    errors += _check_spool()
    try:
        pusher_class()
    except ImportError as exc:
        errors.append(Error(f"UPLOADS['PUSHER'] cannot be imported: {exc}", id="uploads.E003"))
    if uploads_settings.MAX_ATTEMPTS < 1:
        errors.append(Error("UPLOADS['MAX_ATTEMPTS'] must be at least 1", id="uploads.E004"))
    return errors


def _check_spool() -> list[CheckMessage]:
    try:
        location = uploads_settings.spool_location
    except ValueError as exc:
        return [Error(str(exc), id="uploads.E010")]
    if isinstance(location, S3Location):
        return []  # reachability: check_spool_reachable
    directory = location.directory
    name = "SPOOL_URL" if uploads_settings.SPOOL_URL else "SPOOL_DIR"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [Error(f"UPLOADS['{name}'] {directory} cannot be created: {exc}", id="uploads.E001")]
    if not os.access(directory, os.W_OK):
        return [Error(f"UPLOADS['{name}'] {directory} is not writable", id="uploads.E002")]
    return []


@register(deploy=True)
def check_spool_reachable(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """A bucket that is missing, refuses the credentials or is out of reach."""
    try:
        location = uploads_settings.spool_location
    except ValueError:
        return []  # uploads.E010
    if not isinstance(location, S3Location):
        return []
    from uploads import spool

    problem = spool.problem()
    if not problem:
        return []
    return [
        Error(
            f"UPLOADS_SPOOL_URL: {problem}",
            hint="Check the bucket, AWS_S3_ENDPOINT_URL and the AWS_* credentials.",
            id="uploads.E011",
        )
    ]


@register()
def check_what_uploads_rely_on(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The project settings the upload path needs: without them it would still run, wrongly."""
    errors: list[CheckMessage] = []
    for alias in connections:
        params = connections[alias].settings_dict
        mode = params.get("OPTIONS", {}).get("transaction_mode")
        if params["ENGINE"].endswith("sqlite3") and mode != "IMMEDIATE":
            errors.append(
                Error(
                    f"DATABASES['{alias}'] is SQLite without OPTIONS['transaction_mode'] = "
                    "'IMMEDIATE': concurrent claims would fail with 'database is locked'",
                    id="uploads.E006",
                )
            )
    handler = getattr(settings, "REST_FRAMEWORK", {}).get("EXCEPTION_HANDLER")
    if handler != EXCEPTION_HANDLER:
        errors.append(
            Error(
                f"REST_FRAMEWORK['EXCEPTION_HANDLER'] must be {EXCEPTION_HANDLER!r}: it gives the "
                "service's errors their statuses (409, 410, 403, 503)",
                id="uploads.E007",
            )
        )
    if any("SpoolUploadHandler" in str(h) for h in getattr(settings, "FILE_UPLOAD_HANDLERS", [])):
        errors.append(
            checks.Warning(
                "FILE_UPLOAD_HANDLERS names uploads.spool.SpoolUploadHandler: every form posted "
                "anywhere would be spooled; the upload view installs it for uploads only",
                id="uploads.W002",
            )
        )
    return errors


@register(deploy=True)
def check_the_wsgi_application(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The WSGI application must count body bytes (a truncated multipart upload would otherwise
    be kept as if whole) and put a deadline on body reads (a client that stalls mid-body would
    hold a thread). Loading it has a cost, so `check --deploy` looks, not every command."""
    from uploads.wsgi import BodyCountingMiddleware, BodyDeadlineMiddleware

    wsgi_path = getattr(settings, "WSGI_APPLICATION", None)
    if not wsgi_path:
        return []
    layers = []
    app = import_string(wsgi_path)
    while app is not None:  # each middleware keeps the application it wraps as `.app`
        layers.append(app)
        app = getattr(app, "app", None)
    errors: list[CheckMessage] = []
    if not any(isinstance(layer, BodyCountingMiddleware) for layer in layers):
        errors.append(
            Error(
                f"{wsgi_path} is not wrapped in uploads.wsgi.BodyCountingMiddleware: a truncated "
                "multipart upload would be kept as if it were whole",
                id="uploads.E008",
            )
        )
    if not any(isinstance(layer, BodyDeadlineMiddleware) for layer in layers):
        errors.append(
            Error(
                f"{wsgi_path} is not wrapped in uploads.wsgi.BodyDeadlineMiddleware: a client "
                "that stops sending mid-body would hold a server thread",
                id="uploads.E009",
            )
        )
    return errors
