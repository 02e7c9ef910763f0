"""Uploads through the real web server (scripts/web: granian) and real sockets: truncated bodies,
chunked bodies, and clients that close early."""

import hashlib
import http.client
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from rest_framework.authtoken.models import Token

from tests.conftest import Server, spool_files
from uploads.models import UploadTask

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def token(user: Any) -> str:
    return Token.objects.create(user=user).key


def send_partial(server: Server, head: bytes, body: bytes) -> bytes:
    """Send a request whose body stops early, close our side, and read what the server says
    until it closes: by then it has finished with the request."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_raw_body_shorter_than_content_length_queues_nothing(
    web_server: Server, token: str
) -> None:
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
        "X-Container-Name: web1\r\nX-File-Path: /srv/f\r\nContent-Length: 5000000\r\n\r\n"
    ).encode()
    answer = send_partial(web_server, head, b"x" * 3_000_000)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert UploadTask.objects.count() == 0
    assert spool_files(web_server.spool) == []


def test_multipart_body_cut_inside_the_file_queues_nothing(web_server: Server, token: str) -> None:
    boundary = uuid.uuid4().hex
    fields = b"".join(
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
        for name, value in (("container", "web1"), ("path", "/srv/f"))
    )
    file_head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    full = fields + file_head + b"y" * 4_000_000 + f"\r\n--{boundary}--\r\n".encode()
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(full)}\r\n\r\n"
    ).encode()
    # Cut in the middle of the file: Django's parser alone would keep the part as complete.
    answer = send_partial(web_server, head, full[: len(full) // 2])
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert UploadTask.objects.count() == 0
    assert spool_files(web_server.spool) == []


def test_multipart_body_cut_after_its_last_boundary_queues_nothing(
    web_server: Server, token: str
) -> None:
    # The parts are all complete, so Django's parser is satisfied; only counting the bytes
    # against Content-Length shows that the client went away early.
    boundary = uuid.uuid4().hex
    full = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="container"\r\n\r\nweb1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n/srv/f\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
        ).encode()
        + b"w" * 100_000
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(full) + 1000}\r\n\r\n"
    ).encode()
    answer = send_partial(web_server, head, full)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert UploadTask.objects.count() == 0
    assert spool_files(web_server.spool) == []


def test_whole_multipart_body_through_the_server_is_accepted(
    web_server: Server, token: str
) -> None:
    boundary = uuid.uuid4().hex
    payload = b"z" * 2_000_000
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="container"\r\n\r\nweb1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n/srv/f\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    conn = http.client.HTTPConnection("127.0.0.1", web_server.port, timeout=30)
    conn.request(
        "POST",
        "/api/uploads/",
        body=body,
        headers={
            "Authorization": f"Token {token}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    response = conn.getresponse()
    assert response.status == 202, response.read()
    task = UploadTask.objects.get()
    assert task.size == len(payload)
    assert task.sha256 == hashlib.sha256(payload).hexdigest()


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_chunked_raw_body_is_read_whole(web_server: Server, token: str) -> None:
    payload = bytes(range(256)) * 20_000
    conn = http.client.HTTPConnection("127.0.0.1", web_server.port, timeout=30)
    conn.request(
        "POST",
        "/api/uploads/",
        body=chunks(payload, 65_536),
        encode_chunked=True,
        headers={
            "Authorization": f"Token {token}",
            "Content-Type": "application/octet-stream",
            "Transfer-Encoding": "chunked",
            "X-Container-Name": "web1",
            "X-File-Path": "/srv/chunked.bin",
        },
    )
    response = conn.getresponse()
    assert response.status == 202, response.read()
    task = UploadTask.objects.get()
    assert task.size == len(payload)
    assert task.sha256 == hashlib.sha256(payload).hexdigest()
    assert (web_server.spool / task.spool_name).read_bytes() == payload


@pytest.mark.server_env(UPLOADS_MAX_UPLOAD_SIZE=str(10 * 1024 * 1024))
def test_chunked_body_over_the_maximum_is_413(web_server: Server, token: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", web_server.port, timeout=30)
    big = b"q" * (11 * 1024 * 1024)
    conn.request(
        "POST",
        "/api/uploads/",
        body=chunks(big, 1 << 20),
        encode_chunked=True,
        headers={
            "Authorization": f"Token {token}",
            "Transfer-Encoding": "chunked",
            "X-Container-Name": "web1",
            "X-File-Path": "/srv/big.bin",
        },
    )
    response = conn.getresponse()
    assert response.status == 413
    assert UploadTask.objects.count() == 0
    assert spool_files(web_server.spool) == []


def test_the_view_receives_the_body_while_it_arrives(web_server: Server, token: str) -> None:
    # A server that buffered the whole body before calling the view would write nothing to the
    # spool until the last byte: here the first half is on disk while the second is unsent.
    half = 4 * 1024 * 1024
    head = (
        "POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {token}\r\nContent-Type: application/octet-stream\r\n"
        f"X-Container-Name: web1\r\nX-File-Path: /srv/f\r\nContent-Length: {2 * half}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", web_server.port), timeout=30) as sock:
        sock.sendall(head + b"a" * half)
        deadline = time.monotonic() + 20
        while not any(
            p.suffix == ".part" and p.stat().st_size >= half - (1 << 20)
            for p in web_server.spool.iterdir()
        ):
            assert time.monotonic() < deadline, "the view did not write the body as it came"
            time.sleep(0.05)
        sock.sendall(b"b" * half)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    task = UploadTask.objects.get()
    assert task.size == 2 * half
    assert task.sha256 == hashlib.sha256(b"a" * half + b"b" * half).hexdigest()
