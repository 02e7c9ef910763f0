"""`make run`'s script as a user runs it: web server and push workers together, on the test
database and the real Incus; an upload lands in the container; SIGTERM stops both cleanly."""

import http.client
import json
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from tests.conftest import grant_everything
from tests.incus_utils import RUNNING, run_in
from tests.run_utils import listening, run_script, wait_until
from uploads.models import UploadTask

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_run_script_delivers_and_stops_cleanly_on_sigterm(
    user: Any, spool: Path, tmp_path: Path, incus: str
) -> None:
    grant_everything(user)
    key = Token.objects.create(user=user).key
    script = run_script(
        spool,
        tmp_path,
        WEB_WORKERS="1",
        WEB_THREADS="2",
        PUSH_THREADS="1",
        UPLOADS_INCUS_ENDPOINT=incus,
    )
    with script as (port, log, proc):
        path = f"/tmp/uploadsvc-run-{uuid.uuid4().hex[:8]}.txt"
        body = b"from scripts/run\n"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            "POST",
            "/api/uploads/",
            body=body,
            headers={
                "Authorization": f"Token {key}",
                "Content-Type": "application/octet-stream",
                "X-Container-Name": RUNNING,
                "X-File-Path": path,
            },
        )
        answer = conn.getresponse()
        task = json.loads(answer.read())
        assert answer.status == 202, task

        def status() -> str:
            conn.request(
                "GET", f"/api/uploads/{task['id']}/", headers={"Authorization": f"Token {key}"}
            )
            reply = conn.getresponse()
            return str(json.loads(reply.read())["status"])

        wait_until(lambda: status() == "succeeded", 30, "the push")
        # /metrics adds up the web process's counters and the push workers'.
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        assert "uploadsvc_uploads_accepted_total 1.0" in metrics
        assert 'uploadsvc_push_attempts_total{outcome="succeeded"} 1.0' in metrics
        conn.close()
        assert run_in(RUNNING, "cat", path).encode() == body
        run_in(RUNNING, "rm", "-f", path)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    output = log.read_text()
    assert code == 0, output
    assert "stopped after 1 push(es)" in output
    assert '"POST /api/uploads/ HTTP/1.1" 202' in output  # the access log
    assert not listening(port)


def test_throttling_counts_per_user_across_web_processes(
    user: Any, spool: Path, tmp_path: Path
) -> None:
    """Each request on a new connection, so the two web processes share them out; a count kept
    per process would let up to twice the rate through."""
    key = Token.objects.create(user=user).key
    with run_script(spool, tmp_path, WEB_WORKERS="2", DJANGO_THROTTLE_USER_RATE="5/min") as run:
        port = run[0]
        codes = []
        for _ in range(14):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/uploads/", headers={"Authorization": f"Token {key}"})
            codes.append(conn.getresponse().status)
            conn.close()
    assert codes == [200] * 5 + [429] * 9


def test_sigterm_lets_an_upload_in_flight_finish(
    user: Any, spool: Path, tmp_path: Path, incus: str
) -> None:
    grant_everything(user)
    key = Token.objects.create(user=user).key
    size = 8 * 1024 * 1024
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {key}\r\nContent-Type: application/octet-stream\r\n"
        f"X-Container-Name: web1\r\nX-File-Path: /srv/f\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    script = run_script(
        spool,
        tmp_path,
        WEB_WORKERS="1",
        WEB_THREADS="2",
        PUSH_THREADS="1",
        UPLOADS_INCUS_ENDPOINT=incus,
    )
    with script as (port, log, proc):
        # A SIGTERM before the workers have installed their handlers would kill them outright.
        wait_until(lambda: "starting:" in log.read_text(), 30, "the push workers")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + b"s" * (size // 2))
            wait_until(lambda: any(spool.glob("*.part")), 20, "the upload to start")
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: not listening(port), 20, "the server to stop accepting")
            sock.sendall(b"s" * (size - size // 2))
            answer = sock.recv(65536)
        code = proc.wait(timeout=60)
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    assert code == 0, log.read_text()
    assert UploadTask.objects.get().size == size
