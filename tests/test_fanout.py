"""One upload, many instances: a list or a glob of instances gets the body once, and one task
per instance. Against the real Incus (the glob is matched against its instances, the files
are checked inside them with the incus CLI) and the real database."""

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from rest_framework.test import APIClient

from tests.conftest import INCUS_SOCKET, ROOT, spool_files, subprocess_env, token_client
from tests.incus_utils import IMAGE, RUNNING, STOPPED, incus, run_in, sha256_in, stat_in
from uploads import queue
from uploads.incus import IncusPusher
from uploads.models import Grant, Outcome, Status, UploadAttempt, UploadBatch, UploadTask
from uploads.queue import Completion, Result
from uploads.selectors import body_kept
from uploads.worker import Worker

pytestmark = [pytest.mark.incus, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _needs_incus(incus: str) -> None:
    """Globs are matched against the real daemon's instances."""


def make_instances(prefix: str, count: int, *, running: int = 0) -> list[str]:
    names = [f"{prefix}-{n:02d}" for n in range(count)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: incus("init", IMAGE, name), names))
        list(pool.map(lambda name: incus("start", name), names[:running]))
    return names


def delete_instances(names: list[str]) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda name: incus("delete", "--force", name, check=False), names))


@pytest.fixture
def three() -> Iterator[list[str]]:
    """Three fresh instances with a common prefix no other test uses: two running, one
    stopped."""
    names = make_instances(f"uploadsvc-fan{uuid.uuid4().hex[:6]}", 3, running=2)
    yield names
    delete_instances(names)


def post(api: APIClient, body: bytes, container: str, path: str, **headers: str) -> Any:
    meta = {f"HTTP_{k.upper()}": v for k, v in headers.items()}
    return api.generic(
        "POST",
        "/api/uploads/",
        body,
        content_type="application/octet-stream",
        HTTP_X_CONTAINER_NAME=container,
        HTTP_X_FILE_PATH=path,
        **meta,
    )


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.content
    data: dict[str, Any] = response.json()
    return data


def run_worker(threads: int = 4) -> None:
    worker = Worker(threads=threads, burst=True, poll_interval=0.05, pusher_factory=IncusPusher)
    assert worker.run() == 0


def file_meta(instance: str, path: str) -> tuple[str, int, int, bytes]:
    """(octal mode, uid, gid, content) of a file as Incus reports it: works for stopped
    instances too, which cannot run `stat`."""

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(INCUS_SOCKET)

    connection = UnixConnection("incus")
    try:
        connection.request("GET", f"/1.0/instances/{instance}/files?path={path}")
        response = connection.getresponse()
        content = response.read()
        assert response.status == 200, content
        mode = int(response.getheader("X-Incus-Mode") or "0", 8)
        uid = int(response.getheader("X-Incus-Uid") or -1)
        gid = int(response.getheader("X-Incus-Gid") or -1)
    finally:
        connection.close()
    return f"{mode:o}", uid, gid, content


# --- accepting ---------------------------------------------------------------------------


def test_a_list_makes_a_batch_with_one_task_per_instance_and_one_body(
    api: APIClient, spool: Path
) -> None:
    body = os.urandom(100_000)
    response = post(api, body, f"{RUNNING}, {STOPPED}", "/srv/app.bin", x_file_mode="0640")
    data = accepted(response)
    assert response["Location"] == f"/api/batches/{data['id']}/"
    assert data["count"] == 2 and data["requested"] == f"{RUNNING},{STOPPED}"
    assert [t["container"] for t in data["tasks"]] == [RUNNING, STOPPED]
    assert {t["batch"] for t in data["tasks"]} == {data["id"]}
    assert {(t["path"], t["mode"], t["sha256"]) for t in data["tasks"]} == {
        ("/srv/app.bin", "0640", hashlib.sha256(body).hexdigest())
    }
    assert data["counts"]["pending"] == 2 and data["finished"] is False
    # Received and stored once: one spool file that both tasks refer to.
    names = set(UploadTask.objects.values_list("spool_name", flat=True))
    assert len(names) == 1 and spool_files(spool) == sorted(names)
    assert not UploadTask.objects.filter(body__isnull=False).exists()


def test_small_bodies_travel_in_the_rows_while_the_copies_together_stay_small(
    api: APIClient, spool: Path
) -> None:
    small = accepted(post(api, b"x" * 1000, f"{RUNNING},{STOPPED}", "/srv/small.txt"))
    tasks = UploadTask.objects.filter(batch=small["id"])
    assert [bytes(t.body) for t in tasks] == [b"x" * 1000] * 2
    assert spool_files(spool) == []
    # 2 × 40 KiB is over UPLOADS['INLINE_MAX_BYTES'] (64 KiB): the body is kept once.
    larger = accepted(post(api, b"y" * 40_000, f"{RUNNING},{STOPPED}", "/srv/larger.txt"))
    tasks = UploadTask.objects.filter(batch=larger["id"])
    assert {(t.body, t.spool_name) for t in tasks} == {(None, spool_files(spool)[0])}


