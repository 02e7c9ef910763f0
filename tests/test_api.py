"""The upload API through Django's test client: contract, bad input, ownership, retry/cancel."""

import hashlib
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from tests.api_utils import INLINE_MAX, URL, assert_nothing_queued, form_upload, raw_upload
from tests.conftest import spool_files, token_client
from uploads.models import Status, UploadTask

pytestmark = pytest.mark.django_db


class TestAccepted:
    def test_raw_upload_answers_202_with_location_and_task(
        self, api: APIClient, spool: Path
    ) -> None:
        # Larger than the 4 MiB hashed inline: the rest is hashed on the helper thread.
        body = bytes(range(256)) * 40_000
        response = raw_upload(
            api,
            body,
            x_host_path="/home/me/build/app.tar",
            x_file_mode="0640",
            x_file_uid="1000",
            x_file_gid="1000",
            x_create_dirs="true",
            x_incus_project="staging",
        )
        assert response.status_code == 202, response.content
        data = response.json()
        assert response["Location"] == f"/api/uploads/{data['id']}/"
        assert data["status"] == "pending"
        assert data["container"] == "web1"
        assert data["project"] == "staging"
        assert data["path"] == "/srv/app/hello.txt"
        assert data["filename"] == "app.tar"
        assert data["size"] == len(body)
        assert data["sha256"] == hashlib.sha256(body).hexdigest()
        assert data["mode"] == "0640"
        assert (data["uid"], data["gid"], data["create_dirs"]) == (1000, 1000, True)
        assert data["attempts"] == 0 and data["max_attempts"] == 5
        assert data["url"].endswith(response["Location"])
        task = UploadTask.objects.get()
        assert (spool / task.spool_name).read_bytes() == body
        assert spool_files(spool) == [task.spool_name]

    def test_multipart_upload_answers_202(self, api: APIClient, spool: Path) -> None:
        body = b"\x00\x01binary" * 1_200_000
        response = form_upload(api, body, mode="755", uid="0", create_dirs="true")
        assert response.status_code == 202, response.content
        data = response.json()
        assert data["size"] == len(body)
        assert data["sha256"] == hashlib.sha256(body).hexdigest()
        assert data["filename"] == "local-name.txt"
        assert data["mode"] == "0755"
        assert data["create_dirs"] is True
        task = UploadTask.objects.get()
        assert (spool / task.spool_name).read_bytes() == body
        assert spool_files(spool) == [task.spool_name]

    def test_empty_file_is_a_valid_upload(self, api: APIClient) -> None:
        # The test client omits Content-Length for an empty body; real clients send 0.
        response = raw_upload(api, b"", content_length="0")
        assert response.status_code == 202
        assert response.json()["size"] == 0

    def test_path_is_normalised_like_filepath_clean(self, api: APIClient) -> None:
        response = raw_upload(api, x_file_path="//srv/./app/../www//index.html")
        assert response.status_code == 202
        assert response.json()["path"] == "/srv/www/index.html"

    def test_spool_name_never_comes_from_client_input(self, api: APIClient, spool: Path) -> None:
        body = b"x" * (INLINE_MAX + 1)  # large enough for a spool file
        response = raw_upload(api, body, x_host_path="../../etc/passwd", x_file_path="/tmp/../../x")
        assert response.status_code == 202
        (name,) = spool_files(spool)
        assert name == UploadTask.objects.get().spool_name
        assert len(name) == 32 and "passwd" not in name

    def test_anonymous_gets_401(self, spool: Path) -> None:
        response = raw_upload(APIClient())
        assert response.status_code == 401
        assert "detail" in response.json()
        assert_nothing_queued(spool)


