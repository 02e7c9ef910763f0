"""Who may push where: grants, the worker's re-check, tokens, audit, hardening."""

import socket
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.api_utils import raw_upload
from tests.conftest import ROOT, Server, spool_files, subprocess_env, token_client
from uploads.grants import path_within
from uploads.models import AuditEvent, Status, UploadTask
from uploads.pushers import NullPusher
from uploads.worker import Worker

pytestmark = pytest.mark.django_db


@pytest.fixture
def carol(django_user_model: Any) -> Any:
    """A user with no grants of her own."""
    return django_user_model.objects.create_user(username="carol", password="pw-carol-123")


@pytest.fixture
def carol_api(carol: Any) -> APIClient:
    return token_client(carol)


def grant(who: str, glob: str, *args: str) -> str:
    out = StringIO()
    call_command("grant_container", who, glob, *args, stdout=out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("path", "prefix", "inside"),
    [
        ("/srv/app/x", "/srv/app", True),
        ("/srv/app", "/srv/app", True),
        ("/srv/app/x", "/srv/app/", True),
        ("/srv/application/x", "/srv/app", False),
        ("/srv/ap", "/srv/app", False),
        ("/etc/passwd", "/", True),
    ],
)
def test_path_within_respects_directory_boundaries(path: str, prefix: str, inside: bool) -> None:
    assert path_within(path, prefix) is inside


def test_no_grant_is_403_naming_the_instance_and_nothing_queued(
    carol_api: APIClient, spool: Path
) -> None:
    response = raw_upload(carol_api)
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "you have no grant for instance 'web1' in project 'default' on remote 'local'"
    )
    assert UploadTask.objects.count() == 0 and spool_files(spool) == []
    event = AuditEvent.objects.get()
    assert (event.username, event.action, event.outcome) == ("carol", "upload", "refused")
    assert event.detail["status"] == 403


def test_grant_on_glob_and_prefix_allows_there_and_nowhere_else(
    carol_api: APIClient, spool: Path
) -> None:
    assert "Granted" in grant("carol", "web-*", "--path-prefix", "/srv/www")
    ok = raw_upload(carol_api, x_container_name="web-1", x_file_path="/srv/www/index.html")
    assert ok.status_code == 202
    refused = {
        ("db-1", "/srv/www/index.html"): "no grant",
        ("web-1", "/srv/wwwroot/index.html"): "outside the directories",
        ("web-1", "/srv/www/../../etc/shadow"): "outside the directories",
        ("web-1", "/etc/shadow"): "outside the directories",
    }
    for (instance, path), reason in refused.items():
        response = raw_upload(carol_api, x_container_name=instance, x_file_path=path)
        assert response.status_code == 403, (instance, path)
        assert reason in response.json()["detail"]
    assert UploadTask.objects.count() == 1
    assert spool_files(spool) == []  # a small body travels in its task's row


@pytest.mark.parametrize("path", ["/srv/www", "/srv/www/.", "/srv/www/x/.."])
def test_a_path_that_is_the_granted_directory_itself_is_refused(
    carol_api: APIClient, spool: Path, path: str
) -> None:
    grant("carol", "web-*", "--path-prefix", "/srv/www")
    response = raw_upload(carol_api, x_container_name="web-1", x_file_path=path)
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "/srv/www is a directory granted to you in 'web-1', not a file: name a file inside it"
    )
    assert UploadTask.objects.count() == 0 and spool_files(spool) == []


def test_owners_are_refused_unless_a_grant_names_them(carol_api: APIClient, spool: Path) -> None:
    grant("carol", "web1", "--path-prefix", "/srv/app", "--owner", "1000:1000", "--owner", "33")
    allowed = [
        {},
        {"x_file_uid": "1000"},
        {"x_file_uid": "1000", "x_file_gid": "1000"},
        {"x_file_uid": "33", "x_file_gid": "1000"},
        {"x_file_gid": "1000"},
    ]
    for headers in allowed:
        assert raw_upload(carol_api, x_file_path="/srv/app/f", **headers).status_code == 202
    for headers in ({"x_file_uid": "0"}, {"x_file_gid": "0"}, {"x_file_gid": "33"}):
        response = raw_upload(carol_api, x_file_path="/srv/app/f", **headers)
        assert response.status_code == 403, headers
        assert response.json()["detail"].endswith("owners allowed: 1000:1000, 33")
    assert UploadTask.objects.count() == len(allowed)


def test_a_grant_without_owners_allows_no_owner_and_star_allows_any(carol_api: APIClient) -> None:
    grant("carol", "web1")
    refused = raw_upload(carol_api, x_file_uid="1000")
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert detail.endswith("do not allow uid 1000; owners allowed: none (leave uid and gid unset)")
    assert raw_upload(carol_api).status_code == 202
    grant("carol", "web1", "--owner", "*")
    assert raw_upload(carol_api, x_file_uid="0", x_file_gid="0").status_code == 202


