"""WSGI middleware: a read deadline on the request body, a count of the bytes read, and an
environ without the process's environment variables.

Deadline: the WSGI server (granian) parses headers with a timeout of its own, but a read of
`wsgi.input` waits for the client with none, so a client that stops sending mid-body would hold
a request thread for as long as it keeps the connection open. `BodyDeadlineMiddleware` reads the
body on a helper thread, 256 KiB at a time, and a read that waits longer than
`UPLOADS_BODY_READ_TIMEOUT` for the next piece raises `TimeoutError` (an `OSError`, as a socket
timeout would): the view answers 408 and its thread is free. The helper stays parked in the
server's read until the client sends more or goes away, and then waits for the next body.

Counting: Django's request stream returns a short read, not an error, when a client closes before
sending all of its Content-Length; the multipart parser then keeps the truncated last part as if
it were complete. Counting at the WSGI layer lets the upload view tell a whole body from a cut
one.
"""

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from uploads.conf import uploads_settings

ENVIRON_KEY = "uploadsvc.body_counter"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class CountingInput:
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.bytes_read += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self._stream.readline(size)
        self.bytes_read += len(line)
        return line

    def __iter__(self) -> "CountingInput":
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class BodyCountingMiddleware:
    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        counter = CountingInput(environ["wsgi.input"])
        environ["wsgi.input"] = counter
        environ[ENVIRON_KEY] = counter
        return self.app(environ, start_response)


class _Readers:
    """Threads that read request bodies, kept between requests: starting a thread for each
    request cost a tenth of a small upload's CPU. A reader waits IDLE_SECONDS for the next body,
    then ends; as many run as bodies are being read (a stalled client holds one, not a server
    thread)."""

    IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._serve, args=(job,), name="body-read", daemon=True).start()

    def _serve(self, job: Callable[[], None]) -> None:
        while True:
            job()
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    try:  # handed a job just as the wait ended
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


_readers = _Readers()


class DeadlineInput:
    """`wsgi.input` with a deadline on every wait for the client.

    The first read starts a helper thread that reads the server's input in pieces of `piece`
    bytes into a queue of at most `depth` pieces; `read()` waits at most `timeout` seconds for
    the next piece and then returns what has arrived, up to the size asked for. A body that
    arrives steadily but slower than `piece` bytes per `timeout` counts as stalled too.
    Requests whose body is never read start no thread.
    """

    # 256 KiB: a 1 GiB body read fastest so here (64 KiB and 1 MiB pieces were slower).
    piece = 256 * 1024
    depth = 8

    def __init__(self, stream: IO[bytes], timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._pieces: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=self.depth)
        self._closed = threading.Event()
        self._reading = False
        self._buffered: list[bytes] = []
        self._buffered_size = 0
        self._eof = False

    def _pump(self) -> None:
        try:
            while not self._closed.is_set():
                data = self._stream.read(self.piece)
                self._put(data)
                if not data:
                    return
        except Exception as exc:  # the server's input failed: the reader re-raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        # Blocks while the reader is behind; gives up once the request is over.
        while not self._closed.is_set():
            try:
                self._pieces.put(item, timeout=0.5)
            except queue.Full:
                continue
            return

    def _take(self, *, wait: bool) -> bool:
        """Buffer the next piece; False at the end of the body or, without wait, when none
        has arrived yet."""
        if not self._reading:
            self._reading = True
            _readers.run(self._pump)
        try:
            item = self._pieces.get(timeout=self._timeout) if wait else self._pieces.get_nowait()
        except queue.Empty:
            if wait:
                raise TimeoutError(
                    f"less than {self.piece} bytes of the body arrived in {self._timeout:g} s"
                ) from None
            return False
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        if not item:
            self._eof = True
            return False
        self._buffered.append(item)
        self._buffered_size += len(item)
        return True

    def _split(self, size: int) -> bytes:
        """The first `size` bytes of the buffer (all of it when size < 0)."""
        joined = b"".join(self._buffered)
        if 0 <= size < len(joined):
            data, rest = joined[:size], joined[size:]
            self._buffered, self._buffered_size = [rest], len(rest)
            return data
        self._buffered, self._buffered_size = [], 0
        return joined

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        if size == 0:
            return b""
        # Wait for one piece, then take what has already arrived up to the size asked for.
        if not self._buffered_size and not self._eof:
            self._take(wait=True)
        while not self._eof and (size < 0 or self._buffered_size < size):
            if not self._take(wait=size < 0):
                break
        return self._split(size)

    def readline(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        while (
            not self._eof
            and not any(b"\n" in piece for piece in self._buffered)
            and (size < 0 or self._buffered_size < size)
        ):
            self._take(wait=True)
        joined = self._split(-1)
        end = joined.find(b"\n") + 1 or len(joined)
        if size >= 0:
            end = min(end, size)
        if end < len(joined):
            self._buffered, self._buffered_size = [joined[end:]], len(joined) - end
        return joined[:end]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def close(self) -> None:
        self._closed.set()


class _ClosingIterable:
    """The application's response, closing the request's input with it."""

    def __init__(self, response: Iterable[bytes], body: DeadlineInput) -> None:
        self._response = response
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._response)

    def close(self) -> None:
        try:
            close = getattr(self._response, "close", None)
            if close is not None:
                close()
        finally:
            self._body.close()


class BodyDeadlineMiddleware:
    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        body = DeadlineInput(environ["wsgi.input"], uploads_settings.BODY_READ_TIMEOUT)
        environ["wsgi.input"] = body
        try:
            response = self.app(environ, start_response)
        except BaseException:
            body.close()
            raise
        return _ClosingIterable(response, body)


# What a WSGI server sets in the environ from the request itself (PEP 3333's CGI variables).
CGI_KEYS = frozenset(
    {
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "QUERY_STRING",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "SERVER_NAME",
        "SERVER_PORT",
        "SERVER_PROTOCOL",
        "REMOTE_ADDR",
        "GATEWAY_INTERFACE",
        "SERVER_SOFTWARE",
    }
)


class ProcessEnvironMiddleware:
    """granian starts every request's environ from a copy of the process environment (PATH,
    DATABASE_URL, DJANGO_SECRET_KEY, ...). They are dropped here, so they do not show in
    request.META (error pages, reports), and a variable of the process named HTTP_* cannot pass
    for a request header; a client header of the same name goes too (as httpoxy advises for
    HTTP_PROXY)."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.names = frozenset(os.environ) - CGI_KEYS

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        for name in self.names:
            environ.pop(name, None)
        return self.app(environ, start_response)
