"""Uploads through Django's test client, for the tests of the API and of what it leads to."""

import io
from pathlib import Path
from typing import Any

from rest_framework.test import APIClient

from tests.conftest import spool_files
from uploads.conf import DEFAULTS
from uploads.models import UploadTask

INLINE_MAX = DEFAULTS["INLINE_MAX_BYTES"]

URL = "/api/uploads/"


def raw_upload(client: APIClient, body: bytes = b"hello\n", **headers: str) -> Any:
    meta = {"HTTP_X_CONTAINER_NAME": "web1", "HTTP_X_FILE_PATH": "/srv/app/hello.txt"}
    for key, value in headers.items():
        name = key.upper()
        meta[name if name == "CONTENT_LENGTH" else f"HTTP_{name}"] = value
    meta = {k: v for k, v in meta.items() if v is not None}
    return client.generic("POST", URL, body, content_type="application/octet-stream", **meta)


def form_upload(
    client: APIClient,
    body: bytes | None = b"hello\n",
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> Any:
    data: dict[str, Any] = {"container": "web1", "path": "/srv/app/hello.txt"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    if body is not None:
        upload = io.BytesIO(body)
        upload.name = "local-name.txt"
        data["file"] = upload
    return client.post(URL, data, format="multipart", **(headers or {}))


def assert_nothing_queued(spool: Path) -> None:
    assert UploadTask.objects.count() == 0
    assert spool_files(spool) == []
