"""What a worker hands a pusher, what a pusher may raise, and how the configured one is built.

The pusher is chosen by `UPLOADS['PUSHER']` (a dotted path, like Django's EMAIL_BACKEND): the
Incus pusher by default, the null pusher to measure the queue on its own.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from django.utils.module_loading import import_string

from uploads.conf import uploads_settings


@dataclass(frozen=True)
class PushRequest:
    # Opens the body to push, from its start; may raise PushError.
    open_source: Callable[[], BinaryIO]
    size: int
    instance: str
    project: str
    path: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    create_dirs: bool = False
    remote: str = "local"
    # The granted directories the file must really land in, symlinks in the instance
    # followed; None when its owner may write anywhere in the instance.
    confined_to: tuple[str, ...] | None = None
    # Whether the worker still holds the task: asked while writing and right before the file
    # is published. When it turns False another worker may be pushing the same task.
    held: Callable[[], bool] = lambda: True


class PushError(Exception):
    """A push failed. `permanent` errors fail the task at once; others are retried."""

    permanent = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientPushError(PushError):
    permanent = False


class PermanentPushError(PushError):
    permanent = True


class NotHeld(TransientPushError):
    """The worker no longer holds the task (its lease could not be renewed in time, or it is
    shutting down): the push stopped before publishing anything."""


class OutsideGrant(PermanentPushError):
    """The file would land outside the directories its owner was granted (a symlink in the
    instance leads elsewhere, or a granted directory is missing): refused and audited."""


class Pusher(Protocol):
    def push(self, request: PushRequest) -> None:
        """Deliver the request's body to the instance, or raise PushError."""

    def check(self) -> str | None:
        """None when the target is reachable, else why not (for start-up and health)."""

    def interrupt(self) -> None:
        """From another thread: make a push in progress fail now (its connections close)."""

    def close(self) -> None: ...


class NullPusher:
    """Delivers nothing, instantly: for benchmarking the queue itself."""

    def push(self, request: PushRequest) -> None:
        return None

    def check(self) -> str | None:
        return None

    def interrupt(self) -> None:
        return None

    def close(self) -> None:
        return None


def pusher_class() -> type:
    """The configured pusher's class (UPLOADS['PUSHER']); ImportError if it cannot be found."""
    found: type = import_string(uploads_settings.PUSHER)
    return found


def build_pusher() -> Pusher:
    pusher: Pusher = pusher_class()()
    return pusher