def test_a_retry_s_corrections_are_checked_against_the_grants(
    carol: Any, carol_api: APIClient
) -> None:
    grant("carol", "web1", "--path-prefix", "/srv/app", "--owner", "1000")
    task_id = raw_upload(carol_api, x_file_path="/srv/app/f").json()["id"]
    UploadTask.objects.filter(pk=task_id).update(status=Status.FAILED)
    refused = carol_api.post(f"/api/uploads/{task_id}/retry/", {"uid": 0}, format="json")
    assert refused.status_code == 403
    assert "do not allow uid 0" in refused.json()["detail"]
    task = UploadTask.objects.get(pk=task_id)
    assert (task.status, task.uid) == (Status.FAILED, None)
    bad = carol_api.post(f"/api/uploads/{task_id}/retry/", {"mode": "rw-r--r--"}, format="json")
    assert bad.status_code == 400 and "octal" in bad.json()["mode"][0]
    allowed = carol_api.post(f"/api/uploads/{task_id}/retry/", {"uid": 1000}, format="json")
    assert allowed.status_code == 200 and allowed.json()["uid"] == 1000
    refusal = AuditEvent.objects.get(action="retry", outcome="refused")
    assert refusal.detail["changes"] == {"uid": 0}


def test_grant_container_refuses_a_malformed_owner() -> None:
    with pytest.raises(CommandError, match="'root' is not an owner"):
        grant("alice", "web1", "--owner", "root")


def test_project_and_remote_are_part_of_the_grant(carol_api: APIClient, settings: Any) -> None:
    settings.UPLOADS = {
        **settings.UPLOADS,
        "REMOTES": {"local": {"endpoint": "/x"}, "edge": {"endpoint": "https://edge:8443"}},
    }
    grant("carol", "web1", "--project", "staging")
    assert raw_upload(carol_api, x_incus_project="staging").status_code == 202
    assert raw_upload(carol_api).status_code == 403  # project default
    response = raw_upload(carol_api, x_incus_project="staging", x_incus_remote="edge")
    assert response.status_code == 403
    unknown = raw_upload(carol_api, x_incus_remote="nowhere")
    assert unknown.status_code == 400
    assert "edge, local" in unknown.json()["remote"][0]


def test_group_grant(carol: Any, carol_api: APIClient) -> None:
    ops = Group.objects.create(name="ops")
    carol.groups.add(ops)
    grant("@ops", "*")
    assert raw_upload(carol_api).status_code == 202


def test_grant_size_limit_is_413_before_reading(carol_api: APIClient, spool: Path) -> None:
    grant("carol", "web1", "--max-size", "10")
    response = raw_upload(carol_api, b"x" * 11)
    assert response.status_code == 413
    assert "at most 10" in response.json()["detail"]
    assert raw_upload(carol_api, b"x" * 10).status_code == 202


def test_multipart_upload_is_checked_too(carol_api: APIClient, spool: Path) -> None:
    from tests.api_utils import form_upload

    grant("carol", "web1", "--path-prefix", "/srv/app")
    assert form_upload(carol_api, path="/srv/app/ok").status_code == 202
    response = form_upload(carol_api, path="/srv/application/no")
    assert response.status_code == 403
    assert len(spool_files(spool)) == 1


def test_superuser_needs_no_grant(django_user_model: Any) -> None:
    root = django_user_model.objects.create_superuser("root", "r@example.com", "pw-root-123")
    assert raw_upload(token_client(root), x_container_name="anything").status_code == 202


@pytest.mark.django_db(transaction=True)
def test_revoked_grant_stops_the_waiting_task_and_blocks_its_retry(
    carol: Any, carol_api: APIClient
) -> None:
    grant("carol", "web1")
    task_id = raw_upload(carol_api).json()["id"]
    assert "Revoked 1 grant(s)" in grant("carol", "web1", "--revoke")
    Worker(threads=1, burst=True, pusher_factory=NullPusher).run()
    task = UploadTask.objects.get(pk=task_id)
    assert task.status == Status.FAILED and task.attempts == 1
    assert task.last_error.startswith("grant revoked: you have no grant for instance 'web1'")

    response = carol_api.post(f"/api/uploads/{task_id}/retry/")
    assert response.status_code == 403
    assert UploadTask.objects.get(pk=task_id).status == Status.FAILED

    grant("carol", "web1")
    assert carol_api.post(f"/api/uploads/{task_id}/retry/").status_code == 200
    actions = list(AuditEvent.objects.order_by("at").values_list("action", "outcome"))
    assert actions == [
        ("grant", "created"),
        ("grant", "revoked"),
        ("retry", "refused"),
        ("grant", "created"),
        ("retry", "done"),
    ]


def test_cancel_is_audited(api: APIClient) -> None:
    task_id = raw_upload(api).json()["id"]
    api.post(f"/api/uploads/{task_id}/cancel/")
    event = AuditEvent.objects.get(action="cancel")
    assert (event.username, event.outcome, str(event.task_id)) == ("alice", "done", task_id)
    assert event.source == "127.0.0.1"