BAD_HEADERS = [
    ({"x_container_name": None}, "container"),
    ({"x_container_name": "  "}, "container"),
    ({"x_file_path": None}, "path"),
    ({"x_file_path": ""}, "path"),
    ({"x_container_name": "1web"}, "container"),
    ({"x_container_name": "-web"}, "container"),
    ({"x_container_name": "web-"}, "container"),
    ({"x_container_name": "web_1"}, "container"),
    ({"x_container_name": "w" * 64}, "container"),
    ({"x_file_path": "relative/path"}, "path"),
    ({"x_file_path": "/srv/app/"}, "path"),
    ({"x_file_path": "/"}, "path"),
    ({"x_file_path": "/srv/" + "a" * 4096}, "path"),
    ({"x_file_mode": "999"}, "mode"),
    ({"x_file_mode": "10000"}, "mode"),
    ({"x_file_mode": "rw-r--r--"}, "mode"),
    ({"x_file_uid": "-1"}, "uid"),
    ({"x_file_uid": "4294967296"}, "uid"),
    ({"x_file_gid": "abc"}, "gid"),
    ({"x_create_dirs": "maybe"}, "create_dirs"),
    ({"x_incus_project": "bad/project"}, "project"),
]


class TestBadInput:
    @pytest.mark.parametrize(("headers", "field"), BAD_HEADERS)
    def test_raw_bad_parameter_is_400_naming_the_field(
        self, api: APIClient, spool: Path, headers: dict[str, str | None], field: str
    ) -> None:
        response = raw_upload(api, b"data", **headers)  # type: ignore[arg-type]
        assert response.status_code == 400, response.content
        assert field in response.json()
        assert_nothing_queued(spool)

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"container": None}, "container"),
            ({"path": "/srv/a\x00b"}, "path"),
            ({"path": "etc/passwd"}, "path"),
            ({"mode": "0o800"}, "mode"),
            ({"uid": "4294967296"}, "uid"),
        ],
    )
    def test_multipart_bad_parameter_is_400_and_spool_cleaned(
        self, api: APIClient, spool: Path, fields: dict[str, Any], field: str
    ) -> None:
        response = form_upload(api, b"data" * 1000, **fields)
        assert response.status_code == 400, response.content
        assert field in response.json()
        assert_nothing_queued(spool)

    def test_multipart_without_file_is_400(self, api: APIClient, spool: Path) -> None:
        response = form_upload(api, None)
        assert response.status_code == 400
        assert "file" in response.json()
        assert_nothing_queued(spool)

    def test_multipart_extra_file_parts_are_not_kept(self, api: APIClient, spool: Path) -> None:
        import io

        extra = io.BytesIO(b"other")
        extra.name = "other.bin"
        main = io.BytesIO(b"main")
        main.name = "main.bin"
        response = api.post(
            URL,
            {"container": "web1", "path": "/srv/x", "file": main, "other": extra},
            format="multipart",
        )
        assert response.status_code == 202
        assert spool_files(spool) == [UploadTask.objects.get().spool_name]

    def test_form_urlencoded_is_415(self, api: APIClient, spool: Path) -> None:
        response = api.post(
            URL, "container=web1&path=/x", content_type="application/x-www-form-urlencoded"
        )
        assert response.status_code == 415
        assert "multipart/form-data" in response.json()["detail"]
        assert_nothing_queued(spool)

    def test_over_maximum_size_is_413_before_reading(
        self, api: APIClient, spool: Path, settings: Any
    ) -> None:
        settings.UPLOADS = {**settings.UPLOADS, "MAX_UPLOAD_SIZE": 1000}
        response = raw_upload(api, b"x" * 1001)
        assert response.status_code == 413
        assert "1000" in response.json()["detail"]
        assert_nothing_queued(spool)
        response = form_upload(api, b"x" * 2000)
        assert response.status_code == 413
        assert_nothing_queued(spool)

    def test_no_room_on_spool_filesystem_is_507(
        self, api: APIClient, spool: Path, settings: Any
    ) -> None:
        # A reserve larger than any disk: the real free-space check must refuse. A small body
        # needs no room there: it travels in its task's row.
        settings.UPLOADS = {**settings.UPLOADS, "SPOOL_RESERVE_BYTES": 10**18}
        response = raw_upload(api, b"x" * (INLINE_MAX + 1))
        assert response.status_code == 507
        assert "detail" in response.json()
        assert_nothing_queued(spool)
        assert raw_upload(api).status_code == 202

    @pytest.mark.parametrize("size", [6, INLINE_MAX + 1])
    def test_a_database_failure_while_queueing_is_503_and_leaves_nothing(
        self, api: APIClient, spool: Path, monkeypatch: pytest.MonkeyPatch, size: int
    ) -> None:
        # Injected fault (a real database cannot be made to fail at one statement on demand):
        # the task's INSERT fails. The client hears 503 and finds nothing queued and no spooled
        # file (a small body would have travelled in the row, a larger one is in the spool).
        from django.db import OperationalError

        from uploads import queue

        def lost_connection(*args: Any, **kwargs: Any) -> None:
            raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(queue, "enqueue", lost_connection)
        response = raw_upload(api, b"x" * size)
        assert response.status_code == 503
        assert "detail" in response.json()
        assert_nothing_queued(spool)

    def test_full_queue_is_503_with_retry_after(
        self, api: APIClient, spool: Path, settings: Any, user: Any
    ) -> None:
        settings.UPLOADS = {**settings.UPLOADS, "MAX_PENDING": 1, "RETRY_AFTER_SECONDS": 7}
        assert raw_upload(api).status_code == 202
        response = raw_upload(api)
        assert response.status_code == 503
        assert response["Retry-After"] == "7"
        assert "try again" in response.json()["detail"]
        assert UploadTask.objects.count() == 1
        assert spool_files(spool) == []  # the small body travels in its row


