"""System checks: catch a misconfigured spool or pusher at start-up, not at the first upload."""

import os
from typing import Any

from django.core.checks import CheckMessage, Error, register
from django.utils.module_loading import import_string

from uploads.conf import uploads_settings


@register()
def check_uploads_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    spool = uploads_settings.spool_dir
    try:
        spool.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        errors.append(
            Error(f"UPLOADS['SPOOL_DIR'] {spool} cannot be created: {exc}", id="uploads.E001")
        )
    else:
        if not os.access(spool, os.W_OK):
            errors.append(Error(f"UPLOADS['SPOOL_DIR'] {spool} is not writable", id="uploads.E002"))
    try:
        import_string(uploads_settings.PUSHER)
    except ImportError as exc:
        errors.append(Error(f"UPLOADS['PUSHER'] cannot be imported: {exc}", id="uploads.E003"))
    if uploads_settings.MAX_ATTEMPTS < 1:
        errors.append(Error("UPLOADS['MAX_ATTEMPTS'] must be at least 1", id="uploads.E004"))
    return errors
