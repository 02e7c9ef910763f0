"""The attacker's suite for grants at the API: what staff may see and do with other users'
uploads, which owners a grant allows, a path equal to a granted directory, and multipart
uploads refused for any reason, which must leave nothing in the spool."""

import io
import socket
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.middleware.csrf import _get_new_csrf_string
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.api_utils import assert_nothing_queued, form_upload, raw_upload
from tests.conftest import Server, spool_files, token_client
from tests.factories import make_task
from uploads.models import Grant, Status, UploadTask

pytestmark = pytest.mark.django_db

URL = "/api/uploads/"


@pytest.fixture
def carol(django_user_model: Any) -> Any:
    """A user with no grants of her own; each test gives her the one it attacks."""
    return django_user_model.objects.create_user(username="carol", password="pw-carol-123")


@pytest.fixture
def carol_api(carol: Any) -> APIClient:
    return token_client(carol)


def grant(who: Any, *prefixes: str, **fields: Any) -> Grant:
    target = {"group": who} if isinstance(who, Group) else {"user": who}
    return Grant.objects.create(
        **target, instance_glob="web1", project="default", path_prefixes=list(prefixes), **fields
    )


# --- staff through the API -----------------------------------------------------------------


@pytest.fixture
def bobs(other_user: Any) -> dict[str, UploadTask]:
    """Two uploads of bob's: one failed (retryable), one pending (cancellable)."""
    failed = make_task(other_user, path="/srv/app/failed.txt")
    UploadTask.objects.filter(pk=failed.pk).update(
        status=Status.FAILED, attempts=1, last_error="boom", finished_at=timezone.now()
    )
    return {"failed": failed, "pending": make_task(other_user, path="/srv/app/pending.txt")}


def allow(user: Any, *codenames: str) -> None:
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="uploads", codename__in=codenames)
    )


def statuses(tasks: dict[str, UploadTask]) -> dict[str, str]:
    return {name: UploadTask.objects.get(pk=task.pk).status for name, task in tasks.items()}


def listed(client: APIClient) -> set[str]:
    return {task["id"] for task in client.get(URL).json()["results"]}


class TestStaff:
    def test_staff_without_permissions_see_and_touch_only_their_own(
        self, staff_user: Any, bobs: dict[str, UploadTask]
    ) -> None:
        """Attack: is_staff with no permission gets 403 in the admin, but the API listed, retried
        and cancelled every user's uploads. Without permissions staff are users like others:
        others' uploads are 404 and absent from the list."""
        own = make_task(staff_user, path="/srv/app/own.txt")
        staff = token_client(staff_user)

        assert listed(staff) == {str(own.pk)}
        assert staff.get(f"{URL}{bobs['failed'].pk}/").status_code == 404
        assert staff.post(f"{URL}{bobs['failed'].pk}/retry/").status_code == 404
        assert staff.post(f"{URL}{bobs['pending'].pk}/cancel/").status_code == 404
        assert statuses(bobs) == {"failed": Status.FAILED, "pending": Status.PENDING}
        assert staff.get(f"{URL}{own.pk}/").status_code == 200
        assert staff.post(f"{URL}{own.pk}/cancel/").status_code == 200

    def test_view_permission_shows_others_uploads_but_not_to_act_on_them(
        self, staff_user: Any, bobs: dict[str, UploadTask]
    ) -> None:
        """Staff with uploads.view_uploadtask see everyone's uploads (list, detail); retrying or
        cancelling someone else's is 403 and changes nothing."""
        allow(staff_user, "view_uploadtask")
        own = make_task(staff_user, path="/srv/app/own.txt")
        staff = token_client(staff_user)

        assert listed(staff) == {str(own.pk), *(str(t.pk) for t in bobs.values())}
        assert staff.get(f"{URL}{bobs['failed'].pk}/").json()["status"] == "failed"
        retry = staff.post(f"{URL}{bobs['failed'].pk}/retry/")
        cancel = staff.post(f"{URL}{bobs['pending'].pk}/cancel/")
        assert (retry.status_code, cancel.status_code) == (403, 403)
        assert "detail" in retry.json() and "detail" in cancel.json()
        assert statuses(bobs) == {"failed": Status.FAILED, "pending": Status.PENDING}

    def test_view_and_change_permissions_allow_retry_and_cancel(
        self, staff_user: Any, bobs: dict[str, UploadTask]
    ) -> None:
        allow(staff_user, "view_uploadtask", "change_uploadtask")
        staff = token_client(staff_user)

        assert staff.post(f"{URL}{bobs['failed'].pk}/retry/").status_code == 200
        assert staff.post(f"{URL}{bobs['pending'].pk}/cancel/").status_code == 200
        assert statuses(bobs) == {"failed": Status.PENDING, "pending": Status.CANCELLED}

    def test_superuser_sees_and_acts_on_everything(
        self, django_user_model: Any, bobs: dict[str, UploadTask]
    ) -> None:
        root = django_user_model.objects.create_superuser("root", "r@example.com", "pw-root-123")
        admin = token_client(root)

        assert listed(admin) == {str(t.pk) for t in bobs.values()}
        assert admin.post(f"{URL}{bobs['failed'].pk}/retry/").status_code == 200
        assert admin.post(f"{URL}{bobs['pending'].pk}/cancel/").status_code == 200
        assert statuses(bobs) == {"failed": Status.PENDING, "pending": Status.CANCELLED}


