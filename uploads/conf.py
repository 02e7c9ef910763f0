"""The app's settings: one namespaced `UPLOADS` dict with defaults, read lazily.

Modelled on DRF's `api_settings`: values are looked up on first use, never at import time, and
the cache is dropped on `setting_changed` so tests can override them.
"""

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

DEFAULTS: dict[str, Any] = {
    # Where uploads wait for their push; one file per task, named by the task id.
    "SPOOL_DIR": Path("var/spool"),
    # Largest body accepted, in bytes (413 above it, before the body is read).
    "MAX_UPLOAD_SIZE": 10 * 1024**3,
    # Free space that must remain on the spool's filesystem after an upload (else 507).
    "SPOOL_RESERVE_BYTES": 64 * 1024**2,
    # Pending tasks at most; beyond it uploads get 503 with Retry-After.
    "MAX_PENDING": 10_000,
    "RETRY_AFTER_SECONDS": 30,
    # The Incus API: a unix socket path or an https:// URL.
    "INCUS_ENDPOINT": "/var/lib/incus/unix.socket",
    "INCUS_TIMEOUT": 60.0,
    # An SFTP session to an instance stays open this long after a push for the next one to
    # reuse (0: close after each push). An open session holds the instance: `incus start` and
    # a graceful `incus stop` wait for it to close.
    "SFTP_IDLE_SECONDS": 1.0,
    # Read each pushed file back and compare its SHA-256 (doubles the I/O of a push).
    "VERIFY_SHA256": False,
    # Named Incus servers: {"name": {"endpoint": ..., "cert": ..., "key": ..., "verify": ...}}.
    # None means one remote, "local", at INCUS_ENDPOINT.
    "REMOTES": None,
    # Dotted path of the pusher class (like EMAIL_BACKEND).
    "PUSHER": "uploads.incus.IncusPusher",
    "MAX_ATTEMPTS": 5,
    "RETRY_BASE_SECONDS": 2.0,
    "RETRY_MAX_SECONDS": 600.0,
    # How long a claim stays valid without a heartbeat.
    "LEASE_SECONDS": 60.0,
    # Lifetime of API tokens in seconds; None for tokens that never expire.
    "TOKEN_TTL_SECONDS": None,
    # Seconds a client may go without sending body bytes before the upload is abandoned (408).
    "BODY_READ_TIMEOUT": 60.0,
    # Bodies up to this size travel in their task's row instead of a spool file: one INSERT
    # makes them durable (no file to create, fsync and rename).
    "INLINE_MAX_BYTES": 64 * 1024,
    # Requests one web process lets wait for a task to finish (`?wait=`) at a time: each holds
    # a server thread, so keep it well below the server's threads per process. Beyond it, a
    # request is answered at once with the task as it is (and Retry-After).
    "MAX_WAITERS": 2,
    # Size of the chunks read from the request and written to the spool.
    "CHUNK_SIZE": 1024 * 1024,
}


class UploadsSettings:
    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Invalid UPLOADS setting: {name!r}")
        if name not in self._cache:
            user = getattr(settings, "UPLOADS", {})
            self._cache[name] = user.get(name, DEFAULTS[name])
        return self._cache[name]

    @property
    def spool_dir(self) -> Path:
        return Path(self.SPOOL_DIR)

    @property
    def remotes(self) -> dict[str, dict[str, Any]]:
        configured: dict[str, dict[str, Any]] | None = self.REMOTES
        if configured:
            return configured
        return {"local": {"endpoint": self.INCUS_ENDPOINT}}

    def reload(self) -> None:
        self._cache.clear()


uploads_settings = UploadsSettings()


@receiver(setting_changed)
def _reload_uploads_settings(*, setting: str, **kwargs: Any) -> None:
    if setting == "UPLOADS":
        uploads_settings.reload()
