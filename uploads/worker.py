"""The push worker: a pool of threads that claim ready tasks and push their files.

The main thread claims (one short transaction per batch) and hands each claim to one of N
long-lived push threads, each with its own pusher (pylxd sessions are not thread-safe) and its
own database connection, which it closes when it ends. The main thread then sleeps until a slot
frees, a PostgreSQL NOTIFY or a ring on the SQLite wake-up pipe (uploads.wakeup) arrives, or
the poll interval passes. A heartbeat thread renews the leases of what is in flight; expired
leases of dead workers are reaped by the loop itself.
The first SIGTERM/SIGINT drains, a second one releases what is in flight and exits.
"""

import functools
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from queue import SimpleQueue
from types import FrameType
from typing import Any, BinaryIO

from django.db import close_old_connections, connection, connections

from uploads import metrics, queue, selectors, services, spool
from uploads.conf import uploads_settings
from uploads.pushers import (
    OutsideGrant,
    PermanentPushError,
    Pusher,
    PushError,
    PushRequest,
    build_pusher,
)

logger = logging.getLogger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _open_body(name: str) -> BinaryIO:
    try:
        return spool.open_body(name)
    except spool.BodyMissing as exc:
        raise PermanentPushError("the spooled file is missing on this server") from exc


class Worker:
    def __init__(
        self,
        *,
        threads: int = 4,
        poll_interval: float = 1.0,
        burst: bool = False,
        worker_id: str | None = None,
        grace_period: float = 30.0,
        pusher_factory: Callable[[], Pusher] = build_pusher,
    ) -> None:
        self.threads = threads
        self.poll_interval = poll_interval
        self.burst = burst
        self.worker_id = worker_id or default_worker_id()
        self.grace_period = grace_period
        self.pusher_factory = pusher_factory

        self._stopping = threading.Event()
        self._force = threading.Event()
        self._wake = threading.Event()
        self._jobs: SimpleQueue[queue.Claim | None] = SimpleQueue()
        self._in_flight: dict[uuid.UUID, queue.Claim] = {}
        self._lock = threading.Lock()
        self.processed = 0

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and drain (what the first signal does)."""
        self._stopping.set()
        self._wake.set()

    def _handle_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping.is_set():
            logger.warning("second signal: releasing unfinished pushes and exiting now")
            self._force.set()
            self._wake.set()
            return
        logger.info(
            "%s: no new claims; finishing %d push(es) within %.0fs",
            signal.Signals(signum).name,
            len(self._in_flight),
            self.grace_period,
        )
        self.stop()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle_signal)
            signal.signal(signal.SIGINT, self._handle_signal)

    def run(self) -> int:
        """Run until stopped (or, with burst, until nothing is ready).

        Returns 0 after a clean drain, 1 when unfinished pushes had to be released.
        """
        self._stopping.clear()
        self._force.clear()
        self._install_signal_handlers()
        logger.info(
            "worker %s starting: %d thread(s), poll %.2fs%s",
            self.worker_id,
            self.threads,
            self.poll_interval,
            ", burst" if self.burst else "",
        )
        self._report_target()
        pool = [
            threading.Thread(target=self._push_thread, name=f"push-{n}", daemon=True)
            for n in range(self.threads)
        ]
        for thread in pool:
            thread.start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        if not self.burst:
            threading.Thread(
                target=queue.listen_for_work,
                kwargs={
                    "wake": self._wake,
                    "stopping": self._stopping,
                    "retry": self.poll_interval,
                },
                name="listen",
                daemon=True,
            ).start()
        try:
            self._loop()
            return self._drain(pool)
        finally:
            self._stopping.set()
            self._guarded(lambda: queue.worker_gone(worker_id=self.worker_id))
            connection.close()

    def _report_target(self) -> None:
        pusher = self.pusher_factory()
        try:
            problem = pusher.check()
        finally:
            pusher.close()
        if problem:
            logger.warning("push target not reachable: %s; tasks will wait and be retried", problem)

    # --- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        last_reap = 0.0
        while not self._stopping.is_set():
            # Cleared before claiming: a push that ends meanwhile still wakes the wait below.
            self._wake.clear()
            now = time.monotonic()
            if now - last_reap >= self.poll_interval:
                self._guarded(queue.reap_expired_leases)
                last_reap = now
            free = self.threads - len(self._in_flight)
            claims: list[queue.Claim] = []
            if free > 0:
                claims = self._guarded(functools.partial(self._claim, free)) or []
                for claim in claims:
                    with self._lock:
                        self._in_flight[claim.task.pk] = claim
                    self._jobs.put(claim)
            close_old_connections()
            if self.burst and not claims and not self._in_flight:
                return
            # Sleep until a push ends, a NOTIFY or a ring arrives, or the poll is due.
            self._wake.wait(self.poll_interval * random.uniform(0.8, 1.2))  # noqa: S311

    def _claim(self, limit: int) -> list[queue.Claim]:
        return queue.claim_tasks(worker_id=self.worker_id, limit=limit)

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """Run a queue statement; a database hiccup is logged and retried next round."""
        try:
            return fn()
        except Exception:
            logger.exception("queue query failed; will retry")
            connection.close()
            self._stopping.wait(min(self.poll_interval, 1.0))
            return None

    # --- the push threads ---------------------------------------------------------------

    def _push_thread(self) -> None:
        pusher = self.pusher_factory()
        try:
            while (claim := self._jobs.get()) is not None:
                try:
                    self._process(pusher, claim)
                finally:
                    with self._lock:
                        self._in_flight.pop(claim.task.pk, None)
                    self._wake.set()
        finally:
            pusher.close()
            connections.close_all()

    def _process(self, pusher: Pusher, claim: queue.Claim) -> None:
        task = claim.task
        started = time.monotonic()
        error: str | None = None
        permanent = refused = False
        try:
            if not spool.exists(task.spool_name):
                raise services.SpoolFileMissing("the spooled file is missing on this server")
            permission = selectors.task_permission(task)
            if not permission.allowed:
                raise services.NotGranted(permission.reason)
            pusher.push(
                PushRequest(
                    open_source=functools.partial(_open_body, task.spool_name),
                    size=task.size,
                    instance=task.instance,
                    project=task.project,
                    path=task.path,
                    mode=task.mode,
                    uid=task.uid,
                    gid=task.gid,
                    create_dirs=task.create_dirs,
                    remote=task.remote,
                    confined_to=permission.confined_to,
                )
            )
        except OutsideGrant as exc:
            error, permanent, refused = exc.message, True, True
        except PushError as exc:
            error, permanent = exc.message, exc.permanent
        except services.SpoolFileMissing as exc:
            error, permanent = str(exc), True
        except services.NotGranted as exc:
            error, permanent = f"grant revoked: {exc}", True
        except Exception as exc:
            logger.exception("task=%s unexpected error while pushing", task.pk)
            error = f"internal error: {type(exc).__name__}: {exc}"
        outcome: str | None
        try:
            if error is None:
                outcome = "succeeded" if queue.complete_success(claim=claim) else None
            else:
                outcome = queue.complete_failure(
                    claim=claim, error=error, permanent=permanent, refused=refused
                )
        except Exception:
            logger.exception("task=%s could not record its result; its lease will expire", task.pk)
            outcome = "unrecorded"
        finally:
            close_old_connections()
        self.processed += 1
        duration = time.monotonic() - started
        metrics.PUSH_ATTEMPTS.labels(outcome=outcome or "claim-lost").inc()
        metrics.PUSH_DURATION.labels(outcome=outcome or "claim-lost").observe(duration)
        logger.info(
            "task=%s instance=%s/%s path=%s attempt=%d/%d outcome=%s duration=%.3fs%s",
            task.pk,
            task.project,
            task.instance,
            task.path,
            task.attempts,
            task.max_attempts,
            outcome or "claim-lost",
            duration,
            f" error={error!r}" if error else "",
            extra={"task_id": str(task.pk), "outcome": outcome, "duration": duration},
        )

    # --- background threads -------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Renew the leases of what is in flight and say this worker is alive."""
        interval = max(min(uploads_settings.LEASE_SECONDS / 3, 10.0), 0.05)
        while not self._force.is_set():
            with self._lock:
                tokens = list({c.token for c in self._in_flight.values()})
            if self._stopping.is_set() and not tokens:
                return
            try:
                if tokens:
                    queue.renew_leases(tokens=tokens)
                queue.worker_beat(
                    worker_id=self.worker_id,
                    threads=self.threads,
                    in_flight=len(tokens),
                    processed=self.processed,
                )
            except Exception:
                logger.exception("heartbeat failed; will try again")
            finally:
                # Beats are seconds apart: holding a connection between them is not worth it.
                connection.close()
            self._force.wait(interval)

    # --- shutdown -----------------------------------------------------------------------

    def _drain(self, pool: list[threading.Thread]) -> int:
        for _ in pool:
            self._jobs.put(None)
        deadline = time.monotonic() + self.grace_period
        for thread in pool:
            while thread.is_alive() and not self._force.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                thread.join(timeout=min(remaining, 0.2))
        with self._lock:
            unfinished = list(self._in_flight.values())
        if not unfinished:
            logger.info("worker %s stopped after %d push(es)", self.worker_id, self.processed)
            return 0
        released = 0
        for claim in unfinished:
            try:
                released += queue.release_claim(claim=claim)
            except Exception:
                logger.exception("task=%s not released; its lease will expire", claim.task.pk)
        logger.warning("released %d unfinished push(es) for another worker", released)
        return 1
