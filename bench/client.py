"""The load client: keep-alive HTTP/1.1 over plain sockets, one thread per connection.

Requests are built before the clock starts and responses are parsed with the least work that is
still correct (status line, Content-Length or chunked), so the client spends a few tens of
microseconds of CPU per request. Its own CPU time is measured on every run, so a report can tell
when the client, not the server, set the pace.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import log, percentile, process_cpu_s


class ConnectionClosed(Exception):
    """The server closed the connection before a whole response arrived."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One keep-alive connection; reconnects when the server has closed it."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 120) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.reconnects = 0

    def _socket(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self) -> bytes:
        data = self._socket().recv(262144)
        if not data:
            raise ConnectionClosed()
        return data

    def _read_response(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(rest) < length:
                rest += self._recv()
            body, self.buffer = rest[:length], rest[length:]
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body, self.buffer = self._read_chunked(rest)
        else:
            chunks = [rest]
            try:
                while True:
                    chunks.append(self._recv())
            except ConnectionClosed:
                pass
            body, self.buffer = b"".join(chunks), b""
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, headers, body)

    def _read_chunked(self, data: bytes) -> tuple[bytes, bytes]:
        body = b""
        while True:
            while b"\r\n" not in data:
                data += self._recv()
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(data) < size + 2:
                data += self._recv()
            body += data[:size]
            data = data[size + 2 :]
            if size == 0:
                return body, data

    def request(self, raw: bytes, *, body_file: Path | None = None) -> Response:
        """Send a prepared request (and a file as its body) and read the response.

        A connection the server closed between requests is reopened once; a failure after
        bytes of the response arrived is raised.
        """
        for attempt in (0, 1):
            try:
                sock = self._socket()
                sock.sendall(raw)
                if body_file is not None:
                    with open(body_file, "rb") as source:
                        sock.sendfile(source)
                return self._read_response()
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt or body_file is not None:
                    raise
                self.reconnects += 1
        raise AssertionError("unreachable")


