"""Raw SFTP v3 over an HTTP connection upgraded with `Upgrade: sftp` (no SSH layer).

A transport helper for `uploads.incus`, its only user, and free of Incus specifics: it performs
the upgrade on a connected socket, then hands paramiko's `SFTPClient` a socket-like object. Any
stream socket works: a unix socket for the local daemon, a TLS-wrapped TCP socket for remotes.

paramiko drives the object through `send`, `recv`, `recv_ready`, `settimeout`, `get_name` and
`close`. Every transport failure (reset, refused write, timeout, end of stream) surfaces as
`LinkBroken`, which is not an `OSError`: the `OSError`s paramiko raises after that are then
always SFTP status replies from the server, never socket trouble.
"""

import select
import socket
from typing import Any

import paramiko

# What paramiko asks for; the spec's guaranteed minimum and the only size that is safe to read
# with (pkg/sftp bug #658 returns short reads above it).
READ_PACKET = 32 * 1024
# Incus's SFTP server (pkg/sftp) drops the connection on a packet over 256 KiB, header included
# (measured: 256 KiB - 64 bytes is accepted, 256 KiB is not). Half that leaves room for the
# header and, measured here, pushes 1 GiB about as fast as any larger size.
WRITE_PACKET = 128 * 1024

_MAX_HEAD = 64 * 1024
_MAX_ERROR_BODY = 1024 * 1024


class UpgradeRefused(Exception):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body


class LinkBroken(Exception):
    """The connection under an SFTP session failed; the session cannot be used any more."""


class UpgradedSocket:
    """The socket-like object paramiko's SFTPClient talks through."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self._sock = sock
        # Bytes read past the end of the 101 response's headers belong to the SFTP stream.
        self._buffered = buffered
        self.broken = False
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def _fail(self, reason: BaseException | str) -> LinkBroken:
        self.broken = True
        return LinkBroken(str(reason) or type(reason).__name__)

    def send(self, data: bytes) -> int:
        if self.broken:
            # paramiko closes forgotten file handles from __del__ with a fire-and-forget
            # request; on a dead link that must neither raise nor block.
            return len(data)
        try:
            return self._sock.send(data)
        except OSError as exc:
            raise self._fail(exc) from exc

    def recv(self, size: int) -> bytes:
        if self._buffered:
            data, self._buffered = self._buffered[:size], self._buffered[size:]
            return data
        if self.broken:
            raise LinkBroken("the SFTP connection is closed")
        try:
            data = self._sock.recv(size)
        except OSError as exc:
            raise self._fail(exc) from exc
        if not data:
            raise self._fail("the server closed the SFTP connection")
        return data

    def recv_ready(self) -> bool:
        """Whether a reply is waiting (paramiko then collects pipelined write replies)."""
        if self._buffered:
            return True
        # A TLS socket may hold decrypted bytes that poll() cannot see.
        pending = getattr(self._sock, "pending", None)
        if pending is not None and pending() > 0:
            return True
        # poll(), unlike select(), works for descriptors above 1024; a peek would wait for the
        # socket's timeout first.
        return bool(self._poll.poll(0))

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def get_name(self) -> str:
        return "sftp-upgrade"

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self.broken = True
        self._sock.close()

    def shutdown(self) -> None:
        """From another thread: end the connection; a send or recv waiting on it fails now."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_HEAD:
            raise LinkBroken("the upgrade response headers are too long")
        chunk = sock.recv(4096)
        if not chunk:
            raise LinkBroken("the server closed the connection during the upgrade")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise LinkBroken(f"not an HTTP response: {status_line[:80]!r}")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def _read_body(sock: socket.socket, headers: dict[str, str], rest: bytes) -> bytes:
    """The error body when its length is declared; never wait for the server to hang up (it
    keeps the connection alive for reuse)."""
    length = headers.get("content-length", "")
    if not length.isdigit():
        return rest
    wanted = min(int(length), _MAX_ERROR_BODY)
    body = rest
    while len(body) < wanted:
        chunk = sock.recv(wanted - len(body))
        if not chunk:
            break
        body += chunk
    return body[:wanted]


def open_sftp(
    sock: socket.socket, *, target: str, host: str = "localhost"
) -> tuple[Any, UpgradedSocket]:
    """Upgrade the connected `sock` at `target` (a path with its query) and start SFTP on it.

    Returns the `paramiko.SFTPClient` and the link under it (whose `broken` tells a dead
    connection from an SFTP error). Raises `UpgradeRefused` for a non-101 answer, `LinkBroken`
    when the connection fails. The socket is closed on failure.
    """
    try:
        request = (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            "User-Agent: uploadsvc\r\n"
            "Connection: Upgrade\r\n"
            "Upgrade: sftp\r\n"
            "\r\n"
        )
        sock.sendall(request.encode("ascii"))
        head, rest = _read_head(sock)
        status, reason, headers = _parse_head(head)
        if status != 101:
            raise UpgradeRefused(status, reason, _read_body(sock, headers, rest))
        link = UpgradedSocket(sock, rest)
        return paramiko.SFTPClient(link), link
    except OSError as exc:
        sock.close()
        raise LinkBroken(str(exc) or type(exc).__name__) from exc
    except (UpgradeRefused, LinkBroken, paramiko.SSHException):
        sock.close()
        raise


def finish_pipelined_writes(handle: Any) -> None:
    """Wait for every outstanding pipelined write's reply and raise the first failure.

    paramiko collects pipelined write replies only opportunistically; on close() it reads and
    drops the rest, so a failed final write (a full disk) would pass unnoticed.
    """
    # Private to paramiko (stable from 2.x to 4.x): the ids of the writes still unanswered, and
    # the call that waits for one reply and raises its error status.
    outstanding = handle._reqs
    while outstanding:
        handle.sftp._read_response(outstanding.popleft())


def pipeline(sftp: Any, *requests: tuple[int, tuple[Any, ...]]) -> list[Any]:
    """Send several requests at once, then collect their replies in order: one round trip
    instead of one each. The server (pkg/sftp) answers in the order it was asked and runs
    everything but reads and writes one after the other, in order; a close first waits for the
    handle's writes. Each reply is a paramiko `Message` (None for a plain success), or the
    OSError its status raised: every reply is read, so the session stays in step."""
    # Private to paramiko (stable from 2.x to 4.x): send without waiting, then wait for one
    # reply and raise its error status.
    numbers = [sftp._async_request(type(None), kind, *args) for kind, args in requests]
    replies: list[Any] = []
    for number in numbers:
        try:
            _, message = sftp._read_response(number)
        except OSError as exc:
            message = exc
        replies.append(message)
    return replies