def test_a_glob_expands_to_the_granted_instances_in_name_order(
    three: list[str], django_user_model: Any
) -> None:
    carol = django_user_model.objects.create_user(username="carol")
    for name in three[:2]:
        Grant.objects.create(user=carol, instance_glob=name, path_prefixes=["/srv"])
    prefix = three[0].rsplit("-", 1)[0]
    data = accepted(post(token_client(carol), b"conf\n", f"{prefix}-*", "/srv/app.conf"))
    # The third instance exists and matches, but carol may not write there: left out.
    assert [t["container"] for t in data["tasks"]] == three[:2]
    assert UploadBatch.objects.get().requested == f"{prefix}-*"
    # A glob that keeps nothing is a 404 naming it.
    response = post(token_client(carol), b"conf\n", f"{prefix}-0[2-9]", "/srv/app.conf")
    assert response.status_code == 404
    assert f"'{prefix}-0[2-9]'" in response.json()["detail"]
    # So is one outside the granted directories: there too, no instance may be written.
    response = post(token_client(carol), b"conf\n", f"{prefix}-*", "/etc/app.conf")
    assert response.status_code == 404
    assert UploadTask.objects.count() == 2


def test_a_named_instance_without_a_grant_refuses_the_whole_upload_before_the_body(
    three: list[str], django_user_model: Any, spool: Path
) -> None:
    carol = django_user_model.objects.create_user(username="carol")
    Grant.objects.create(user=carol, instance_glob=three[0])
    prefix = three[0].rsplit("-", 1)[0]
    # Content-Length promises a body never sent: a refusal must come without reading it.
    response = token_client(carol).generic(
        "POST",
        "/api/uploads/",
        b"",
        content_type="application/octet-stream",
        CONTENT_LENGTH="5000000",
        HTTP_X_CONTAINER_NAME=f"{prefix}-*,{three[2]},{three[1]}",
        HTTP_X_FILE_PATH="/srv/app.conf",
    )
    assert response.status_code == 403
    detail = response.json()["detail"]
    assert detail.startswith(f"refused for {three[2]}, {three[1]} (")
    assert "nothing was queued" in detail
    assert not UploadTask.objects.exists() and not UploadBatch.objects.exists()
    assert spool_files(spool) == []


def test_names_and_globs_are_checked_before_anything_is_read(api: APIClient, settings: Any) -> None:
    for container, field_error in (
        ("web1,,web2", "An empty instance name in the list."),
        ("web1,-bad", "'-bad' is not a valid Incus instance name"),
        ("web_*", "'web_*' is not a glob over instance names"),
    ):
        response = post(api, b"x", container, "/srv/x")
        assert response.status_code == 400
        assert response.json()["container"][0].startswith(field_error)
    settings.UPLOADS = {**settings.UPLOADS, "MAX_FANOUT": 2}
    response = post(api, b"x", "web1,web2,web3", "/srv/x")
    assert response.status_code == 400
    assert response.json() == {
        "container": ["3 destinations; one upload goes to at most 2 instances"]
    }
    response = post(api, b"x", "web-*", "/srv/x", x_incus_project="no-such-project")
    assert response.status_code == 404
    assert response.json()["detail"] == "project 'no-such-project' does not exist on remote 'local'"
    assert not UploadTask.objects.exists()


def test_multipart_takes_repeated_container_fields(api: APIClient, spool: Path) -> None:
    response = api.post(
        "/api/uploads/",
        {
            "file": SimpleUploadedFile("app.conf", b"conf\n"),
            "container": [RUNNING, STOPPED],
            "path": "/srv/app.conf",
        },
        format="multipart",
    )
    data = accepted(response)
    assert [t["container"] for t in data["tasks"]] == [RUNNING, STOPPED]
    assert [t["filename"] for t in data["tasks"]] == ["app.conf"] * 2
    assert len(spool_files(spool)) == 1


def test_one_name_answers_with_the_task_as_before(api: APIClient) -> None:
    response = post(api, b"x", f" {RUNNING} ", "/srv/x")
    data = accepted(response)
    assert response["Location"] == f"/api/uploads/{data['id']}/"
    assert data["container"] == RUNNING and data["batch"] is None
    assert not UploadBatch.objects.exists()


