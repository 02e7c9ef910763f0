"""`GET /api/uploads/<id>/?wait=`: the answer comes when the upload finishes, or when the time
is up, and waiting requests never take every server thread."""

import concurrent.futures
import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.api_utils import raw_upload
from tests.conftest import Server
from uploads import queue
from uploads.pushers import NullPusher
from uploads.worker import Worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_answer_comes_when_the_upload_finishes(api: APIClient) -> None:
    task_id = raw_upload(api).json()["id"]

    def deliver_soon() -> None:
        time.sleep(1)
        Worker(threads=1, burst=True, poll_interval=0.05, pusher_factory=NullPusher).run()

    worker = threading.Thread(target=deliver_soon)
    worker.start()
    started = time.monotonic()
    response = api.get(f"/api/uploads/{task_id}/", {"wait": "20"})
    waited = time.monotonic() - started
    worker.join()
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert "Wait-Timed-Out" not in response
    assert 0.9 < waited < 5  # woken by the finish, not by the 20 s


def test_an_unfinished_upload_is_answered_when_the_time_is_up(api: APIClient) -> None:
    task_id = raw_upload(api).json()["id"]
    started = time.monotonic()
    response = api.get(f"/api/uploads/{task_id}/", {"wait": "1"})
    assert 0.9 < time.monotonic() - started < 5
    assert response.json()["status"] == "pending"
    assert response["Wait-Timed-Out"] == "true"


def test_a_finished_upload_is_answered_at_once(api: APIClient) -> None:
    task_id = raw_upload(api).json()["id"]
    api.post(f"/api/uploads/{task_id}/cancel/")
    started = time.monotonic()
    response = api.get(f"/api/uploads/{task_id}/", {"wait": "30"})
    assert time.monotonic() - started < 1
    assert response.json()["status"] == "cancelled"


@pytest.mark.parametrize("wait", ["0", "61", "1.5", "soon", ""])
def test_a_bad_wait_is_400(api: APIClient, wait: str) -> None:
    task_id = raw_upload(api).json()["id"]
    response = api.get(f"/api/uploads/{task_id}/", {"wait": wait})
    assert response.status_code == 400
    assert "1 to 60" in response.json()["wait"][0]


def test_a_hundred_waiting_clients_do_not_starve_uploads_or_health_checks(
    web_server: Server, user: Any, spool: Path
) -> None:
    """100 clients wait on uploads nobody pushes (no workers run). Meanwhile another client's
    upload gets its 202 within a second and /healthz answers: at most UPLOADS['MAX_WAITERS']
    requests wait per web process, the others are answered at once with Retry-After."""
    token = Token.objects.create(user=user).key
    auth = {"Authorization": f"Token {token}"}

    def request(method: str, path: str, body: bytes | None = None, **headers: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", web_server.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={**auth, **headers})
            answer = conn.getresponse()
            # Header names in any case (HTTP/1.1 servers may send them in lower case).
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            conn.close()

    def upload(n: int) -> str:
        status, _, body = request(
            "POST",
            "/api/uploads/",
            b"wait for me\n",
            **{"X-Container-Name": "web1", "X-File-Path": f"/srv/w/{n}"},
        )
        assert status == 202
        return str(json.loads(body)["id"])

    pending = [upload(n) for n in range(100)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool:
        waiting = [pool.submit(request, "GET", f"/api/uploads/{i}/?wait=20") for i in pending]
        time.sleep(2)  # every waiter has been answered or is waiting
        started = time.monotonic()
        assert upload(1000)
        took_upload = time.monotonic() - started
        started = time.monotonic()
        status, _, _ = request("GET", "/healthz")
        took_health = time.monotonic() - started
        answers = [future.result() for future in waiting]
    assert took_upload < 1.0, took_upload
    assert status in (200, 503) and took_health < 1.0, took_health
    held = [h for s, h, _ in answers if "wait-timed-out" in h]
    turned_away = [h for s, h, _ in answers if "retry-after" in h]
    assert len(held) + len(turned_away) == 100
    assert 0 < len(held) <= 2  # MAX_WAITERS for the server's one process
    queue.stop_notifier()