# --- owners --------------------------------------------------------------------------------


class TestOwners:
    def test_owners_not_in_the_grant_are_403_naming_what_is_allowed(
        self, carol: Any, carol_api: APIClient, spool: Path
    ) -> None:
        """Attack: any grant holder could ask for any uid/gid, 0 included. With owners 1000:1000
        only that pair (or no owner at all) is accepted."""
        grant(carol, "/srv/carol", owners=["1000:1000"])
        refused = [
            {"x_file_uid": "0"},
            {"x_file_gid": "0"},
            {"x_file_uid": "0", "x_file_gid": "0"},
            {"x_file_uid": "1000", "x_file_gid": "0"},
            {"x_file_uid": "1001", "x_file_gid": "1000"},
        ]
        for headers in refused:
            response = raw_upload(carol_api, x_file_path="/srv/carol/f", **headers)
            assert response.status_code == 403, (headers, response.content)
            assert "1000:1000" in response.json()["detail"]
        assert_nothing_queued(spool)

        both = raw_upload(
            carol_api, x_file_path="/srv/carol/f", x_file_uid="1000", x_file_gid="1000"
        )
        assert both.status_code == 202, both.content
        assert raw_upload(carol_api, x_file_path="/srv/carol/g").status_code == 202

    def test_no_owners_allow_no_uid_or_gid(
        self, carol: Any, carol_api: APIClient, spool: Path
    ) -> None:
        grant(carol, "/srv/carol", owners=[])
        for headers in ({"x_file_uid": "1000"}, {"x_file_gid": "1000"}, {"x_file_uid": "0"}):
            response = raw_upload(carol_api, x_file_path="/srv/carol/f", **headers)
            assert response.status_code == 403, (headers, response.content)
            assert "detail" in response.json()
        assert_nothing_queued(spool)
        assert raw_upload(carol_api, x_file_path="/srv/carol/f").status_code == 202

    def test_a_uid_entry_allows_that_uid_only(self, carol: Any, carol_api: APIClient) -> None:
        grant(carol, "/srv/carol", owners=["33"])
        assert raw_upload(carol_api, x_file_path="/srv/carol/f", x_file_uid="33").status_code == 202
        refused = raw_upload(carol_api, x_file_path="/srv/carol/f", x_file_uid="34")
        assert refused.status_code == 403
        assert "33" in refused.json()["detail"]

    def test_star_allows_any_owner(self, carol: Any, carol_api: APIClient) -> None:
        grant(carol, "/srv/carol", owners=["*"])
        response = raw_upload(carol_api, x_file_path="/srv/carol/f", x_file_uid="0", x_file_gid="0")
        assert response.status_code == 202

    def test_owners_of_a_grant_for_another_directory_do_not_apply(
        self, carol: Any, carol_api: APIClient
    ) -> None:
        """Attack: a second grant with any owner, for another directory of the same instance,
        must not lend its owners to the first directory."""
        grant(carol, "/srv/carol", owners=[])
        grant(carol, "/srv/shared", owners=["*"])
        root_owned = {"x_file_uid": "0", "x_file_gid": "0"}
        assert raw_upload(carol_api, x_file_path="/srv/carol/f", **root_owned).status_code == 403
        assert raw_upload(carol_api, x_file_path="/srv/shared/f", **root_owned).status_code == 202

    def test_group_grants_carry_owners_too(self, carol: Any, carol_api: APIClient) -> None:
        ops = Group.objects.create(name="ops")
        carol.groups.add(ops)
        grant(ops, "/srv/ops", owners=["1000:1000"])
        ok = raw_upload(carol_api, x_file_path="/srv/ops/f", x_file_uid="1000", x_file_gid="1000")
        assert ok.status_code == 202
        assert raw_upload(carol_api, x_file_path="/srv/ops/f", x_file_uid="0").status_code == 403

    def test_superuser_may_ask_for_any_owner(self, django_user_model: Any) -> None:
        root = django_user_model.objects.create_superuser("root", "r@example.com", "pw-root-123")
        response = raw_upload(token_client(root), x_file_uid="0", x_file_gid="0")
        assert response.status_code == 202

    def test_multipart_with_an_owner_not_allowed_leaves_nothing(
        self, carol: Any, carol_api: APIClient, spool: Path
    ) -> None:
        grant(carol, "/srv/carol", owners=["1000:1000"])
        response = form_upload(carol_api, b"x" * 10_000, path="/srv/carol/f", uid="0")
        assert response.status_code == 403
        assert "1000:1000" in response.json()["detail"]
        assert_nothing_queued(spool)

    def test_grant_container_owner_option(self, carol: Any, carol_api: APIClient) -> None:
        out = StringIO()
        call_command(
            "grant_container",
            "carol",
            "web1",
            "--path-prefix",
            "/srv/carol",
            "--owner",
            "1000:1000",
            "--owner",
            "33",
            stdout=out,
        )
        assert "Granted" in out.getvalue()
        assert Grant.objects.get(user=carol).owners == ["1000:1000", "33"]
        assert raw_upload(carol_api, x_file_path="/srv/carol/f", x_file_uid="33").status_code == 202
        assert raw_upload(carol_api, x_file_path="/srv/carol/f", x_file_uid="0").status_code == 403


