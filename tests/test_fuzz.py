"""Property-based fuzzing of the whole API from its own OpenAPI schema with schemathesis,
against the real server: no request, however odd, may produce a server error or a response the
schema does not describe."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from tests.conftest import Server

pytestmark = pytest.mark.django_db(transaction=True)


def test_api_never_fails_and_keeps_its_schema(
    web_server: Server, user: Any, tmp_path: Path
) -> None:
    token = Token.objects.create(user=user).key
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{web_server.url}/api/schema/",
            "--checks",
            "not_a_server_error,content_type_conformance,response_schema_conformance",
            "--header",
            f"Authorization: Token {token}",
            "--max-examples",
            "40",
            "--seed",
            "20261127",
            "--request-timeout",
            "20",
        ],
        cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
