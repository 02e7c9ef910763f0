"""Health, metrics, worker heartbeats, JSON logs, and clients that stall mid-body."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.api_utils import raw_upload
from tests.conftest import ROOT, Server, spool_files, subprocess_env
from tests.factories import make_task
from uploads.models import Status, UploadTask, WorkerHeartbeat
from uploads.pushers import NullPusher
from uploads.worker import Worker

pytestmark = pytest.mark.django_db


@pytest.mark.incus
def test_healthz_is_200_when_everything_answers(incus: str) -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"] == {
        "database": "ok",
        "spool": "ok",
        "incus": {"local": "ok"},
    }


def test_healthz_is_503_naming_the_unreachable_remote(settings: Any, tmp_path: Path) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "INCUS_ENDPOINT": str(tmp_path / "nothing.sock")}
    response = Client().get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert "does not exist" in body["checks"]["incus"]["local"]
    assert body["checks"]["database"] == "ok"


def test_healthz_reports_an_unwritable_spool(settings: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_DIR": blocker / "spool"}
    response = Client().get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["spool"] != "ok"


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and name in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_metrics_count_uploads_refusals_and_queue_state(api: APIClient) -> None:
    before = Client().get("/metrics").content.decode()
    accepted_before = metric(before, "uploadsvc_uploads_accepted_total")
    raw_upload(api, b"12345")
    raw_upload(api, x_container_name="-bad")
    text = Client().get("/metrics").content.decode()
    assert metric(text, "uploadsvc_uploads_accepted_total") == accepted_before + 1
    assert 'uploadsvc_uploads_refused_total{status="400"}' in text
    assert 'uploadsvc_tasks{status="pending"} 1.0' in text
    assert "uploadsvc_oldest_pending_age_seconds" in text


@pytest.mark.django_db(transaction=True)
def test_push_metrics_and_heartbeat_rows(user: Any) -> None:
    make_task(user)
    Worker(threads=1, burst=True, pusher_factory=NullPusher, worker_id="w-metrics").run()
    text = Client().get("/metrics").content.decode()
    assert 'uploadsvc_push_attempts_total{outcome="succeeded"}' in text
    assert 'uploadsvc_push_duration_seconds_count{outcome="succeeded"}' in text
    assert not WorkerHeartbeat.objects.exists()  # removed on a clean exit


@pytest.mark.django_db(transaction=True)
def test_running_worker_has_a_heartbeat_and_logs_json(
    user: Any, spool: Path, tmp_path: Path
) -> None:
    task = make_task(user)
    log = tmp_path / "worker.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "run_push_workers",
            "--poll-interval",
            "0.1",
            "--worker-id",
            "beat-1",
        ],
        cwd=ROOT,
        env=subprocess_env(
            spool, UPLOADS_PUSHER="uploads.pushers.NullPusher", DJANGO_LOG_FORMAT="json"
        ),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not WorkerHeartbeat.objects.filter(worker_id="beat-1").exists():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        while UploadTask.objects.get(pk=task.pk).status != Status.SUCCEEDED:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = Client().get("/metrics").content.decode()
        assert 'uploadsvc_worker_last_seen_age_seconds{worker="beat-1"}' in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    pushes = [r for r in records if r.get("task_id") == str(task.pk)]
    assert pushes and pushes[0]["outcome"] == "succeeded"
    assert pushes[0]["level"] == "INFO" and "duration" in pushes[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.server_env(UPLOADS_BODY_READ_TIMEOUT="1")
def test_a_client_that_stalls_mid_body_gets_408_and_leaves_nothing(
    web_server: Server, user: Any
) -> None:
    token = Token.objects.create(user=user).key
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
        "X-Container-Name: web1\r\nX-File-Path: /srv/f\r\nContent-Length: 1000000\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", web_server.port), timeout=15) as sock:
        sock.sendall(head + b"x" * 1000)  # then nothing, connection left open
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert time.monotonic() - started < 10
    assert UploadTask.objects.count() == 0
    assert spool_files(web_server.spool) == []