class TestReading:
    def test_detail_and_list_with_filters(self, api: APIClient, user: Any) -> None:
        first = raw_upload(api, x_container_name="web1").json()
        second = raw_upload(api, x_container_name="db1").json()
        UploadTask.objects.filter(pk=first["id"]).update(status=Status.FAILED)

        detail = api.get(f"{URL}{first['id']}/")
        assert detail.status_code == 200
        assert detail.json()["status"] == "failed"

        listing = api.get(URL).json()
        assert listing["count"] == 2
        assert {"next", "previous", "results"} <= set(listing)
        assert [t["id"] for t in listing["results"]] == [second["id"], first["id"]]

        assert [t["id"] for t in api.get(URL, {"status": "failed"}).json()["results"]] == [
            first["id"]
        ]
        assert [t["id"] for t in api.get(URL, {"container": "db1"}).json()["results"]] == [
            second["id"]
        ]
        assert api.get(URL, {"status": "lost"}).status_code == 400

    def test_unknown_or_malformed_id_is_404_in_json(self, api: APIClient) -> None:
        for url in (f"{URL}00000000-0000-0000-0000-000000000000/", f"{URL}not-a-uuid/", "/api/no"):
            response = api.get(url)
            assert response.status_code == 404
            assert response["Content-Type"] == "application/json"
            assert "detail" in response.json()
        assert "html" in api.get("/admin/no-such-page/").get("Content-Type", "")


class TestBearer:
    def test_a_token_may_come_as_bearer(self, user: Any) -> None:
        from rest_framework.authtoken.models import Token

        key = Token.objects.create(user=user).key
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
        assert client.get(URL).status_code == 200
        assert raw_upload(client).status_code == 202
        client.credentials(HTTP_AUTHORIZATION="Bearer not-a-token")
        assert client.get(URL).status_code == 401
        assert raw_upload(client).status_code == 401


class TestOwnership:
    def test_other_users_tasks_are_404_and_staff_follow_model_permissions(
        self, api: APIClient, other_user: Any, staff_user: Any
    ) -> None:
        task = raw_upload(api).json()
        bob = token_client(other_user)
        assert bob.get(f"{URL}{task['id']}/").status_code == 404
        assert bob.post(f"{URL}{task['id']}/cancel/").status_code == 404
        assert bob.post(f"{URL}{task['id']}/retry/").status_code == 404
        assert bob.get(URL).json()["count"] == 0
        assert UploadTask.objects.get().status == Status.PENDING

        staff = token_client(staff_user)
        assert staff.get(f"{URL}{task['id']}/").status_code == 404  # staff alone is not enough
        assert staff.get(URL).json()["count"] == 0
        staff_user.user_permissions.add(Permission.objects.get(codename="view_uploadtask"))
        assert staff.get(f"{URL}{task['id']}/").status_code == 200
        assert staff.get(URL).json()["count"] == 1
        refused = staff.post(f"{URL}{task['id']}/cancel/")
        assert refused.status_code == 403
        assert "permission to change uploads" in refused.json()["detail"]
        staff_user.user_permissions.add(Permission.objects.get(codename="change_uploadtask"))
        assert staff.post(f"{URL}{task['id']}/cancel/").json()["status"] == "cancelled"


