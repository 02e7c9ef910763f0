"""The WSGI middleware of uploads/wsgi.py on its own: the body deadline over real streams (a
bytes buffer, and an OS pipe whose writer stops, as a stalled client looks to the reader), and
the environ the application gets."""

import io
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from uploads.wsgi import DeadlineInput, ProcessEnvironMiddleware, _readers

BODY = b"".join(f"line {n:05d} ".encode() * (n % 7) + b"\n" for n in range(20_000))


@pytest.mark.parametrize("size", [777, 65_536, 100_000, 1 << 20])
def test_reads_return_the_body_in_order_whatever_the_size(size: int) -> None:
    body = DeadlineInput(io.BytesIO(BODY), timeout=5)
    parts = []
    while chunk := body.read(size):
        assert len(chunk) <= size
        parts.append(chunk)
    assert b"".join(parts) == BODY
    assert body.read(size) == b""


def test_read_all_and_readline() -> None:
    body = DeadlineInput(io.BytesIO(BODY), timeout=5)
    lines = BODY.splitlines(keepends=True)
    assert body.readline() == lines[0]
    assert body.readline(3) == lines[1][:3]
    assert body.readline() == lines[1][3:]
    assert list(body)[:2] == lines[2:4]

    body = DeadlineInput(io.BytesIO(BODY), timeout=5)
    assert body.read(10) == BODY[:10]
    assert body.read() == BODY[10:]
    assert body.read() == b""


@pytest.fixture
def pipe() -> Iterator[tuple[io.RawIOBase, int]]:
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=0)
    try:
        yield reader, write_fd
    finally:
        reader.close()
        try:
            os.close(write_fd)
        except OSError:
            pass


def test_a_read_that_waits_past_the_deadline_raises_timeout(
    pipe: tuple[io.RawIOBase, int],
) -> None:
    reader, write_fd = pipe
    os.write(write_fd, b"first part")
    body = DeadlineInput(reader, timeout=0.5)
    assert body.read(1 << 20) == b"first part"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        body.read(1 << 20)
    assert 0.4 < time.monotonic() - started < 3


def test_closing_frees_the_helper_for_the_next_body_when_the_client_goes(
    pipe: tuple[io.RawIOBase, int],
) -> None:
    reader, write_fd = pipe
    os.write(write_fd, b"x")
    body = DeadlineInput(reader, timeout=0.2)
    assert body.read(10) == b"x"
    with pytest.raises(TimeoutError):
        body.read(10)
    busy = {t.ident for t in threading.enumerate() if t.name == "body-read"}
    assert busy
    body.close()
    os.close(write_fd)  # the client disconnects: the helper's read returns
    deadline = time.monotonic() + 5
    while not _readers._idle and time.monotonic() < deadline:
        time.sleep(0.01)
    # The next body is read by a helper already there: no thread is started for it.
    next_reader, next_writer = os.pipe()
    os.write(next_writer, b"next")
    os.close(next_writer)
    with os.fdopen(next_reader, "rb", buffering=0) as stream:
        assert DeadlineInput(stream, timeout=5).read() == b"next"
    assert {t.ident for t in threading.enumerate() if t.name == "body-read"} <= busy


def test_the_process_environment_does_not_reach_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://user:secret@db/uploads")
    monkeypatch.setenv("HTTP_X_FROM_THE_PROCESS", "1")
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        return []

    middleware = ProcessEnvironMiddleware(app)
    # What granian hands the application: a copy of os.environ, then the request's own keys.
    request = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/healthz",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1",
        "wsgi.input": io.BytesIO(),
    }
    middleware(dict(os.environ) | request, lambda *args: None)
    assert "DATABASE_URL" not in seen
    assert "HTTP_X_FROM_THE_PROCESS" not in seen
    assert "PATH" not in seen
    assert {k: v for k, v in seen.items() if k != "wsgi.input"} == {
        k: v for k, v in request.items() if k != "wsgi.input"
    }
