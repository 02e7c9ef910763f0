"""The client's HTTP side: the service's upload API through one `requests` session, with bounded
retries that honour Retry-After, and the server's own error messages.

Retried: connection errors and timeouts, and the answers that say "later" (429, 502, 503, 504).
An upload is resent with the same Idempotency-Key, so a resend after a lost answer gets the
first upload's task back instead of queueing the file twice.
"""

import base64
import email.utils
import random
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests_toolbelt import MultipartEncoder

from uploads.cli.sources import Body, SourceError

Task = dict[str, Any]

FINISHED = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
TRIES = 5  # up to 1 + 2 + 4 + 8 s of back-off: a server that restarts is waited for
BACKOFF_CAP = 8.0
RETRY_AFTER_CAP = 120.0  # a server asking for a longer pause gets an error, not a silent hang
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0  # for the answer to an upload, which comes once the body is on disk
# Bytes handed to the socket per send; urllib3's 16 KiB default costs CPU on large files.
SEND_BLOCK = 1 << 20


class ApiError(Exception):
    """The server refused the request, or could not be reached within the retries.

    `fatal` errors (bad credentials, an unreachable server) will not go away for the next file.
    """

    def __init__(self, message: str, status: int | None = None, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.fatal = fatal


class SourceChanged(SourceError):
    pass


def client_version() -> str:
    try:
        return version("uploadsvc")
    except PackageNotFoundError:
        return "unknown"


def error_message(response: requests.Response) -> str:
    """The server's own words: DRF's `{"detail": …}` or `{"field": ["…"]}`, after the status."""
    head = f"{response.status_code} {response.reason}".strip()
    try:
        data = response.json()
    except ValueError:
        return head
    if isinstance(data, dict):
        if "detail" in data:
            return f"{head}: {data['detail']}"
        parts = []
        for field, errors in data.items():
            text = " ".join(map(str, errors)) if isinstance(errors, list) else str(errors)
            parts.append(f"{field}: {text}")
        return f"{head}: {'; '.join(parts)}"
    return f"{head}: {data}"


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests/urllib3 error, e.g. "Connection refused"."""
    seen: BaseException = exc
    while True:
        inner = getattr(seen, "reason", None)
        if not isinstance(inner, BaseException) and seen.args:
            inner = seen.args[0]
        if not isinstance(inner, BaseException) or inner is seen:
            break
        seen = inner
    text = str(seen)
    if match := re.search(r"\[Errno -?\d+\] ([^'\")]+)", text):
        return match.group(1).strip()
    if isinstance(seen, requests.Timeout) or "timed out" in text:
        return "timed out"
    if seen.args and isinstance(seen.args[0], str):
        return seen.args[0].rstrip(".")
    return text or type(seen).__name__


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _backoff(attempt: int) -> float:
    # Jitter spreads the resends of many clients that lost the server at the same moment.
    return min(BACKOFF_CAP, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # noqa: S311


class _CountingReader:
    """A request body of a known length that reports every chunk it hands out.

    requests takes the Content-Length from `len()` and streams the body through `read()`; a
    file that turns out shorter than it was when hashed stops the upload instead of leaving
    the server waiting for bytes that never come.
    """

    def __init__(self, raw: Any, length: int, sent: Callable[[int], None]) -> None:
        self.raw = raw
        self.length = length
        self.remaining = length
        self.sent = sent

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        if want <= 0:
            return b""
        chunk: bytes = self.raw.read(want)
        if not chunk:
            raise SourceChanged("the file became shorter while it was being sent")
        self.remaining -= len(chunk)
        self.sent(len(chunk))
        return chunk


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("blocksize", SEND_BLOCK)
        super().init_poolmanager(*args, **kwargs)


class Client:
    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        notice: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = url.rstrip("/")
        self.notice = notice
        self.sleep = sleep
        self.session = requests.Session()
        self.session.mount("http://", _Adapter())
        self.session.mount("https://", _Adapter())
        self.session.headers["User-Agent"] = f"uploadsvc-cli/{client_version()}"
        if token:
            self.session.headers["Authorization"] = f"Token {token}"

    def close(self) -> None:
        self.session.close()

    def _send(
        self,
        method: str,
        url: str,
        *,
        what: str,
        body: Callable[[], tuple[Any, dict[str, str], Callable[[], None]]] | None = None,
        params: dict[str, str] | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> requests.Response:
        if not url.startswith(("http://", "https://")):
            url = self.base + url
        for attempt in range(1, TRIES + 1):
            data, headers, cleanup = body() if body else (None, {}, lambda: None)
            try:
                response = self.session.request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    params=params,
                    timeout=(CONNECT_TIMEOUT, read_timeout),
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = f"cannot reach {self.base}: {_reason(exc)}"
                delay = _backoff(attempt)
                status = None
            else:
                if response.status_code not in RETRY_STATUSES:
                    if response.status_code == 401:
                        raise ApiError(
                            f"{error_message(response)} (set UPLOADSVC_TOKEN or --token)",
                            401,
                            fatal=True,
                        )
                    return response
                status = response.status_code
                problem = error_message(response)
                delay = _retry_after(response) or _backoff(attempt)
            finally:
                cleanup()
            if attempt == TRIES:
                raise ApiError(f"{problem} (gave up after {TRIES} tries)", status, fatal=True)
            if delay > RETRY_AFTER_CAP:
                raise ApiError(f"{problem} (the server asks to wait {delay:.0f}s)", status)
            self.notice(f"{what}: {problem}; trying again in {delay:.1f}s")
            self.sleep(delay)
        raise AssertionError("unreachable")

    def upload(
        self,
        fields: dict[str, str],
        body: Body,
        *,
        filename: str,
        idempotency_key: str,
        sent: Callable[[], Callable[[int], None]],
    ) -> Task:
        """POST one file; the task (the first upload's, when this is a resend of it), or for
        several instances or a glob the batch, with a task per instance.

        Raw body with the parameters in X-* headers, the service's main form. A value that
        cannot travel in an HTTP header (a path with non-ASCII characters) goes as a streamed
        multipart form instead, whose fields are UTF-8.
        """
        raw_ok = all(v.isascii() and v.isprintable() for v in (*fields.values(), filename))

        def request() -> tuple[Any, dict[str, str], Callable[[], None]]:
            file = body.reopen()
            headers = {"Idempotency-Key": idempotency_key}
            if raw_ok:
                headers.update({HEADERS[name]: value for name, value in fields.items()})
                headers["Content-Type"] = "application/octet-stream"
                headers["X-Host-Path"] = filename
                headers["Repr-Digest"] = f"sha-256=:{_b64(body.sha256)}:"
                return _CountingReader(file, body.size, sent()), headers, file.close
            encoder = MultipartEncoder(
                fields=[
                    *fields.items(),
                    ("sha256", body.sha256),
                    ("file", (filename, file, "application/octet-stream")),
                ]
            )
            headers["Content-Type"] = encoder.content_type
            return _CountingReader(encoder, encoder.len, sent()), headers, file.close

        response = self._send("POST", "/api/uploads/", what="upload", body=request)
        if response.status_code != 202:
            raise ApiError(error_message(response), response.status_code)
        task: Task = response.json()
        return task

    def task(self, task_id: str, *, wait: int | None = None) -> Task:
        """One task; with `wait`, the server may hold the answer up to that many seconds until
        the task is finished."""
        params = {"wait": str(wait)} if wait else None
        response = self._send(
            "GET",
            f"/api/uploads/{task_id}/",
            what="status",
            params=params,
            read_timeout=(wait or 0) + READ_TIMEOUT,
        )
        return self._task_from(response, task_id)

    def batch(self, batch_id: str, *, wait: int | None = None) -> Task:
        """A fan-out with its tasks; with `wait`, the server may hold the answer up to that many
        seconds until every task is finished."""
        params = {"wait": str(wait)} if wait else None
        response = self._send(
            "GET",
            f"/api/batches/{batch_id}/",
            what="status",
            params=params,
            read_timeout=(wait or 0) + READ_TIMEOUT,
        )
        if response.status_code == 404:
            raise ApiError(f"no batch {batch_id} (or it is not yours)", 404)
        if response.status_code != 200:
            raise ApiError(error_message(response), response.status_code)
        batch: Task = response.json()
        return batch

    def wait(
        self,
        task_id: str,
        deadline: float | None,
        *,
        on_update: Callable[[Task], None] = lambda task: None,
    ) -> Task:
        """Poll until the task is finished or the deadline (time.monotonic) passes."""
        return self._poll(
            lambda ask: self.task(task_id, wait=ask),
            lambda task: task["status"] in FINISHED,
            deadline,
            on_update,
        )

    def wait_batch(
        self,
        batch_id: str,
        deadline: float | None,
        *,
        on_update: Callable[[Task], None] = lambda batch: None,
    ) -> Task:
        """Poll until every task of the batch is finished or the deadline passes."""
        return self._poll(
            lambda ask: self.batch(batch_id, wait=ask),
            lambda batch: bool(batch["finished"]),
            deadline,
            on_update,
        )

    def _poll(
        self,
        fetch: Callable[[int], Task],
        finished: Callable[[Task], bool],
        deadline: float | None,
        on_update: Callable[[Task], None],
    ) -> Task:
        """Ask until `finished` or the deadline (time.monotonic) passes.

        The server holds each answer up to `?wait=` seconds; a server that answers at once
        instead (one that ignores `wait`, or has too many waiters) gets a growing pause between
        calls, 0.5 s up to 2 s, rather than a tight loop.
        """
        pause = 0.5
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            ask = 60 if remaining is None else max(1, min(60, int(remaining + 0.999)))
            started = time.monotonic()
            task = fetch(ask)
            on_update(task)
            if finished(task):
                return task
            if deadline is not None and time.monotonic() >= deadline:
                return task
            if time.monotonic() - started < ask / 2:
                nap = pause if deadline is None else min(pause, deadline - time.monotonic())
                self.sleep(max(nap, 0.0))
                pause = min(pause * 2, 2.0)
            else:
                pause = 0.5

    def tasks(self, *, status: str | None, container: str | None) -> Iterator[Task]:
        """Every task the user may see, newest first, following the pages."""
        params: dict[str, str] | None = {
            k: v for k, v in (("status", status), ("container", container)) if v
        }
        url: str | None = "/api/uploads/"
        while url:
            response = self._send("GET", url, what="list", params=params)
            if response.status_code != 200:
                raise ApiError(error_message(response), response.status_code)
            page = response.json()
            yield from page["results"]
            url, params = page.get("next"), None  # `next` carries the query

    def retry(self, task_id: str) -> Task:
        return self._action(task_id, "retry")

    def cancel(self, task_id: str) -> Task:
        return self._action(task_id, "cancel")

    def _action(self, task_id: str, action: str) -> Task:
        response = self._send("POST", f"/api/uploads/{task_id}/{action}/", what=action)
        return self._task_from(response, task_id)

    @staticmethod
    def _task_from(response: requests.Response, task_id: str) -> Task:
        if response.status_code == 404:
            raise ApiError(f"no upload {task_id} (or it is not yours)", 404)
        if response.status_code != 200:
            raise ApiError(error_message(response), response.status_code)
        task: Task = response.json()
        return task


# Parameter names → the raw form's headers (the form fields have the parameter names).
HEADERS = {
    "container": "X-Container-Name",
    "path": "X-File-Path",
    "mode": "X-File-Mode",
    "uid": "X-File-Uid",
    "gid": "X-File-Gid",
    "create_dirs": "X-Create-Dirs",
    "project": "X-Incus-Project",
    "remote": "X-Incus-Remote",
}


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()