class TestRetryAndCancel:
    def test_cancel_pending_keeps_the_spool_file_for_a_retry(
        self, api: APIClient, spool: Path
    ) -> None:
        task = raw_upload(api, b"x" * (INLINE_MAX + 1)).json()
        response = api.post(f"{URL}{task['id']}/cancel/")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        assert response.json()["finished_at"] is not None
        assert spool_files(spool) == [UploadTask.objects.get().spool_name]
        again = api.post(f"{URL}{task['id']}/cancel/")
        assert again.status_code == 409
        assert "pending" in again.json()["detail"]

    def test_retry_failed_task_grants_another_attempt(self, api: APIClient) -> None:
        task = raw_upload(api).json()
        UploadTask.objects.filter(pk=task["id"]).update(
            status=Status.FAILED, attempts=5, last_error="boom"
        )
        response = api.post(f"{URL}{task['id']}/retry/")
        assert response.status_code == 200
        data = response.json()
        assert data["status"] == "pending"
        assert data["max_attempts"] == 6
        assert data["attempts"] == 5

    def test_retry_pending_or_succeeded_is_409(self, api: APIClient) -> None:
        task = raw_upload(api).json()
        assert api.post(f"{URL}{task['id']}/retry/").status_code == 409
        UploadTask.objects.filter(pk=task["id"]).update(status=Status.SUCCEEDED)
        response = api.post(f"{URL}{task['id']}/retry/")
        assert response.status_code == 409
        assert "failed or cancelled" in response.json()["detail"]

    def test_a_cancelled_upload_can_be_retried(self, api: APIClient) -> None:
        task = raw_upload(api).json()
        api.post(f"{URL}{task['id']}/cancel/")
        response = api.post(f"{URL}{task['id']}/retry/")
        assert response.status_code == 200
        assert response.json()["status"] == "pending"

    def test_retry_without_spool_file_is_410(self, api: APIClient, spool: Path) -> None:
        task = raw_upload(api, b"x" * (INLINE_MAX + 1)).json()
        api.post(f"{URL}{task['id']}/cancel/")
        (spool / UploadTask.objects.get().spool_name).unlink()
        response = api.post(f"{URL}{task['id']}/retry/")
        assert response.status_code == 410
        assert "upload it again" in response.json()["detail"]
        assert UploadTask.objects.get().status == Status.CANCELLED