# --- a path equal to the granted directory -------------------------------------------------

EQUAL_TO_PREFIX = ["/srv/carol", "/srv/carol/.", "/srv/carol/x/.."]


class TestPathEqualToPrefix:
    @pytest.mark.parametrize("path", EQUAL_TO_PREFIX)
    def test_raw_upload_is_403(
        self, carol: Any, carol_api: APIClient, spool: Path, path: str
    ) -> None:
        """Attack: the granted directory itself passed a prefix check, and the push wrote a file
        named like it."""
        grant(carol, "/srv/carol")
        response = raw_upload(carol_api, x_file_path=path)
        assert response.status_code == 403, response.content
        assert isinstance(response.json()["detail"], str)
        assert_nothing_queued(spool)

    @pytest.mark.parametrize("path", EQUAL_TO_PREFIX)
    def test_multipart_upload_is_403_and_leaves_nothing(
        self, carol: Any, carol_api: APIClient, spool: Path, path: str
    ) -> None:
        grant(carol, "/srv/carol")
        response = form_upload(carol_api, b"x" * 10_000, path=path)
        assert response.status_code == 403, response.content
        assert isinstance(response.json()["detail"], str)
        assert_nothing_queued(spool)

    @pytest.mark.django_db(transaction=True)
    @pytest.mark.server_env(UPLOADS_BODY_READ_TIMEOUT="3")
    def test_raw_refusal_comes_before_the_body_is_read(
        self, web_server: Server, carol: Any
    ) -> None:
        """The 403 is answered on the headers alone: not one byte of the 100 MB body is sent.
        (If the server waited for the body it would answer 408 after its 3 s read timeout.)"""
        grant(carol, "/srv/carol")
        token = Token.objects.create(user=carol).key
        head = (
            "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
            "X-Container-Name: web1\r\nX-File-Path: /srv/carol/.\r\n"
            "Content-Length: 100000000\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", web_server.port), timeout=30) as sock:
            sock.sendall(head)
            answer = b""
            while not answer.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 403"), answer[:300]
        assert spool_files(web_server.spool) == []


# --- multipart uploads refused for any reason ----------------------------------------------


def csrf_session_client(username: str, password: str) -> APIClient:
    """A logged-in browser session: it holds a CSRF cookie, but the request carries no token."""
    client = APIClient(enforce_csrf_checks=True)
    assert client.login(username=username, password=password)
    client.cookies["csrftoken"] = _get_new_csrf_string()
    return client


