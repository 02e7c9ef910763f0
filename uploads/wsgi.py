"""WSGI middleware that counts the request body bytes the application actually read.

Django's request stream returns a short read, not an error, when a client closes before sending
all of its Content-Length; the multipart parser then keeps the truncated last part as if it were
complete. Counting at the WSGI layer lets the upload view tell a whole body from a cut one.
"""

from collections.abc import Callable, Iterable
from typing import IO, Any

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