class TestSessionAuth:
    def test_session_upload_needs_csrf_token(self, user: Any, spool: Path) -> None:
        client = APIClient(enforce_csrf_checks=True)
        client.login(username="alice", password="pw-alice-123")
        response = raw_upload(client)
        assert response.status_code == 403
        assert "CSRF" in response.json()["detail"]
        assert_nothing_queued(spool)

        client.get("/api/uploads/")
        token = client.cookies["csrftoken"].value if "csrftoken" in client.cookies else None
        if token is None:
            from django.middleware.csrf import _get_new_csrf_string

            token = _get_new_csrf_string()
            client.cookies["csrftoken"] = token
        response = raw_upload(client, x_csrftoken=token)
        assert response.status_code == 202

    def test_session_multipart_upload_with_csrf(self, user: Any, spool: Path) -> None:
        from django.middleware.csrf import _get_new_csrf_string

        client = APIClient(enforce_csrf_checks=True)
        client.login(username="alice", password="pw-alice-123")
        token = _get_new_csrf_string()
        client.cookies["csrftoken"] = token
        import io

        upload = io.BytesIO(b"abc" * 1000)
        upload.name = "f.bin"
        response = client.post(
            URL,
            {"container": "web1", "path": "/srv/f", "file": upload, "csrfmiddlewaretoken": token},
            format="multipart",
        )
        assert response.status_code == 202, response.content
        assert response.json()["size"] == 3000
        assert spool_files(spool) == [UploadTask.objects.get().spool_name]

    def test_a_multipart_upload_refused_by_the_csrf_check_leaves_nothing(
        self, user: Any, spool: Path
    ) -> None:
        """The CSRF check reads the form, looking for the token, before the view runs: its file
        is in the spool by the time the request is refused."""
        from django.middleware.csrf import _get_new_csrf_string

        client = APIClient(enforce_csrf_checks=True)
        client.login(username="alice", password="pw-alice-123")
        client.cookies["csrftoken"] = _get_new_csrf_string()
        response = form_upload(client, csrfmiddlewaretoken=_get_new_csrf_string())
        assert response.status_code == 403
        assert "CSRF" in response.json()["detail"]
        assert_nothing_queued(spool)

    def test_forms_posted_elsewhere_never_reach_the_spool(self, spool: Path) -> None:
        import io

        upload = io.BytesIO(b"not an upload")
        upload.name = "f.bin"
        response = APIClient().post("/admin/login/", {"file": upload}, format="multipart")
        assert response.status_code in (200, 403)
        assert spool_files(spool) == []


class TestSchema:
    def test_openapi_schema_and_docs(self, api: APIClient) -> None:
        schema = api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
        assert schema.status_code == 200
        paths = schema.json()["paths"]
        assert "/api/uploads/" in paths and "/api/uploads/{id}/retry/" in paths
        upload = paths["/api/uploads/"]["post"]
        form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        assert {"file", "container", "path", "mode", "uid", "gid", "create_dirs"} <= set(form)
        assert {"project", "remote", "sha256"} <= set(form)
        statuses = {"202", "400", "401", "403", "408", "411", "413", "415", "422", "503", "507"}
        assert set(upload["responses"]) == statuses | {"404"}  # a glob that matched nothing
        accepted = upload["responses"]["202"]["content"]["application/json"]["schema"]
        assert accepted == {"$ref": "#/components/schemas/Accepted"}  # a task, or a batch
        batch = paths["/api/batches/{id}/"]["get"]
        assert "wait" in {p["name"] for p in batch["parameters"]}
        retry = paths["/api/uploads/{id}/retry/"]["post"]
        assert {"200", "403", "404", "409", "410"} <= set(retry["responses"])
        wait = paths["/api/uploads/{id}/"]["get"]["parameters"]
        assert "wait" in {p["name"] for p in wait}
        docs = api.get("/api/docs/")
        assert docs.status_code == 200
        assert b"cdn.jsdelivr" not in docs.content  # assets are served locally


class TestDigests:
    BODY = b"integrity matters\n"

    def digest(self) -> str:
        return hashlib.sha256(self.BODY).hexdigest()

    def test_matching_digests_are_accepted(self, api: APIClient) -> None:
        import base64

        b64 = base64.b64encode(bytes.fromhex(self.digest())).decode()
        assert (
            raw_upload(api, self.BODY, repr_digest=f"sha-512=:AAAA:, sha-256=:{b64}:").status_code
            == 202
        )
        assert raw_upload(api, self.BODY, x_content_sha256=self.digest().upper()).status_code == 202
        assert form_upload(api, self.BODY, sha256=self.digest()).status_code == 202

    @pytest.mark.parametrize(
        "headers",
        [
            {"x_content_sha256": "0" * 64},
            {"repr_digest": "sha-256=:" + "A" * 43 + "=:"},
            {"repr_digest": "sha-256=abc"},
            {"x_content_sha256": "xyz"},
        ],
    )
    def test_wrong_or_malformed_digest_is_400_and_nothing_queued(
        self, api: APIClient, spool: Path, headers: dict[str, str]
    ) -> None:
        response = raw_upload(api, self.BODY, **headers)
        assert response.status_code == 400
        assert {"sha256", "Repr-Digest"} & set(response.json())
        assert_nothing_queued(spool)

    def test_wrong_multipart_digest_is_400(self, api: APIClient, spool: Path) -> None:
        response = form_upload(api, self.BODY, sha256="f" * 64)
        assert response.status_code == 400
        assert "as announced" in response.json()["sha256"][0]
        assert_nothing_queued(spool)