def test_a_resend_gets_the_batch_back_and_another_destination_is_422(
    api: APIClient, spool: Path
) -> None:
    sent = {"x_file_mode": "0600", "idempotency_key": "deploy-42"}
    first = accepted(post(api, os.urandom(70_000), f"{RUNNING},{STOPPED}", "/srv/a", **sent))
    again = post(api, b"", f"{RUNNING},{STOPPED}", "/srv/a", **sent)
    assert again.status_code == 202 and again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first["id"]
    assert UploadTask.objects.count() == 2 and len(spool_files(spool)) == 1
    other = post(api, b"", RUNNING, "/srv/a", **sent)
    assert other.status_code == 422
    assert f"batch {first['id']}" in other.json()["detail"]
    single = accepted(post(api, b"1", RUNNING, "/srv/b", idempotency_key="one"))
    assert post(api, b"", f"{RUNNING},{STOPPED}", "/srv/b", idempotency_key="one").json() == {
        "detail": f"This Idempotency-Key was used for upload {single['id']} to "
        f"local:default/{RUNNING}:/srv/b; use a new key for a different upload."
    }


# --- reading -------------------------------------------------------------------------------


def test_a_batch_shows_its_tasks_and_counts_to_its_owner_and_permitted_staff(
    api: APIClient, other_user: Any, staff_user: Any
) -> None:
    data = accepted(post(api, b"x", f"{RUNNING},{STOPPED}", "/srv/x"))
    single = accepted(post(api, b"x", RUNNING, "/srv/y"))
    claim = next(c for c in queue.claim(worker_id="w", limit=3) if c.task.instance == STOPPED)
    queue.complete([Completion(claim, Result.PERMANENT, "no")])
    shown = api.get(f"/api/batches/{data['id']}/").json()
    assert shown["counts"]["failed"] == 1 and shown["finished"] is False
    assert [t["container"] for t in shown["tasks"]] == [RUNNING, STOPPED]
    listed = api.get(f"/api/uploads/?batch={data['id']}").json()
    assert sorted(t["container"] for t in listed["results"]) == [RUNNING, STOPPED]
    assert single["id"] not in {t["id"] for t in listed["results"]}
    assert token_client(other_user).get(f"/api/batches/{data['id']}/").status_code == 404
    assert token_client(staff_user).get(f"/api/batches/{data['id']}/").status_code == 404
    staff_user.user_permissions.add(Permission.objects.get(codename="view_uploadtask"))
    assert token_client(staff_user).get(f"/api/batches/{data['id']}/").status_code == 200
    assert api.get("/api/batches/not-an-id/").status_code == 404


def test_waiting_for_a_batch_ends_when_every_task_finished(api: APIClient) -> None:
    data = accepted(post(api, b"x", f"{RUNNING},{STOPPED}", "/srv/x"))
    claims = queue.claim(worker_id="w", limit=2)
    queue.complete([Completion(claims[0], Result.SUCCEEDED)])
    held = api.get(f"/api/batches/{data['id']}/?wait=1")
    assert held["Wait-Timed-Out"] == "true" and held.json()["finished"] is False

    # A worker finishes the other one while the request waits.
    def finish() -> None:
        time.sleep(0.5)
        try:
            queue.complete([Completion(claims[1], Result.PERMANENT, "no")])
        finally:
            connection.close()

    worker = threading.Thread(target=finish)
    worker.start()
    try:
        done = api.get(f"/api/batches/{data['id']}/?wait=30")
    finally:
        worker.join()
    assert "Wait-Timed-Out" not in done and done.json()["finished"] is True
    assert done.json()["counts"] == {
        "pending": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }


# --- delivering ----------------------------------------------------------------------------


