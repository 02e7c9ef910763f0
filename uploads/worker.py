"""The push worker: a pool of threads that push the files of the tasks the main thread claims.

The main thread does all the queue's writes: it records how the pushes that ended went (a whole
batch in one transaction), reaps expired leases of dead workers, claims as many ready tasks as
threads are free, re-checks their owners' grants (one look-up per batch) and hands each to a
long-lived push thread, which owns its pusher (sessions are not thread-safe) and touches no
database. It then sleeps until a push ends, a PostgreSQL NOTIFY or a ring on the SQLite wake-up
pipe arrives, or the poll interval passes.

A heartbeat thread renews the leases of what is in flight. A claim it could not renew (another
worker reaped the task) is revoked, and its push stops before publishing anything; so does a
push whose lease may run out before it ends (the database was unreachable for most of a lease).
The main thread restarts the heartbeat thread should it ever die.

The first SIGTERM/SIGINT drains: no new claims, in-flight pushes get the grace period. What is
still unfinished then is stopped (its connections closed, so it cannot publish late) and
released for another worker. A second signal does that at once.
"""

import functools
import io
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from types import FrameType
from typing import Any, BinaryIO

from django.db import close_old_connections, connection

from uploads import metrics, queue, selectors, spool
from uploads.conf import uploads_settings
from uploads.pushers import (
    NotHeld,
    OutsideGrant,
    PermanentPushError,
    Pusher,
    PushError,
    PushRequest,
    TransientPushError,
    build_pusher,
)
from uploads.queue import Claim, Completion, Result

logger = logging.getLogger(__name__)

# Pushes stopped at shutdown get this long to notice before their claims are released anyway.
STOP_WAIT_SECONDS = 5.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _body_missing() -> PermanentPushError:
    return PermanentPushError(
        f"the uploaded body is no longer in the spool ({spool.describe()}); upload it again"
    )


def _open_body(name: str) -> BinaryIO:
    try:
        return spool.open_body(name)
    except spool.BodyMissing as exc:
        raise _body_missing() from exc
    except spool.SpoolUnavailable as exc:
        raise TransientPushError(str(exc)) from exc


def _check_body(name: str) -> None:
    """Before connecting to the instance: a body gone for good fails the push at once."""
    try:
        found = spool.exists(name)
    except spool.SpoolUnavailable as exc:
        raise TransientPushError(str(exc)) from exc
    if not found:
        raise _body_missing()


@dataclass(frozen=True)
class _Ended:
    """A push that ended, on its way from its push thread to the main thread."""

    completion: Completion
    duration: float