class TestIdempotencyKey:
    """A client that lost the answer (a timeout, a 503 during a restart) resends with the same
    Idempotency-Key and gets the first upload back instead of a second delivery."""

    def test_a_resend_gets_the_first_task_and_queues_nothing_more(
        self, api: APIClient, spool: Path
    ) -> None:
        first = raw_upload(api, idempotency_key="build-1234")
        assert first.status_code == 202
        assert first.json()["idempotency_key"] == "build-1234"
        assert "Idempotent-Replayed" not in first
        again = raw_upload(api, idempotency_key='"build-1234"')  # the quoted form is the same key
        assert again.status_code == 202
        assert again["Idempotent-Replayed"] == "true"
        assert again["Location"] == first["Location"]
        assert again.json()["id"] == first.json()["id"]
        assert UploadTask.objects.count() == 1
        assert spool_files(spool) == []

    def test_multipart_resend_gets_the_first_task_and_its_part_is_not_kept(
        self, api: APIClient, spool: Path
    ) -> None:
        key = {"HTTP_IDEMPOTENCY_KEY": "k-1"}
        first = form_upload(api, headers=key)
        again = form_upload(api, b"other bytes", headers=key)
        assert again.status_code == 202
        assert again["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
        assert spool_files(spool) == [UploadTask.objects.get().spool_name]

    def test_a_multipart_key_reused_for_another_destination_is_422(
        self, api: APIClient, spool: Path
    ) -> None:
        key = {"HTTP_IDEMPOTENCY_KEY": "k-3"}
        first = form_upload(api, headers=key).json()
        response = form_upload(api, headers=key, path="/srv/app/other.txt")
        assert response.status_code == 422
        assert first["id"] in response.json()["detail"]
        assert spool_files(spool) == [UploadTask.objects.get().spool_name]

    def test_keys_belong_to_their_owner(self, api: APIClient, other_user: Any, spool: Path) -> None:
        mine = raw_upload(api, idempotency_key="same").json()["id"]
        theirs = raw_upload(token_client(other_user), idempotency_key="same").json()["id"]
        assert mine != theirs
        assert UploadTask.objects.count() == 2

    def test_a_key_reused_for_another_destination_is_422(self, api: APIClient, spool: Path) -> None:
        first = raw_upload(api, idempotency_key="k-2").json()
        response = raw_upload(api, idempotency_key="k-2", x_file_path="/srv/app/other.txt")
        assert response.status_code == 422
        assert first["id"] in response.json()["detail"]
        assert UploadTask.objects.count() == 1
        assert spool_files(spool) == []

    @pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
    def test_a_malformed_key_is_400(self, api: APIClient, spool: Path, key: str) -> None:
        response = raw_upload(api, idempotency_key=key)
        assert response.status_code == 400
        assert "Idempotency-Key" in response.json()
        assert_nothing_queued(spool)

    def test_two_resends_racing_past_the_look_up_make_one_task(
        self, user: Any, spool: Path
    ) -> None:
        # The second INSERT hits the unique constraint: the service hands back the first task
        # and deletes the second spool file.
        from tests.factories import spooled
        from uploads import services

        params = {"instance": "web1", "path": "/srv/app/x", "idempotency_key": "race"}
        first = services.upload_create(owner=user, spooled=spooled(b"one"), **params)
        with pytest.raises(services.DuplicateUpload) as raised:
            services.upload_create(owner=user, spooled=spooled(b"two"), **params)
        assert raised.value.task.pk == first.pk
        assert spool_files(spool) == [first.spool_name]
