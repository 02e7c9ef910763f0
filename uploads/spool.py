"""The spool: where an upload's bytes wait until a worker pushes them. Every spool operation
is here -- write while receiving, open for reading, exists, remove, list for purge, health,
permissions -- so that nothing else knows where or how bodies are kept.

Two backends sit behind one `Store` interface, chosen by UPLOADS['SPOOL_URL']: a directory of
this host (`LocalStore`, the default) and S3-compatible object storage (`uploads.objectstore`),
which lets web servers and workers run on different hosts. Names never come from client input.

In the directory, files are written as `<uuid>.part`, hashed and counted on the way, and renamed
to `<uuid>` only once complete, so a finished spool name always names a whole file.
"""

import errno
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.http import HttpRequest

from uploads.conf import LocalLocation, uploads_settings
from uploads.localfiles import PRIVATE_DIR, PRIVATE_FILE, restrict

PART_SUFFIX = ".part"

logger = logging.getLogger(__name__)


class SpoolError(Exception):
    """The body could not be spooled; nothing was kept."""


class SpoolFull(SpoolError):
    pass


class BodyTooLarge(SpoolError):
    pass


class TruncatedBody(SpoolError):
    pass


class SpoolUnavailable(SpoolError, OSError):
    """The store cannot be reached or refuses us (not for space): try again later. An OSError,
    as a failing disk would raise, so a read that fails mid-push is a transient push error."""


class BodyMissing(Exception):
    """No body is kept under this name (any more)."""


@dataclass(frozen=True)
class SpooledFile:
    """A body as received: kept in the spool under `name`, or, when small enough to travel in
    its task's row, held in `data` (and `name` is empty)."""

    name: str
    size: int
    sha256: str
    data: bytes | None = None


class Writer(Protocol):
    """Receives one body: `write()` as it arrives, then `commit()` once it is whole. Leaving its
    `with` block without a commit (an exception, a short body) leaves nothing behind."""

    name: str
    size: int

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> SpooledFile: ...

    def abort(self) -> None: ...

    def __enter__(self) -> "Writer": ...

    def __exit__(self, *exc_info: object) -> None: ...


class Store(Protocol):
    """Where bodies are kept. Errors: SpoolFull (no room), SpoolUnavailable (out of reach),
    BodyMissing (no such body)."""

    location: Any

    def writer(self) -> Writer: ...

    def open(self, name: str) -> BinaryIO: ...

    def exists(self, name: str) -> bool: ...

    def remove(self, name: str) -> bool: ...

    def names(self, *, modified_before: float) -> Iterator[str]: ...

    def problem(self) -> str | None: ...

    def has_room_for(self, size: int) -> bool: ...

    def make_private(self) -> list[Path]: ...


class Sha256:
    """SHA-256 of a body, computed on a helper thread once the body is large.

    hashlib releases the GIL on large buffers, so the helper hashes one chunk while the
    request thread receives and writes the next: a 1 GiB body no longer pays for the hash
    on top of the socket and the disk. Small bodies are hashed inline (no thread to start).
    At most `depth` chunks wait for the helper, so memory stays bounded.
    """

    inline_limit = 4 * 1024 * 1024
    depth = 4

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._fed = 0
        self._chunks: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None

    def update(self, chunk: bytes) -> None:
        self._fed += len(chunk)
        if self._chunks is None and self._fed <= self.inline_limit:
            self._hash.update(chunk)
            return
        if self._chunks is None:
            self._chunks = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(
                target=self._run, args=(self._chunks,), name="spool-sha256", daemon=True
            )
            self._thread.start()
        self._chunks.put(chunk)

    def _run(self, chunks: "queue.Queue[bytes | None]") -> None:
        while (chunk := chunks.get()) is not None:
            self._hash.update(chunk)

    def close(self) -> None:
        if self._chunks is not None and self._thread is not None:
            self._chunks.put(None)
            self._thread.join()
            self._chunks = None

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()


