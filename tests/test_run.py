"""`make run`'s script as a user runs it: web server and push workers together, on the test
database and the real Incus; an upload lands in the container; SIGTERM stops both cleanly."""

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from tests.conftest import ROOT, free_port, grant_everything, subprocess_env
from tests.incus_utils import RUNNING, run_in

pytestmark = pytest.mark.django_db(transaction=True)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def test_the_run_script_delivers_and_stops_cleanly_on_sigterm(
    user: Any, spool: Path, tmp_path: Path, incus: str
) -> None:
    grant_everything(user)
    key = Token.objects.create(user=user).key
    port = free_port()
    log = tmp_path / "run.log"
    env = subprocess_env(
        spool,
        BIN=str(Path(sys.executable).parent),
        PORT=str(port),
        WEB_WORKERS="1",
        WEB_THREADS="2",
        PUSH_THREADS="1",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
        UPLOADS_INCUS_ENDPOINT=incus,
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["scripts/run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: listening(port), 30, "the web server")
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
        conn.close()
        assert run_in(RUNNING, "cat", path).encode() == body
        run_in(RUNNING, "rm", "-f", path)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    output = log.read_text()
    assert code == 0, output
    assert "stopped after 1 push(es)" in output
    assert not listening(port)
