"""The app's settings: one namespaced `UPLOADS` dict, read lazily; this module is the one place
that knows each setting's default, type and meaning.

Modelled on DRF's `api_settings`: values are looked up on first use, never at import time, and
the cache is dropped on `setting_changed` so tests can override them. The project's settings set
only what the environment says (any `UPLOADS_<NAME>` variable sets `<NAME>`), so a value may come
as text: it is parsed into the setting's type here, and `uploads.checks` reports one that does not
parse (or a name that is not a setting) when the service starts.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"'{text}' is not true or false")


def _optional_int(text: str) -> int | None:
    return None if text.strip() == "" else int(text)


def _optional_json(text: str) -> Any:
    return None if text.strip() == "" else json.loads(text)


@dataclass(frozen=True)
class Setting:
    default: Any
    # Turns the text of an environment variable into the setting's value.
    parse: Callable[[str], Any]


DEFINITIONS: dict[str, Setting] = {
    # Where uploads wait for their push; one file per task, named by the task id. None: var/spool
    # beside the project (a relative path is taken from there too).
    "SPOOL_DIR": Setting(None, Path),
    # Where the spool is, as a URL: unset or a path, the local directory (SPOOL_DIR when unset);
    # `s3://BUCKET/PREFIX`, S3-compatible object storage reached with the project's AWS_*
    # settings, so that web servers and workers on other hosts share the bodies.
    "SPOOL_URL": Setting(None, str),
    # Largest body accepted, in bytes (413 above it, before the body is read).
    "MAX_UPLOAD_SIZE": Setting(10 * 1024**3, int),
    # Free space that must remain on the spool's filesystem after an upload (else 507).
    "SPOOL_RESERVE_BYTES": Setting(64 * 1024**2, int),
    # Pending tasks at most; beyond it uploads get 503 with Retry-After.
    "MAX_PENDING": Setting(10_000, int),
    # Seconds a client is told to wait (Retry-After) when the queue is full or the database away.
    "RETRY_AFTER_SECONDS": Setting(30, int),
    # The Incus API: a unix socket path or an https:// URL.
    "INCUS_ENDPOINT": Setting("/var/lib/incus/unix.socket", str),
    # Seconds to wait for Incus on each request.
    "INCUS_TIMEOUT": Setting(60.0, float),
    # An SFTP session to an instance stays open this long after a push for the next one to
    # reuse (0: close after each push). An open session holds the instance: `incus start` and
    # a graceful `incus stop` wait for it to close.
    "SFTP_IDLE_SECONDS": Setting(1.0, float),
    # Read each pushed file back and compare its SHA-256 (doubles the I/O of a push).
    "VERIFY_SHA256": Setting(False, _bool),
    # Named Incus servers: {"name": {"endpoint": ..., "cert": ..., "key": ..., "verify": ...}}.
    # None means one remote, "local", at INCUS_ENDPOINT.
    "REMOTES": Setting(None, _optional_json),
    # Dotted path of the pusher class (like EMAIL_BACKEND).
    "PUSHER": Setting("uploads.incus.IncusPusher", str),
    # Attempts per task before it fails, and the backoff between them (seconds, with jitter).
    "MAX_ATTEMPTS": Setting(5, int),
    "RETRY_BASE_SECONDS": Setting(2.0, float),
    "RETRY_MAX_SECONDS": Setting(600.0, float),
    # How long a claim stays valid without a heartbeat.
    "LEASE_SECONDS": Setting(60.0, float),
    # Lifetime of API tokens in seconds; None for tokens that never expire.
    "TOKEN_TTL_SECONDS": Setting(None, _optional_int),
    # Seconds a client may go without sending body bytes before the upload is abandoned (408).
    "BODY_READ_TIMEOUT": Setting(60.0, float),
    # Bodies up to this size travel in their task's row instead of a spool file: one INSERT
    # makes them durable (no file to create, fsync and rename).
    "INLINE_MAX_BYTES": Setting(64 * 1024, int),
    # Requests one web process lets wait for a task to finish (`?wait=`) at a time: each holds
    # a server thread, so keep it well below the server's threads per process. Beyond it, a
    # request is answered at once with the task as it is (and Retry-After).
    "MAX_WAITERS": Setting(2, int),
    # Destinations one upload may fan out to (a list of instances, or what a glob matches).
    "MAX_FANOUT": Setting(1000, int),
    # Size of the chunks read from the request and written to the spool.
    "CHUNK_SIZE": Setting(1024 * 1024, int),
}


@dataclass(frozen=True)
class LocalLocation:
    """A spool in a directory of this host."""

    directory: Path

    def __str__(self) -> str:
        return str(self.directory)


@dataclass(frozen=True)
class S3Location:
    """A spool in an S3-compatible bucket, under `prefix` (may be empty)."""

    bucket: str
    prefix: str
    endpoint_url: str | None
    access_key: str | None
    # Not in the repr: a location may be logged.
    secret_key: str | None = field(repr=False)
    region: str

    def __str__(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where


SpoolLocation = LocalLocation | S3Location


DEFAULTS: dict[str, Any] = {name: setting.default for name, setting in DEFINITIONS.items()}


def parse(name: str, value: Any) -> Any:
    """A setting's value in its type: text (from the environment) is parsed, anything else is
    taken as given. ValueError when the text does not parse."""
    if isinstance(value, str):
        try:
            return DEFINITIONS[name].parse(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"UPLOADS['{name}'] = {value!r}: {exc}") from exc
    return value


class UploadsSettings:
    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name not in DEFINITIONS:
            raise AttributeError(f"Invalid UPLOADS setting: {name!r}")
        if name not in self._cache:
            user = getattr(settings, "UPLOADS", {})
            self._cache[name] = parse(name, user.get(name, DEFINITIONS[name].default))
        return self._cache[name]

    @property
    def spool_dir(self) -> Path:
        base = Path(getattr(settings, "BASE_DIR", Path.cwd()))
        configured = self.SPOOL_DIR
        return base / "var" / "spool" if configured is None else base / Path(configured)

    @property
    def spool_location(self) -> "SpoolLocation":
        """The spool's backend and where it keeps bodies; ValueError for a URL it cannot use."""
        url = self.SPOOL_URL
        if not url:
            return LocalLocation(self.spool_dir)
        parsed = urlsplit(url)
        if parsed.scheme in ("", "file"):
            base = Path(getattr(settings, "BASE_DIR", Path.cwd()))
            return LocalLocation(base / Path(parsed.path if parsed.scheme else url))
        if parsed.scheme != "s3":
            raise ValueError(f"UPLOADS['SPOOL_URL'] = {url!r}: use a path or s3://BUCKET/PREFIX")
        if not parsed.netloc:
            raise ValueError(f"UPLOADS['SPOOL_URL'] = {url!r} names no bucket (s3://BUCKET/PREFIX)")
        return S3Location(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=getattr(settings, "AWS_S3_ENDPOINT_URL", None) or None,
            access_key=getattr(settings, "AWS_ACCESS_KEY_ID", None) or None,
            secret_key=getattr(settings, "AWS_SECRET_ACCESS_KEY", None) or None,
            region=getattr(settings, "AWS_S3_REGION_NAME", None) or "us-east-1",
        )

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
    if setting in ("UPLOADS", "BASE_DIR") or setting.startswith("AWS_"):
        uploads_settings.reload()