class _Flusher:
    """Writes a large body's data to disk on a helper thread while the rest still arrives:
    every `every` bytes it asks for an fdatasync, so that the fsync before the 202 finds at
    most that much left (otherwise the whole body can still be in the page cache when its last
    byte arrives, and the 202 waits for all of it to reach the disk)."""

    every = 32 * 1024 * 1024

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = 0
        self._due = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def wrote(self, size: int) -> None:
        self._pending += size
        if self._pending < self.every:
            return
        self._pending = 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spool-sync", daemon=True)
            self._thread.start()
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self._fd)
            except OSError:
                return  # the final fsync reports what went wrong

    def close(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._due.set()
            self._thread.join()
            self._thread = None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalWriter:
    """Writes one upload to `<spool>/<uuid>.part`; `commit()` renames it to its final name.

    Used as a context manager: leaving the block without `commit()` (an exception, a short
    body) deletes the partial file.
    """

    def __init__(self, directory: Path) -> None:
        self.name = uuid.uuid4().hex
        self._part = directory / f"{self.name}{PART_SUFFIX}"
        # Users' files: readable by the service's user only.
        fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        self._file: IO[bytes] | None = os.fdopen(fd, "wb")
        self._hash = Sha256()
        self._flusher = _Flusher(fd)
        self.size = 0
        self._committed = False

    def _open_file(self) -> IO[bytes]:
        if self._file is None:
            raise ValueError("the spool file is already closed")
        return self._file

    def write(self, chunk: bytes) -> None:
        file = self._open_file()
        try:
            file.write(chunk)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("the spool filesystem is full") from exc
            raise
        self._hash.update(chunk)
        self.size += len(chunk)
        self._flusher.wrote(len(chunk))

    def commit(self) -> SpooledFile:
        file = self._open_file()
        try:
            file.flush()
            self._flusher.close()
            os.fsync(file.fileno())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("the spool filesystem is full") from exc
            raise
        file.close()
        self._file = None
        os.replace(self._part, self._part.with_name(self.name))
        self._committed = True
        # The rename is durable only once the directory is: a 202 must survive a power cut.
        _fsync_directory(self._part.parent)
        return SpooledFile(name=self.name, size=self.size, sha256=self._hash.hexdigest())

    def abort(self) -> None:
        self._hash.close()
        self._flusher.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._committed:
            self._part.unlink(missing_ok=True)

    def __enter__(self) -> "LocalWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


class LocalStore:
    """The spool as a directory of this host: today's default, and the fastest."""

    def __init__(self, location: LocalLocation) -> None:
        self.location = location
        self._directory = location.directory
        self._made = False

    def directory(self) -> Path:
        """The spool directory, made (private) the first time this process needs it."""
        if not self._made:
            self._directory.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
            self._made = True
        return self._directory

    def writer(self) -> LocalWriter:
        return LocalWriter(self.directory())

    def has_room_for(self, size: int) -> bool:
        free = shutil.disk_usage(self.directory()).free
        return free >= size + uploads_settings.SPOOL_RESERVE_BYTES

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._directory / name, "rb", buffering=0)
        except FileNotFoundError as exc:
            raise BodyMissing(name) from exc

    def names(self, *, modified_before: float) -> Iterator[str]:
        with os.scandir(self.directory()) as entries:
            for entry in entries:
                try:
                    modified = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue  # removed meanwhile
                if modified < modified_before:
                    yield entry.name.removesuffix(PART_SUFFIX)

    def problem(self) -> str | None:
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory(), prefix=".healthz-"):
                pass
        except OSError as exc:
            return f"not writable: {exc.strerror}"
        if not self.has_room_for(0):
            return "full"
        return None

    def make_private(self) -> list[Path]:
        directory = self._directory
        changed = [directory] if restrict(directory, PRIVATE_DIR) else []
        if directory.is_dir():
            with os.scandir(directory) as entries:
                for entry in entries:
                    path = Path(entry.path)
                    if entry.is_file(follow_symlinks=False) and restrict(path, PRIVATE_FILE):
                        changed.append(path)
        return changed

    def remove(self, name: str) -> bool:
        removed = False
        for path in (self._directory / (name + PART_SUFFIX), self._directory / name):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed = True
        return removed

    def exists(self, name: str) -> bool:
        return (self._directory / name).is_file()


_backend: Store | None = None
_backend_lock = threading.Lock()


def backend() -> Store:
    """The configured store, built once per process (and again when the settings change)."""
    global _backend
    found = _backend
    if found is not None:
        return found
    with _backend_lock:
        if _backend is None:
            location = uploads_settings.spool_location
            if isinstance(location, LocalLocation):
                _backend = LocalStore(location)
            else:
                from uploads.objectstore import S3Store  # boto3 only where it is used

                _backend = S3Store(location)
        return _backend


@receiver(setting_changed)
def _forget_backend(*, setting: str, **kwargs: Any) -> None:
    global _backend
    if setting in ("UPLOADS", "BASE_DIR") or setting.startswith("AWS_"):
        _backend = None


def describe() -> str:
    """Where the spool is, for messages: a directory, or a bucket and its endpoint."""
    return str(uploads_settings.spool_location)


def log_problem() -> None:
    """At start: say at once when the spool cannot keep bodies (a missing bucket, bad
    credentials); for object storage this also sets up the client's connection before the first
    upload needs it."""
    found = problem()
    if found:
        logger.error("the spool cannot keep uploads: %s", found)


def spool_dir() -> Path:
    """The local spool directory (made when missing); ValueError when the spool is elsewhere."""
    store = backend()
    if not isinstance(store, LocalStore):
        raise ValueError(f"the spool is not a local directory: {store.location}")
    return store.directory()


def has_room_for(size: int) -> bool:
    """Whether a body of `size` bytes fits (object storage: it is not ours to know)."""
    return backend().has_room_for(size)


def open_body(name: str) -> BinaryIO:
    """The kept body, for reading from the start; BodyMissing when there is none,
    SpoolUnavailable when the store cannot be reached."""
    return backend().open(name)


def names(*, modified_before: float) -> Iterator[str]:
    """Every name the spool holds (partial bodies too) not modified since `modified_before` (a
    timestamp), for purging what no task references."""
    return backend().names(modified_before=modified_before)