def test_expired_and_revoked_tokens_get_401(user: Any, settings: Any) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "TOKEN_TTL_SECONDS": 3600}
    client = token_client(user)
    assert client.get("/api/uploads/").status_code == 200
    Token.objects.filter(user=user).update(created=timezone.now() - timedelta(hours=2))
    expired = client.get("/api/uploads/")
    assert expired.status_code == 401
    assert "expired" in expired.json()["detail"]
    Token.objects.filter(user=user).delete()
    assert client.get("/api/uploads/").status_code == 401


def test_user_throttle_is_configurable(api: APIClient, settings: Any) -> None:
    from rest_framework.throttling import UserRateThrottle

    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"user": "2/min"},
    }
    UserRateThrottle.THROTTLE_RATES = {"user": "2/min"}
    try:
        from django.core.cache import caches

        caches["throttle"].clear()
        codes = [api.get("/api/uploads/").status_code for _ in range(3)]
    finally:
        UserRateThrottle.THROTTLE_RATES = {"user": None}
    assert codes == [200, 200, 429]


@pytest.mark.django_db(transaction=True)
def test_refusal_comes_before_the_body_is_read(web_server: Server, carol: Any) -> None:
    token = Token.objects.create(user=carol).key
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
        "X-Container-Name: web1\r\nX-File-Path: /srv/f\r\n"
        "Content-Length: 10000000000\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", web_server.port), timeout=10) as sock:
        sock.sendall(head)  # and not one byte of the 10 GB body
        answer = b""
        while not answer.endswith(b"}"):
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"no grant for instance 'web1'" in answer


def test_check_deploy_passes_with_the_documented_production_settings(tmp_path: Path) -> None:
    env = subprocess_env(
        tmp_path,
        DJANGO_SECRET_KEY="k" * 10 + "0123456789abcdefghijklmnopqrstuvwxyz-_ABCDEFGH",
        DJANGO_DEBUG="false",
        DJANGO_HTTPS="true",
        DJANGO_ALLOWED_HOSTS="uploads.example.com",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def listing(*args: str) -> list[str]:
    out = StringIO()
    call_command("grant_container", "--list", *args, stdout=out)
    return out.getvalue().splitlines()


def test_list_shows_every_grant_as_a_table(carol: Any, django_user_model: Any) -> None:
    ops = Group.objects.create(name="ops")
    carol.groups.add(ops)
    dave = django_user_model.objects.create_user(username="dave")
    grant("carol", "web-*", "--path-prefix", "/srv/www", "--path-prefix", "/srv/app")
    grant("carol", "db1", "--project", "staging", "--owner", "33:33", "--max-size", "1000")
    grant("@ops", "ci-*")
    grant("dave", "*")
    assert listing() == [
        "WHO    REMOTE  PROJECT  INSTANCES  PREFIXES            OWNERS  MAX SIZE",
        "carol  local   default  web-*      /srv/www, /srv/app  none    no limit",
        "carol  local   staging  db1        any path            33:33   1000 bytes",
        "dave   local   default  *          any path            none    no limit",
        "@ops   local   default  ci-*       any path            none    no limit",
    ]
    # A user's own grants and those of their groups; a group's alone.
    assert [line.split()[0] for line in listing("carol")] == ["WHO", "carol", "carol", "@ops"]
    assert [line.split()[0] for line in listing("@ops")] == ["WHO", "@ops"]
    assert dave.upload_grants.count() == 1


def test_list_says_when_there_is_nothing(carol: Any) -> None:
    assert listing() == ["No grants."]
    assert listing("carol") == ["carol holds no grants."]
    with pytest.raises(CommandError, match="no such user or group: @nobody"):
        listing("@nobody")
    with pytest.raises(CommandError, match="--list takes at most USER"):
        listing("carol", "web1")


def test_revoke_that_matches_nothing_says_so_and_fails(carol: Any) -> None:
    grant("carol", "web1")
    with pytest.raises(CommandError) as failure:
        grant("carol", "web2", "--revoke")
    assert str(failure.value) == (
        "no grant of carol for local:default/web2 to revoke (--list carol shows theirs)"
    )
    assert carol.upload_grants.count() == 1


@pytest.mark.django_db(transaction=True)
def test_revoke_that_matches_nothing_exits_non_zero(carol: Any, spool: Path) -> None:
    """As an operator runs it: the message on standard error and exit status 1."""
    result = subprocess.run(
        [sys.executable, "manage.py", "grant_container", "carol", "web2", "--revoke"],
        cwd=ROOT,
        env=subprocess_env(spool),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "CommandError: no grant of carol for local:default/web2 to revoke" in result.stderr


def test_grant_needs_who_and_glob(carol: Any) -> None:
    with pytest.raises(CommandError, match="give USER\\|@GROUP and an instance GLOB"):
        call_command("grant_container", "carol", stdout=StringIO())