class TestMultipartRefusedLeavesNothing:
    def test_csrf_failure_with_session_auth(self, user: Any, spool: Path) -> None:
        """Attack: a logged-in session posts a multipart upload without its CSRF token. The CSRF
        check reads the body to look for the token, so the file parts are spooled before the
        403; they must not stay in the spool with no task."""
        client = csrf_session_client("alice", "pw-alice-123")
        part = io.BytesIO(b"x" * 100_000)
        part.name = "f.bin"
        response = client.post(
            URL,
            {"container": "web1", "path": "/srv/app/f", "file": part},
            format="multipart",
        )
        assert response.status_code == 403
        assert "CSRF" in response.json()["detail"]
        assert_nothing_queued(spool)

    @pytest.mark.parametrize(
        ("fields", "status"),
        [
            ({"container": "db1"}, 403),
            ({"path": "/srv/other/f"}, 403),
            ({"path": "/srv/carol"}, 403),
            ({"sha256": "0" * 64}, 400),
            ({"body": b"x" * 1001}, 413),
        ],
        ids=["no-grant", "outside", "equal-to-prefix", "digest", "over-grant-size"],
    )
    def test_refused_upload(
        self, carol: Any, carol_api: APIClient, spool: Path, fields: dict[str, Any], status: int
    ) -> None:
        grant(carol, "/srv/carol", max_size=1000)
        body = fields.pop("body", b"x" * 1000)
        response = form_upload(carol_api, body, **{"path": "/srv/carol/f", **fields})
        assert response.status_code == status, response.content
        assert_nothing_queued(spool)

    def test_idempotency_key_reused_for_another_destination_is_422(
        self, api: APIClient, spool: Path
    ) -> None:
        """Attack/README: a multipart resend with a used Idempotency-Key to a different
        destination got the first upload back (202 replayed); the README promises 422, as for
        a raw upload. Its part is deleted; a same-destination resend still replays."""
        key = {"HTTP_IDEMPOTENCY_KEY": "deploy-7"}
        first = form_upload(api, b"first", headers=key, path="/srv/app/a.txt")
        assert first.status_code == 202
        task = UploadTask.objects.get()

        other = form_upload(api, b"second", headers=key, path="/srv/app/b.txt")
        assert other.status_code == 422, other.content
        assert str(task.pk) in other.json()["detail"]
        assert UploadTask.objects.count() == 1
        assert spool_files(spool) == [task.spool_name]

        again = form_upload(api, b"third", headers=key, path="/srv/app/a.txt")
        assert again.status_code == 202
        assert again["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == str(task.pk)
        assert spool_files(spool) == [task.spool_name]


def two_parts() -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for name in ("a", "b"):
        parts[name] = io.BytesIO(b"x" * 100_000)
        parts[name].name = f"{name}.bin"
    return parts


class TestMultipartElsewhereLeavesNothing:
    """Beyond the upload endpoint: the spool's upload handler parses every multipart body that
    any view (or the CSRF check before it) reads, so a refusal anywhere must clean up too."""

    @pytest.mark.parametrize("url", ["/admin/login/", "/healthz", "/metrics"])
    def test_anonymous_post_refused_by_csrf(self, spool: Path, url: str) -> None:
        """Attack, no account needed: a multipart POST with a csrftoken cookie of the client's
        own choosing and no token. The CSRF check reads the body to look for the token, so
        every file part (up to 100 per request, each up to the upload size limit) is spooled
        before the 403, and stayed there with no task."""
        client = APIClient(enforce_csrf_checks=True)
        client.cookies["csrftoken"] = _get_new_csrf_string()
        response = client.post(url, two_parts(), format="multipart")
        assert response.status_code == 403
        assert spool_files(spool) == []

    @pytest.mark.parametrize("action", ["retry", "cancel"])
    def test_session_post_to_an_action_refused_by_csrf(
        self, user: Any, spool: Path, action: str
    ) -> None:
        """Attack: a logged-in session posts a multipart body to retry/cancel without its CSRF
        token; the parts stayed in the spool."""
        task = make_task(user)
        client = csrf_session_client("alice", "pw-alice-123")
        response = client.post(f"{URL}{task.pk}/{action}/", two_parts(), format="multipart")
        assert response.status_code == 403
        assert spool_files(spool) == [task.spool_name]