def problem() -> str | None:
    """Why new bodies cannot be kept right now, or None."""
    return backend().problem()


def make_private() -> list[Path]:
    """Restrict the spool and what it holds to the service's user; what changed."""
    return backend().make_private()


def remove(name: str) -> bool:
    """Delete a body and any partial body of the same name; True when either existed. Never raises
    for a store out of reach: purge's orphan sweep deletes it later."""
    if not name:
        return False  # a body kept in its task's row
    return backend().remove(name)


def exists(name: str) -> bool:
    return backend().exists(name)


def SpoolWriter() -> Writer:  # noqa: N802 -- used as the class it was: `with SpoolWriter() as w`
    """A writer for one new body in the configured store."""
    return backend().writer()


def read_small(read: Callable[[int], bytes], *, expected: int) -> SpooledFile:
    """Read a body small enough to travel in its task's row (UPLOADS['INLINE_MAX_BYTES']):
    whole, hashed, nothing on disk. A body that ends early raises TruncatedBody."""
    chunks = []
    received = 0
    while received < expected:
        try:
            chunk = read(expected - received)
        except OSError as exc:
            raise TruncatedBody(f"the connection failed while reading the body: {exc}") from exc
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    if received != expected:
        raise TruncatedBody(f"the body ended after {received} of {expected} bytes (Content-Length)")
    data = b"".join(chunks)
    return SpooledFile(name="", size=received, sha256=hashlib.sha256(data).hexdigest(), data=data)


def store(data: bytes) -> SpooledFile:
    """Keep a body already in memory in the spool (durable, as a received one)."""
    with SpoolWriter() as writer:
        writer.write(data)
        return writer.commit()


def spool_stream(
    read: Callable[[int], bytes], *, expected: int | None, max_size: int
) -> SpooledFile:
    """Copy a request body into the spool in bounded chunks.

    `expected` is the Content-Length (None for a chunked body, which is then capped at
    `max_size`). A body that ends early raises TruncatedBody; nothing is kept on any error.
    """
    chunk_size = uploads_settings.CHUNK_SIZE
    with SpoolWriter() as writer:
        while True:
            want = chunk_size if expected is None else min(chunk_size, expected - writer.size)
            if want <= 0:
                break
            try:
                chunk = read(want)
            except OSError as exc:
                raise TruncatedBody(f"the connection failed while reading the body: {exc}") from exc
            if not chunk:
                break
            writer.write(chunk)
            if writer.size > max_size:
                raise BodyTooLarge(f"the body is larger than {max_size} bytes")
        if expected is not None and writer.size != expected:
            raise TruncatedBody(
                f"the body ended after {writer.size} of {expected} bytes (Content-Length)"
            )
        return writer.commit()


class SpooledUpload(UploadedFile):
    """A multipart file part already written, hashed and committed to the spool."""

    def __init__(self, spooled: SpooledFile, *, name: str, content_type: str | None) -> None:
        super().__init__(
            file=None, name=name, content_type=content_type, size=spooled.size, charset=None
        )
        self.spooled = spooled


def keep(request: HttpRequest, name: str) -> None:
    """A task now owns this spooled part: `discard_unkept` leaves it."""
    request.spool_kept = name  # type: ignore[attr-defined]


def discard_unkept(request: HttpRequest) -> None:
    """Delete every part this request spooled that no task took."""
    kept = getattr(request, "spool_kept", None)
    for name in getattr(request, "spool_names", []):
        if name != kept:
            remove(name)


class SpoolUploadHandler(FileUploadHandler):
    """Streams multipart file parts straight into the spool, 1 MiB at a time, hashing them.

    Every spool name it creates is recorded on the request (`request.spool_names`), so that
    `discard_unkept` can delete all but the one a task took, however the request ends.
    """

    def __init__(self, request: HttpRequest | None = None) -> None:
        super().__init__(request)
        self.chunk_size = uploads_settings.CHUNK_SIZE
        self._writer: Writer | None = None

    def _names(self) -> list[str]:
        names: list[str] = getattr(self.request, "spool_names", [])
        if self.request is not None:
            self.request.spool_names = names  # type: ignore[attr-defined]
        return names

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        if not has_room_for(0):
            raise SpoolFull("the spool filesystem is full")
        self._writer = SpoolWriter()
        self._names().append(self._writer.name)

    def _current(self) -> Writer:
        if self._writer is None:
            raise ValueError("no file part is open")
        return self._writer

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        writer = self._current()
        try:
            writer.write(raw_data)
            if writer.size > uploads_settings.MAX_UPLOAD_SIZE:
                raise BodyTooLarge(
                    f"the file is larger than {uploads_settings.MAX_UPLOAD_SIZE} bytes"
                )
        except BaseException:
            self.upload_interrupted()
            raise

    def file_complete(self, file_size: int) -> SpooledUpload | None:
        spooled = self._current().commit()
        self._writer = None
        return SpooledUpload(spooled, name=self.file_name or "", content_type=self.content_type)

    def upload_interrupted(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
