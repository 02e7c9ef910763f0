"""Pushers that inject faults a real Incus cannot produce on demand. Only for tests; each use
says why it is not the real Incus pusher."""

import os
import time

from uploads.pushers import NullPusher, PushRequest, TransientPushError


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
