"""The push worker: a pool of threads that claim ready tasks and push their files.

The main thread claims (one short transaction for a batch), hands each claim to a pool thread,
and sleeps until a slot frees, a PostgreSQL NOTIFY arrives or the poll interval passes. A
heartbeat thread renews the leases of what is in flight; expired leases of dead workers are
reaped by the loop itself. First SIGTERM/SIGINT drains, a second one exits at once.
"""

import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from types import FrameType
from typing import Any

from django.db import close_old_connections, connection

from uploads import services
from uploads.conf import uploads_settings
from uploads.pushers import Pusher, PushError, PushRequest, build_pusher
from uploads.spool import spool_path

logger = logging.getLogger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
        self._local = threading.local()
        self._pushers: list[Pusher] = []
        self._pushers_lock = threading.Lock()
        self._in_flight: dict[Future[None], services.Claim] = {}
        self._in_flight_lock = threading.Lock()
        self.processed = 0

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming and drain (what the first signal does)."""
        self._stopping.set()
        self._wake.set()

    def _handle_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stopping.is_set():
            logger.warning("second signal: exiting now, leases of unfinished pushes will expire")
            self._force.set()
            self._wake.set()
            return
        logger.info(
            "signal %s: no new claims; finishing %d push(es) within %.0fs",
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
        """Run until stopped (or, with burst, until nothing is ready). Returns an exit code."""
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
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        if not self.burst and connection.vendor == "postgresql":
            threading.Thread(target=self._listen_loop, name="listen", daemon=True).start()
        executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="push")
        try:
            self._loop(executor)
            return self._drain(executor)
        finally:
            self._stopping.set()
            self._close_pushers()
            close_old_connections()

    def _report_target(self) -> None:
        pusher = self.pusher_factory()
        try:
            problem = pusher.check()
        finally:
            pusher.close()
        if problem:
            logger.warning("push target not reachable: %s; tasks will wait and be retried", problem)

    # --- the loop -----------------------------------------------------------------------

    def _loop(self, executor: ThreadPoolExecutor) -> None:
        last_reap = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now - last_reap >= self.poll_interval:
                self._guarded(services.reap_expired_leases)
                last_reap = now
            free = self.threads - len(self._in_flight)
            claims: list[services.Claim] = []
            if free > 0:
                claims = self._guarded(lambda n=free: self._claim(n)) or []
                for claim in claims:
                    self._submit(executor, claim)
            close_old_connections()
            if self.burst and not claims and not self._in_flight:
                return
            if claims and len(claims) == free:
                # The pool is full: wait for a slot, not for the poll interval.
                self._wait_for_slot()
                continue
            if not claims:
                self._wake.wait(self.poll_interval * random.uniform(0.8, 1.2))  # noqa: S311
                self._wake.clear()

    def _claim(self, limit: int) -> list[services.Claim]:
        return services.claim_tasks(worker_id=self.worker_id, limit=limit)

    def _wait_for_slot(self) -> None:
        with self._in_flight_lock:
            futures = list(self._in_flight)
        if futures:
            wait_futures(futures, timeout=self.poll_interval, return_when="FIRST_COMPLETED")

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """Run a queue statement; a database hiccup is logged and retried next round."""
        try:
            return fn()
        except Exception:
            logger.exception("queue query failed; will retry")
            close_old_connections()
            try:
                connection.close()
            except Exception:  # noqa: S110  (the connection is already broken)
                pass
            time.sleep(min(self.poll_interval, 1.0))
            return None

    def _submit(self, executor: ThreadPoolExecutor, claim: services.Claim) -> None:
        future = executor.submit(self._process, claim)
        with self._in_flight_lock:
            self._in_flight[future] = claim
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        with self._in_flight_lock:
            self._in_flight.pop(future, None)
        self._wake.set()

    # --- one push -----------------------------------------------------------------------

    def _pusher(self) -> Pusher:
        pusher: Pusher | None = getattr(self._local, "pusher", None)
        if pusher is None:
            pusher = self.pusher_factory()
            self._local.pusher = pusher
            with self._pushers_lock:
                self._pushers.append(pusher)
        return pusher

    def _close_pushers(self) -> None:
        with self._pushers_lock:
            for pusher in self._pushers:
                pusher.close()
            self._pushers.clear()

    def _process(self, claim: services.Claim) -> None:
        close_old_connections()
        task = claim.task
        started = time.monotonic()
        request = PushRequest(
            source=spool_path(task.spool_name),
            size=task.size,
            instance=task.instance,
            project=task.project,
            path=task.path,
            mode=task.mode,
            uid=task.uid,
            gid=task.gid,
            create_dirs=task.create_dirs,
        )
        error: str | None = None
        permanent = False
        try:
            if not request.source.is_file():
                raise services.SpoolFileMissing("the spooled file is missing on this server")
            self._pusher().push(request)
        except PushError as exc:
            error, permanent = exc.message, exc.permanent
        except services.SpoolFileMissing as exc:
            error, permanent = str(exc), True
        except Exception as exc:
            logger.exception("task=%s unexpected error while pushing", task.pk)
            error = f"internal error: {type(exc).__name__}: {exc}"
        try:
            if error is None:
                outcome = "succeeded" if services.complete_success(claim=claim) else None
            else:
                outcome = services.complete_failure(claim=claim, error=error, permanent=permanent)
        except Exception:
            logger.exception("task=%s could not record its result; its lease will expire", task.pk)
            outcome = "unrecorded"
        finally:
            close_old_connections()
        self.processed += 1
        logger.info(
            "task=%s instance=%s/%s path=%s attempt=%d/%d outcome=%s duration=%.3fs%s",
            task.pk,
            task.project,
            task.instance,
            task.path,
            task.attempts,
            task.max_attempts,
            outcome or "claim-lost",
            time.monotonic() - started,
            f" error={error!r}" if error else "",
        )

    # --- background threads -------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        interval = max(uploads_settings.LEASE_SECONDS / 3, 0.05)
        while not self._stopping.wait(interval) or self._in_flight:
            with self._in_flight_lock:
                tokens = list({c.token for c in self._in_flight.values()})
            if tokens:
                try:
                    services.renew_leases(tokens=tokens)
                except Exception:
                    logger.exception("could not renew leases")
                finally:
                    close_old_connections()
            if self._force.is_set():
                return
            if self._stopping.is_set():
                time.sleep(interval)

    def _listen_loop(self) -> None:
        import psycopg

        while not self._stopping.is_set():
            try:
                params = connection.get_connection_params()
                with psycopg.connect(**params, autocommit=True) as conn:
                    conn.execute(f"LISTEN {services.NOTIFY_CHANNEL}")
                    while not self._stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self._wake.set()
            except Exception as exc:
                logger.warning("LISTEN connection failed (%s); polling meanwhile", exc)
                self._stopping.wait(self.poll_interval * 5)

    # --- shutdown -----------------------------------------------------------------------

    def _drain(self, executor: ThreadPoolExecutor) -> int:
        with self._in_flight_lock:
            futures = list(self._in_flight)
        deadline = time.monotonic() + self.grace_period
        while futures and not self._force.is_set() and time.monotonic() < deadline:
            wait_futures(futures, timeout=0.2)
            futures = [f for f in futures if not f.done()]
        with self._in_flight_lock:
            unfinished = [c for f, c in self._in_flight.items() if not f.done()]
        released = 0
        for claim in unfinished:
            try:
                released += services.release_claim(claim=claim)
            except Exception:
                logger.exception(
                    "task=%s could not be released; its lease will expire", claim.task.pk
                )
        executor.shutdown(wait=not unfinished, cancel_futures=True)
        if unfinished:
            logger.warning("released %d unfinished push(es) for another worker", released)
            close_old_connections()
            logging.shutdown()
            # Pool threads blocked in I/O cannot be interrupted; their claims are released.
            os._exit(1)
        logger.info("worker %s stopped after %d push(es)", self.worker_id, self.processed)
        return 0
