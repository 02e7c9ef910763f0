"""Pushers that inject faults a real Incus cannot produce on demand. Only for tests; each use
says why it is not the real Incus pusher."""

import os
import time

from uploads.pushers import NotHeld, NullPusher, PushRequest, TransientPushError


class FailTwicePusher(NullPusher):
    """Fails each path's first two pushes with a transient error, then succeeds."""

    failures: dict[str, int] = {}

    def push(self, request: PushRequest) -> None:
        seen = self.failures.get(request.path, 0)
        if seen < 2:
            self.failures[request.path] = seen + 1
            raise TransientPushError(f"injected transient failure {seen + 1}")


class CrashingPusher(NullPusher):
    """Raises an unexpected exception, as a bug in a pusher would."""

    def push(self, request: PushRequest) -> None:
        raise RuntimeError("injected bug")


class SlowPusher(NullPusher):
    """Takes SLOW_PUSH_SECONDS per push (default 2): a push that is in flight on demand."""

    def push(self, request: PushRequest) -> None:
        time.sleep(float(os.environ.get("SLOW_PUSH_SECONDS", "2")))


class PublishingPusher(NullPusher):
    """Works for SLOW_PUSH_SECONDS, then "publishes" -- appends the task's path and this
    process's id to PUBLISH_LOG -- only if the worker still holds the task, as the Incus pusher
    checks right before its rename. Lets a test count deliveries across processes that are
    paused, killed or racing each other, which a real Incus cannot be made to do on demand."""

    def push(self, request: PushRequest) -> None:
        deadline = time.monotonic() + float(os.environ.get("SLOW_PUSH_SECONDS", "2"))
        while time.monotonic() < deadline:
            time.sleep(0.05)
        if not request.held():
            raise NotHeld(f"no longer held: {request.path}")
        with open(os.environ["PUBLISH_LOG"], "a") as log:
            log.write(f"{request.path} {os.getpid()}\n")