class _Grants:
    """The owners' grants, re-read only when the access generation moved (a grant, group or
    user changed: uploads.access): every push is checked against current grants at the cost of
    a look-up only when something changed."""

    def __init__(self) -> None:
        self.generation: int | None = None
        self.owners: dict[int, selectors.OwnerGrants] = {}

    def of(self, owner_ids: set[int], *, generation: int) -> dict[int, selectors.OwnerGrants]:
        if generation != self.generation:
            self.owners.clear()
            self.generation = generation
        missing = owner_ids - self.owners.keys()
        if missing:
            self.owners.update(selectors.owner_grants(missing))
        return self.owners


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
        self._jobs: SimpleQueue[tuple[Claim, PushRequest] | None] = SimpleQueue()
        self._ended: SimpleQueue[_Ended] = SimpleQueue()
        # Completions that could not be recorded yet (the database was unreachable).
        self._unrecorded: list[_Ended] = []
        # Claims by (task, token): a task reclaimed under a new token is another claim.
        self._in_flight: dict[tuple[uuid.UUID, uuid.UUID], Claim] = {}
        self._pushers: list[Pusher] = []
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._grants = _Grants()
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
        self._start_heartbeat()
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
            # Cleared first: a push that ends meanwhile still wakes the wait below.
            self._wake.clear()
            self._supervise_heartbeat()
            self._record_ended()
            now = time.monotonic()
            if now - last_reap >= self.poll_interval:
                with self._lock:
                    holding = list(self._in_flight)
                self._guarded(functools.partial(queue.reap, holding=holding))
                last_reap = now
            claims: list[Claim] = []
            free = self.threads - len(self._in_flight)
            if free > 0 and not self._unrecorded:
                claims = self._guarded(functools.partial(self._claim, free)) or []
            close_old_connections()
            if self.burst and not claims and not self._in_flight:
                return
            # Sleep until a push ends, a NOTIFY or a ring arrives, or the poll is due.
            self._wake.wait(self.poll_interval * random.uniform(0.8, 1.2))  # noqa: S311

    def _claim(self, limit: int) -> list[Claim]:
        claims = queue.claim(worker_id=self.worker_id, limit=limit)
        if not claims:
            return claims
        grants = self._grants.of(
            {c.task.owner_id for c in claims}, generation=min(c.generation for c in claims)
        )
        refused = []
        for claim in claims:
            task = claim.task
            permission = selectors.check_grants(
                grants[task.owner_id],
                remote=task.remote,
                project=task.project,
                instance=task.instance,
                path=task.path,
                size=task.size,
                uid=task.uid,
                gid=task.gid,
            )
            with self._lock:
                self._in_flight[claim.key] = claim
            if not permission.allowed:
                error = f"grant revoked: {permission.reason}"
                refused.append(_Ended(Completion(claim, Result.PERMANENT, error), 0.0))
                continue
            self._jobs.put((claim, self._request(claim, permission.confined_to)))
        self._record(refused)
        return claims

    @staticmethod
    def _request(claim: Claim, confined_to: tuple[str, ...] | None) -> PushRequest:
        task = claim.task
        if task.body is not None:
            open_source: Callable[[], BinaryIO] = functools.partial(io.BytesIO, task.body)
        else:
            open_source = functools.partial(_open_body, task.spool_name)
        return PushRequest(
            open_source=open_source,
            size=task.size,
            instance=task.instance,
            project=task.project,
            path=task.path,
            mode=task.mode,
            uid=task.uid,
            gid=task.gid,
            create_dirs=task.create_dirs,
            remote=task.remote,
            confined_to=confined_to,
            held=claim.held,
        )

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """Run a queue statement; a database hiccup is logged and retried next round."""
        try:
            return fn()
        except Exception:
            logger.exception("queue query failed; will retry")
            connection.close()
            self._stopping.wait(min(self.poll_interval, 1.0))
            return None

    # --- recording results ---------------------------------------------------------------

    def _record_ended(self) -> None:
        ended = []
        while True:
            try:
                ended.append(self._ended.get_nowait())
            except Empty:
                break
        self._record(ended)

    def _record(self, ended: list[_Ended]) -> None:
        """Write how these pushes (and any earlier ones not written yet) went, in one go."""
        batch = self._unrecorded + ended
        if not batch:
            return
        try:
            statuses = queue.complete([e.completion for e in batch])
        except Exception:
            logger.exception("could not record %d push result(s); will try again", len(batch))
            connection.close()
            self._unrecorded = batch
            return
        self._unrecorded = []
        for item in batch:
            claim = item.completion.claim
            with self._lock:
                self._in_flight.pop(claim.key, None)
            self._report(item, statuses.get(claim))

    def _report(self, item: _Ended, status: str | None) -> None:
        completion = item.completion
        task = completion.claim.task
        outcome = status or "claim-lost"
        if completion.result == Result.RELEASED and status:
            outcome = "released"
        self.processed += 1
        metrics.PUSH_ATTEMPTS.labels(outcome=outcome).inc()
        metrics.PUSH_DURATION.labels(outcome=outcome).observe(item.duration)
        logger.info(
            "task=%s instance=%s/%s path=%s attempt=%d/%d outcome=%s duration=%.3fs%s",
            task.id,
            task.project,
            task.instance,
            task.path,
            task.attempts,
            task.max_attempts,
            outcome,
            item.duration,
            f" error={completion.error!r}" if completion.error else "",
            extra={"task_id": str(task.id), "outcome": outcome, "duration": item.duration},
        )

    # --- the push threads ---------------------------------------------------------------

    def _push_thread(self) -> None:
        pusher = self.pusher_factory()
        with self._lock:
            self._pushers.append(pusher)
        try:
            while (job := self._jobs.get()) is not None:
                claim, request = job
                started = time.monotonic()
                completion = self._push(pusher, claim, request)
                self._ended.put(_Ended(completion, time.monotonic() - started))
                self._wake.set()
        finally:
            pusher.close()

    def _push(self, pusher: Pusher, claim: Claim, request: PushRequest) -> Completion:
        try:
            if claim.task.body is None:
                _check_body(claim.task.spool_name)
            pusher.push(request)
        except NotHeld as exc:
            return Completion(claim, Result.RELEASED, exc.message)
        except OutsideGrant as exc:
            return Completion(claim, Result.REFUSED, exc.message)
        except PushError as exc:
            if claim.revoked.is_set():  # stopped on purpose: not a failure of the push
                return Completion(claim, Result.RELEASED, exc.message)
            return Completion(
                claim, Result.PERMANENT if exc.permanent else Result.TRANSIENT, exc.message
            )
        except Exception as exc:
            logger.exception("task=%s unexpected error while pushing", claim.task.id)
            return Completion(
                claim, Result.TRANSIENT, f"internal error: {type(exc).__name__}: {exc}"
            )
        return Completion(claim, Result.SUCCEEDED)

    # --- the heartbeat ------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="heartbeat", daemon=True
        )
        self._heartbeat.start()

    def _supervise_heartbeat(self) -> None:
        if self._heartbeat is not None and not self._heartbeat.is_alive():
            logger.error("the heartbeat thread died; starting a new one")
            self._start_heartbeat()

    def _heartbeat_loop(self) -> None:
        """Renew the leases of what is in flight and say this worker is alive."""
        interval = max(min(uploads_settings.LEASE_SECONDS / 3, 10.0), 0.05)
        while not self._force.is_set():
            with self._lock:
                claims = list(self._in_flight.values())
            if self._stopping.is_set() and not claims:
                return
            try:
                for lost in queue.renew(claims):
                    logger.warning(
                        "task=%s: another worker took it over (the lease expired); its push "
                        "stops before publishing",
                        lost.task.id,
                    )
                queue.worker_beat(
                    worker_id=self.worker_id,
                    threads=self.threads,
                    in_flight=len(claims),
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
        while any(t.is_alive() for t in pool) and not self._force.is_set():
            if time.monotonic() >= deadline:
                break
            self._wake.clear()
            self._record_ended()
            self._wake.wait(min(deadline - time.monotonic(), 0.2))
        self._record_ended()
        with self._lock:
            unfinished = list(self._in_flight.values())
        if not unfinished:
            logger.info("worker %s stopped after %d push(es)", self.worker_id, self.processed)
            return 0
        # Stop what still runs before giving it back: it must not publish once another worker
        # may be pushing the same task.
        for claim in unfinished:
            claim.revoked.set()
        with self._lock:
            pushers = list(self._pushers)
        for pusher in pushers:
            pusher.interrupt()
        # Their connections are closed, so none can publish any more; a moment to clean up and
        # say how they ended, unless a second signal asked to exit at once.
        stop_by = time.monotonic() + (0 if self._force.is_set() else STOP_WAIT_SECONDS)
        for thread in pool:
            thread.join(timeout=max(stop_by - time.monotonic(), 0))
        self._record_ended()
        with self._lock:
            unfinished = list(self._in_flight.values())
        self._record(
            [
                _Ended(Completion(c, Result.RELEASED, queue.INTERRUPTED_ERROR), 0.0)
                for c in unfinished
            ]
        )
        logger.warning("released %d unfinished push(es) for another worker", len(unfinished))
        return 1
