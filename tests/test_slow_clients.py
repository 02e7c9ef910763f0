"""Slow clients cannot starve the service: `make run` as shipped (scripts/run, its default web
workers and threads) keeps answering while 200 connections trickle their request headers in,
one byte a second each."""

import http.client
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from tests.conftest import grant_everything
from tests.run_utils import run_script, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

SLOW_CLIENTS = 200
ANSWER_WITHIN = 2.0


class Trickle:
    """Connections that send a request head one byte a second each and never finish it."""

    def __init__(self, port: int, count: int) -> None:
        self.head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 300
        self.socks = [
            socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)
        ]
        self.open = set(range(count))
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in range(len(self.head)):
            for n in list(self.open):
                try:
                    self.socks[n].send(self.head[i : i + 1])
                except OSError:  # the server closed it
                    self.open.discard(n)
            self.sent = i + 1
            if self._stop.wait(1.0):
                return

    def __enter__(self) -> "Trickle":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


def timed(request: Any) -> tuple[int | None, float]:
    """The status and the seconds it took; None when no answer came (a 10 s timeout)."""
    started = time.monotonic()
    try:
        status = request()
    except OSError:
        status = None
    return status, time.monotonic() - started


def test_slow_header_clients_do_not_starve_healthz_or_uploads(
    user: Any, spool: Path, tmp_path: Path, incus: str
) -> None:
    grant_everything(user)
    key = Token.objects.create(user=user).key
    with run_script(spool, tmp_path, UPLOADS_INCUS_ENDPOINT=incus) as (port, _log, _proc):
        health, accepted, still_open = probe_under_slow_clients(port, key)
    assert still_open == SLOW_CLIENTS  # they were all connected and sending while we asked
    assert health[0] == 200 and health[1] < ANSWER_WITHIN, health
    assert accepted[0] == 202 and accepted[1] < ANSWER_WITHIN, accepted


def probe_under_slow_clients(port: int, key: str) -> tuple[Any, Any, int]:
    """/healthz and an upload, timed, while SLOW_CLIENTS trickle their headers in; and how many
    slow clients were still connected by then."""

    def healthz() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
        conn.close()
        return status

    def upload() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            "/api/uploads/",
            body=b"k" * 1024,
            headers={
                "Authorization": f"Token {key}",
                "Content-Type": "application/octet-stream",
                # No such instance: the workers fail the push, the container stays clean.
                "X-Container-Name": "web1",
                "X-File-Path": "/srv/slow-clients.bin",
            },
        )
        status = conn.getresponse().status
        conn.close()
        return status

    # Every web process loads the URLconf on its first request: not what is measured here.
    for _ in range(20):
        assert healthz() == 200

    with Trickle(port, SLOW_CLIENTS) as trickle:
        wait_until(lambda: trickle.sent >= 3, 10, "the slow clients to send a few bytes")
        health = timed(healthz)
        accepted = timed(upload)
        still_open = len(trickle.open)
    return health, accepted, still_open
