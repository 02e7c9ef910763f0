"""Holding an answer until a task finishes: `GET /api/uploads/<id>/?wait=SECONDS`.

Workers announce the tasks they finished (uploads.queue.announce_finished): on PostgreSQL a
NOTIFY on FINISHED_CHANNEL with the task ids, which one listening connection per web process
hands to the requests waiting for them. SQLite has no notifications (and its wake-up pipe
delivers each ring to one reader only), so there one query per web process, every
SQLITE_POLL_SECONDS, looks at all the tasks being waited for at once. On PostgreSQL the same
query runs every SAFETY_POLL_SECONDS, in case a notification was lost.

A waiting request holds a server thread, so a process lets at most UPLOADS['MAX_WAITERS'] wait
at a time: uploads and health checks always find a thread. Beyond that, a request is answered
at once with the task as it is (and `Retry-After`), which well-behaved clients treat as a cue
to ask again shortly.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable

from django.db import close_old_connections, connection

from uploads.conf import uploads_settings
from uploads.models import FINISHED, UploadTask

logger = logging.getLogger(__name__)

FINISHED_CHANNEL = "uploadsvc_finished"
SQLITE_POLL_SECONDS = 0.25
SAFETY_POLL_SECONDS = 5.0
IDLE_SECONDS = 2.0  # the listener stops (and closes its connection) after this long unused


class TooManyWaiters(Exception):
    """This process already holds as many waiting requests as it may."""


class _Waiters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[uuid.UUID, set[threading.Event]] = {}
        self._count = 0
        self._listener: threading.Thread | None = None

    def wait(
        self,
        task_ids: Collection[uuid.UUID],
        timeout: float,
        unfinished: Callable[[], Collection[uuid.UUID]],
    ) -> bool:
        """Block until none of the tasks is unfinished (True) or `timeout` passes (False).

        `unfinished` reads which of them are not finished yet; it is asked after registering
        for their announcements, so a finish in between is not lost. However many tasks, the
        request counts as one waiter.
        """
        event = threading.Event()
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._count >= int(uploads_settings.MAX_WAITERS):
                raise TooManyWaiters()
            self._count += 1
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(
                    target=self._listen, name="upload-waiters", daemon=True
                )
                self._listener.start()
        registered: set[uuid.UUID] = set()
        wanted = set(task_ids)
        try:
            while True:
                event.clear()
                self._register(event, registered, wanted)
                left = set(unfinished())
                if not left:
                    return True
                if not left <= registered:  # one was queued again meanwhile
                    wanted = left
                    continue
                wanted = left
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not event.wait(remaining):
                    return not unfinished()
        finally:
            with self._lock:
                self._count -= 1
            self._register(event, registered, set())

    def _register(
        self, event: threading.Event, registered: set[uuid.UUID], wanted: set[uuid.UUID]
    ) -> None:
        """Make `event` be woken for exactly the `wanted` tasks (`registered` is updated)."""
        with self._lock:
            for task_id in registered - wanted:
                events = self._waiting.get(task_id, set())
                events.discard(event)
                if not events:
                    self._waiting.pop(task_id, None)
            for task_id in wanted - registered:
                self._waiting.setdefault(task_id, set()).add(event)
        registered.clear()
        registered.update(wanted)

    def stop(self) -> None:
        """Wait until the listener has ended (it does once nothing is waited for)."""
        with self._lock:
            listener = self._listener
        if listener is not None:
            listener.join()

    def wake(self, task_ids: Iterable[uuid.UUID]) -> None:
        with self._lock:
            for task_id in task_ids:
                for event in self._waiting.get(task_id, ()):
                    event.set()

    def _waited_for(self) -> list[uuid.UUID]:
        with self._lock:
            return list(self._waiting)

    def _listen(self) -> None:
        try:
            if connection.vendor == "postgresql":
                self._listen_postgresql()
            else:
                self._poll_until_idle(SQLITE_POLL_SECONDS)
        except Exception:
            logger.exception("waiting for finished uploads failed; waiters fall back to timeouts")
        finally:
            connection.close()

    def _poll_once(self) -> None:
        ids = self._waited_for()
        if ids:
            close_old_connections()
            done = UploadTask.objects.filter(pk__in=ids, status__in=FINISHED)
            self.wake(done.values_list("pk", flat=True))

    def _poll_until_idle(self, interval: float) -> None:
        idle_since = None
        while True:
            self._poll_once()
            if self._waited_for():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_SECONDS:
                return
            time.sleep(interval)

    def _listen_postgresql(self) -> None:
        import psycopg

        params = connection.get_connection_params()
        with psycopg.connect(**params, autocommit=True) as conn:
            conn.execute(f"LISTEN {FINISHED_CHANNEL}")
            idle_since = None
            next_poll = time.monotonic() + SAFETY_POLL_SECONDS
            while True:
                for note in conn.notifies(timeout=0.5, stop_after=64):
                    self.wake(_parse_ids(note.payload))
                if time.monotonic() >= next_poll:
                    self._poll_once()
                    next_poll = time.monotonic() + SAFETY_POLL_SECONDS
                if self._waited_for():
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE_SECONDS:
                    return


def _parse_ids(payload: str) -> list[uuid.UUID]:
    ids = []
    for part in payload.split(","):
        try:
            ids.append(uuid.UUID(part))
        except ValueError:
            continue
    return ids


waiters = _Waiters()