def upload_request(
    *,
    port: int,
    token: str | None,
    container: str,
    path: str,
    body: bytes = b"",
    length: int | None = None,
    url: str = "/api/uploads/",
) -> bytes:
    """A raw upload as the seed's clients send it: the body plus X-Container-Name/X-File-Path."""
    lines = [
        f"POST {url} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"X-Container-Name: {container}",
        f"X-File-Path: {path}",
        "Content-Type: application/octet-stream",
        f"Content-Length: {len(body) if length is None else length}",
    ]
    if token:
        lines.append(f"Authorization: Token {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    requested: int
    concurrency: int
    wall: float = 0.0
    client_cpu: float = 0.0
    ok: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    reconnects: int = 0
    started_wall: float = 0.0
    timed_out: bool = False
    bodies: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall else 0.0

    def summary(self) -> dict[str, Any]:
        p50 = percentile(self.latencies, 0.50)
        p99 = percentile(self.latencies, 0.99)
        done = sum(self.statuses.values())
        return {
            "requested": self.requested,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "statuses": dict(self.statuses),
            "wall_s": self.wall,
            "rate_per_s": self.rate,
            "p50_ms": p50 * 1000 if p50 is not None else None,
            "p99_ms": p99 * 1000 if p99 is not None else None,
            "client_cpu_s": self.client_cpu,
            "client_cpu_share": self.client_cpu / self.wall if self.wall else None,
            "client_cpu_us_per_req": self.client_cpu / done * 1e6 if done else None,
            "reconnects": self.reconnects,
            "timed_out": self.timed_out,
        }


def run_load(
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    expect: int = 202,
    timeout: float = 180,
    keep_bodies: bool = False,
    fresh_connections: bool = False,
    on_start: Callable[[], None] | None = None,
) -> LoadResult:
    """Send `requests` over `concurrency` keep-alive connections as fast as answers come back
    (or over a new connection each, with fresh_connections).

    Stops early (timed_out) when `timeout` seconds pass. `client_cpu` is this process's CPU time
    over the run, so it includes every client thread.
    """
    result = LoadResult(requested=len(requests), concurrency=concurrency)
    lock = threading.Lock()
    next_index = iter(range(len(requests)))
    start_barrier = threading.Barrier(concurrency + 1, timeout=60)
    deadline = 0.0

    def worker() -> None:
        conn = Connection(port)
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        bodies: list[tuple[float, bytes]] = []
        ok = 0
        try:
            start_barrier.wait()
            while time.monotonic() < deadline:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    break
                began = time.perf_counter()
                try:
                    response = conn.request(requests[index])
                except (OSError, ConnectionClosed) as exc:
                    statuses[type(exc).__name__] += 1
                    conn.close()
                    continue
                latencies.append(time.perf_counter() - began)
                if fresh_connections:
                    conn.close()
                statuses[str(response.status)] += 1
                if response.status == expect:
                    ok += 1
                    if keep_bodies:
                        bodies.append((time.time(), response.body))
        finally:
            conn.close()
            with lock:
                result.latencies.extend(latencies)
                result.statuses.update(statuses)
                result.ok += ok
                result.reconnects += conn.reconnects
                result.bodies.extend(bodies)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu0 = time.process_time()
    deadline = time.monotonic() + timeout
    if on_start is not None:
        on_start()
    result.started_wall = time.time()
    began = time.perf_counter()
    start_barrier.wait()
    for thread in threads:
        thread.join(timeout + 60)
    result.wall = time.perf_counter() - began
    result.client_cpu = time.process_time() - cpu0
    result.timed_out = time.monotonic() >= deadline and result.ok < len(requests)
    return result


@dataclass
class BigUpload:
    """One big upload, timed on the client from its first byte written (seconds from `began`).

    `body_sent_at`: the client's last write returned, so its last byte was in its own kernel's
    send queue. `body_delivered_at`: that queue was empty, i.e. the server's kernel had
    acknowledged every byte (None if the answer came first). `in_flight_bytes`: how much of the
    body was still queued when the last write returned.
    """

    status: int
    size: int
    seconds: float
    body_sent_at: float
    body_delivered_at: float | None
    in_flight_bytes: int
    started_wall: float
    answered_wall: float
    body: bytes

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def answer_after_sent_ms(self) -> float:
        """From the client's last byte written to the whole answer read."""
        return (self.seconds - self.body_sent_at) * 1000

    @property
    def answer_after_delivered_ms(self) -> float | None:
        if self.body_delivered_at is None:
            return None
        return (self.seconds - self.body_delivered_at) * 1000


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes in a TCP socket's send queue not yet acknowledged by the peer (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def big_upload(port: int, head: bytes, source: Path) -> BigUpload:
    """One upload of a file with sendfile(2): the time from the first byte to the answer, and
    when the last byte was written and acknowledged (a thread watches the send queue while the
    answer is awaited)."""
    size = source.stat().st_size
    conn = Connection(port, timeout=600)
    try:
        conn._socket()
        started_wall = time.time()
        began = time.perf_counter()
        sock = conn._socket()
        sock.sendall(head)
        with open(source, "rb") as data:
            sock.sendfile(data)
        sent = time.perf_counter()
        in_flight = _unacknowledged(sock)
        delivered: list[float] = [sent] if in_flight == 0 else []
        answered = threading.Event()

        def watch() -> None:
            while not delivered and not answered.is_set():
                if _unacknowledged(sock) == 0:
                    delivered.append(time.perf_counter())
                    return
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, name="send-queue", daemon=True)
        watcher.start()
        try:
            response = conn._read_response()
            ended = time.perf_counter()
        finally:
            answered.set()
            watcher.join()
        return BigUpload(
            status=response.status,
            size=size,
            seconds=ended - began,
            body_sent_at=sent - began,
            body_delivered_at=delivered[0] - began if delivered else None,
            in_flight_bytes=in_flight,
            started_wall=started_wall,
            answered_wall=time.time(),
            body=response.body,
        )
    finally:
        conn.close()


def warm_up(
    port: int,
    token: str | None,
    pids: Sequence[int],
    *,
    container: str,
    directory: str,
    clients: int,
    size: int,
) -> int:
    """Uploads on new connections until every server process has served some: Django loads the
    URLconf (and with it most of the app) on a process's first request, which would otherwise
    count as RSS growth of the big upload. A process that served nothing has used no CPU.
    Returns how many uploads were accepted."""
    before = {pid: process_cpu_s(pid) for pid in pids}
    body = os.urandom(size)
    accepted = 0
    for round_ in range(20):
        requests = [
            upload_request(
                port=port,
                token=token,
                container=container,
                path=f"{directory}/warm{round_}-{n:06d}",
                body=body,
            )
            for n in range(64)
        ]
        warm = run_load(port, requests, concurrency=clients, fresh_connections=True)
        accepted += warm.ok
        if warm.ok != len(requests):
            raise RuntimeError(f"warm-up uploads failed: {dict(warm.statuses)}")
        if all(process_cpu_s(pid) - before[pid] >= 0.05 for pid in pids):
            return accepted
    log("warm-up: a server process served no request after 20 rounds")
    return accepted
