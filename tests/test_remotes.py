"""Remote Incus servers over HTTPS: the local daemon on https://127.0.0.1:8443 with a trusted
client certificate (scripts/incus-test-env sets it up), server certificate pinned."""

import hashlib
import os
import subprocess
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from tests.incus_utils import (
    CLIENT_DIR,
    HTTPS_ADDRESS,
    P2_PROJECT,
    P2_RUNNING,
    RUNNING,
    run_in,
    run_worker,
    sha256_in,
    task_of,
    upload,
)
from uploads.incus import IncusPusher
from uploads.models import Grant, Status
from uploads.pushers import PermanentPushError, PushRequest, TransientPushError

pytestmark = [pytest.mark.incus, pytest.mark.django_db(transaction=True)]

HTTPS = f"https://{HTTPS_ADDRESS}"


@pytest.fixture
def tls(incus: str, settings: Any) -> dict[str, Any]:
    """Settings naming two remotes: `local` (the socket) and `edge` (HTTPS, pinned). The
    `incus` fixture checked that the HTTPS listener and the certificates are there."""
    edge = {
        "endpoint": HTTPS,
        "cert": str(CLIENT_DIR / "client.crt"),
        "key": str(CLIENT_DIR / "client.key"),
        "verify": str(CLIENT_DIR / "server.crt"),
    }
    settings.UPLOADS = {
        **settings.UPLOADS,
        "REMOTES": {"local": {"endpoint": incus}, "edge": edge},
    }
    return edge


def request(path: str, body: Path, **kw: Any) -> PushRequest:
    return PushRequest(
        open_source=partial(open, body, "rb"),
        size=body.stat().st_size,
        instance=RUNNING,
        project="default",
        path=path,
        remote="edge",
        **kw,
    )


def test_push_over_https_lands_with_mode_even_with_ca_bundles_set(
    tls: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # These are set on this machine; requests would let them replace the pinned certificate.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    body = tmp_path / "f"
    body.write_bytes(os.urandom(200_000))
    path = f"/tmp/uploadsvc-tls-{uuid.uuid4().hex}"
    pusher = IncusPusher()  # the worker's pusher: `local`, handing `edge` pushes to its remote
    try:
        pusher.push(request(path, body, mode=0o600, uid=1000, gid=1000))
        assert pusher.for_remote("edge").check() is None
    finally:
        pusher.close()
    assert sha256_in(RUNNING, path) == hashlib.sha256(body.read_bytes()).hexdigest()
    assert run_in(RUNNING, "stat", "-c", "%a %u %g", path).split() == ["600", "1000", "1000"]
    run_in(RUNNING, "rm", "-f", path)


def test_a_server_without_the_pinned_certificate_is_refused(
    tls: dict[str, Any], tmp_path: Path, settings: Any
) -> None:
    # Pin something else (the client's own certificate): the real server must not match it.
    settings.UPLOADS["REMOTES"]["edge"] = {**tls, "verify": tls["cert"]}
    body = tmp_path / "f"
    body.write_bytes(b"x")
    pusher = IncusPusher.for_remote("edge")
    try:
        with pytest.raises(PermanentPushError, match="pinned certificate"):
            pusher.push(request("/tmp/never", body))
        assert pusher.check() is not None
    finally:
        pusher.close()


def test_an_untrusted_client_certificate_is_refused(
    tls: dict[str, Any], tmp_path: Path, settings: Any
) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:secp384r1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=stranger",
            "-keyout",
            str(tmp_path / "k"),
            "-out",
            str(tmp_path / "c"),
        ],
        check=True,
        capture_output=True,
    )
    settings.UPLOADS["REMOTES"]["edge"] = {
        **tls,
        "cert": str(tmp_path / "c"),
        "key": str(tmp_path / "k"),
    }
    body = tmp_path / "f"
    body.write_bytes(b"x")
    pusher = IncusPusher.for_remote("edge")
    try:
        with pytest.raises((PermanentPushError, TransientPushError)) as failure:
            pusher.push(request("/tmp/never", body))
    finally:
        pusher.close()
    assert failure.value.permanent, failure.value.message
    assert "403" in failure.value.message or "not found" in failure.value.message


def test_upload_naming_the_remote_lands_through_it_in_a_second_project(
    tls: dict[str, Any], api: APIClient, user: Any
) -> None:
    Grant.objects.create(user=user, remote="edge", project="*", instance_glob="uploadsvc-*")
    body = os.urandom(10_000)
    path = f"/tmp/uploadsvc-tls-{uuid.uuid4().hex}"
    data = upload(api, body, P2_RUNNING, path, x_incus_remote="edge", x_incus_project=P2_PROJECT)
    assert data["remote"] == "edge"
    run_worker()
    assert task_of(data).status == Status.SUCCEEDED, task_of(data).last_error
    assert sha256_in(P2_RUNNING, path, project=P2_PROJECT) == hashlib.sha256(body).hexdigest()


def test_healthz_checks_every_remote(tls: dict[str, Any]) -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200, response.content
    assert response.json()["checks"]["incus"] == {"local": "ok", "edge": "ok"}