def test_three_instances_by_list_and_by_glob_get_the_same_file(
    api: APIClient, three: list[str], spool: Path
) -> None:
    body = os.urandom(200_000)
    prefix = three[0].rsplit("-", 1)[0]
    headers = {"x_file_mode": "0640", "x_file_uid": "1000", "x_file_gid": "1000"}
    by_list = accepted(post(api, body, ",".join(three), "/root/list.bin", **headers))
    by_glob = accepted(post(api, body, f"{prefix}-*", "/root/glob.bin", **headers))
    assert [t["container"] for t in by_glob["tasks"]] == three
    run_worker()
    for batch in (by_list, by_glob):
        assert api.get(f"/api/batches/{batch['id']}/").json()["counts"]["succeeded"] == 3
    assert (
        subprocess.run(  # the third is stopped, and stays so
            ["incus", "list", three[2], "--format", "csv", "--columns", "s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        == "STOPPED"
    )
    for name in three:
        for path in ("/root/list.bin", "/root/glob.bin"):
            mode, uid, gid, content = file_meta(name, path)
            assert (mode, uid, gid) == ("640", 1000, 1000)
            assert content == body
    assert stat_in(three[0], "/root/list.bin") == ("640", 1000, 1000, len(body))
    assert spool_files(spool) == []  # every task succeeded: the one body each is gone


def test_one_failing_destination_keeps_the_body_for_its_retry(
    api: APIClient, three: list[str], spool: Path
) -> None:
    directory = f"/srv/fan-{uuid.uuid4().hex[:8]}"
    for name in three[:2]:
        run_in(name, "mkdir", "-p", directory)
    body = os.urandom(100_000)
    data = accepted(post(api, body, ",".join(three), f"{directory}/app.bin"))
    run_worker()
    tasks = {t.instance: t for t in UploadTask.objects.filter(batch=data["id"])}
    assert [tasks[n].status for n in three] == [Status.SUCCEEDED, Status.SUCCEEDED, Status.FAILED]
    assert tasks[three[2]].last_error == (
        f"parent directory {directory} does not exist in {three[2]} (set create_dirs)"
    )
    assert sha256_in(three[0], f"{directory}/app.bin") == hashlib.sha256(body).hexdigest()
    # The failed one may still be retried: the shared body stays.
    assert body_kept(tasks[three[2]]) and len(spool_files(spool)) == 1
    retried = api.post(f"/api/uploads/{tasks[three[2]].pk}/retry/", {"create_dirs": True})
    assert retried.status_code == 200, retried.content
    run_worker()
    tasks[three[2]].refresh_from_db()
    assert tasks[three[2]].status == Status.SUCCEEDED and tasks[three[2]].attempts == 2
    assert sha256_in(three[2], f"{directory}/app.bin") == hashlib.sha256(body).hexdigest()
    assert spool_files(spool) == []  # the last success freed it
    batch = api.get(f"/api/batches/{data['id']}/").json()
    assert batch["finished"] is True and batch["counts"]["succeeded"] == 3


def test_two_worker_processes_deliver_a_50_instance_fanout_exactly_once_each(
    api: APIClient, spool: Path, tmp_path: Path
) -> None:
    prefix = f"uploadsvc-fan{uuid.uuid4().hex[:6]}"
    names = make_instances(prefix, 50)
    try:
        body = os.urandom(300_000)
        data = accepted(post(api, body, f"{prefix}-*", "/root/fan.bin"))
        assert data["count"] == 50
        log = tmp_path / "workers.log"
        with open(log, "ab") as out:
            workers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "manage.py",
                        "run_push_workers",
                        "--threads",
                        "4",
                        "--burst",
                        "--poll-interval",
                        "0.1",
                    ],
                    cwd=ROOT,
                    env=subprocess_env(spool),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
                for _ in range(2)
            ]
            try:
                for proc in workers:
                    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            finally:
                for proc in workers:
                    proc.kill()
        tasks = UploadTask.objects.filter(batch=data["id"])
        assert sorted(tasks.values_list("instance", flat=True)) == names
        assert set(tasks.values_list("status", "attempts")) == {(Status.SUCCEEDED, 1)}
        assert UploadAttempt.objects.count() == 50
        assert set(UploadAttempt.objects.values_list("outcome", flat=True)) == {Outcome.SUCCEEDED}
        assert len(set(UploadAttempt.objects.values_list("worker_id", flat=True))) == 2
        digest = hashlib.sha256(body).hexdigest()
        with ThreadPoolExecutor(4) as pool:
            landed = list(pool.map(lambda name: sha256_in(name, "/root/fan.bin"), names))
        assert landed == [digest] * 50
        assert spool_files(spool) == []
    finally:
        delete_instances(names)


def test_grants_changed_since_they_were_cached_are_read_again(
    django_user_model: Any, spool: Path
) -> None:
    carol = django_user_model.objects.create_user(username="carol")
    for name in ("web1", "web2"):
        Grant.objects.create(user=carol, instance_glob=name)
    client = token_client(carol)
    accepted(post(client, b"x", "web1,web2", "/srv/a"))  # her grants are cached from here on
    Grant.objects.filter(instance_glob="web2").delete()  # in another process, say
    body = os.urandom(100_000)
    response = post(client, body, "web1,web2", "/srv/b")
    # The cached grants allowed it; the INSERT found them stale; the fresh ones refuse web2.
    assert response.status_code == 403
    assert response.json()["detail"].startswith("refused for web2 (")
    assert UploadTask.objects.count() == 2 and len(spool_files(spool)) == 0
    Grant.objects.create(user=carol, instance_glob="web3")
    assert accepted(post(client, body, "web1,web3", "/srv/c"))["count"] == 2
    assert len(spool_files(spool)) == 1
