"""The spool on S3-compatible object storage (S3, Ceph RGW, SeaweedFS, Garage, MinIO), so that
web servers and push workers on different hosts share the bodies; `uploads.spool` chooses it when
UPLOADS['SPOOL_URL'] is `s3://BUCKET/PREFIX`.

boto3 directly rather than Django's storage API: django-storages' S3 backend reads a whole
object on open and buffers writes, where a 1 GiB body must stream both ways in bounded memory.

- Writing: a body is sent as a multipart upload in parts of PART_SIZE (S3's minimum is 5 MiB,
  except the last), uploaded by SENDERS helper threads while the next arrives; the object exists
  only once `complete_multipart_upload` returns, so the 202 comes after it. A body smaller than
  one part is a single `put_object`. Leaving the writer without a commit aborts the upload.
- Reading: `get_object`'s body, streamed.
- Purge: `names()` lists objects and incomplete multipart uploads older than the cut-off;
  `remove()` then deletes the object and aborts the incomplete uploads listed for that name.

Storage errors become the spool's: SpoolFull when the store refuses for space, SpoolUnavailable
for the rest (unreachable, missing bucket, bad credentials), BodyMissing for a missing object.
"""

import io
import logging
import queue
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from uploads.conf import S3Location, uploads_settings
from uploads.spool import (
    BodyMissing,
    Sha256,
    SpooledFile,
    SpoolError,
    SpoolFull,
    SpoolUnavailable,
)

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
# Bounded parts: at most SENDERS + 1 are held in memory (being sent, one waiting) beside the
# one filling. 8 MiB suits S3's 5 MiB minimum and 10,000-part maximum up to 78 GiB bodies.
PART_SIZE = 8 * MIB
# Parts sent at once: two keep a store busy while the next arrives (measured against SeaweedFS:
# +20 % over one; four gained nothing more).
SENDERS = 2
MAX_PARTS = 10_000
NAME = re.compile(r"[0-9a-f]{32}")
# Answers that mean "no room", as opposed to "not now".
SPACE_CODES = frozenset({"QuotaExceeded", "InsufficientStorage", "XMinioStorageFull"})
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def part_size_for(max_size: int) -> int:
    """PART_SIZE, or larger when the largest accepted body would need more than 10,000 parts."""
    return max(PART_SIZE, -(-max_size // MAX_PARTS))


class _Reader(io.RawIOBase):
    """An object's body, read as it streams in; a failed read is SpoolUnavailable (an OSError)."""

    def __init__(self, body: Any, where: str) -> None:
        super().__init__()
        self._body = body
        self._where = where

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            data: bytes = self._body.read(None if size is None or size < 0 else size)
        except (BotoCoreError, OSError, ValueError) as exc:
            raise SpoolUnavailable(f"reading from {self._where} failed: {exc}") from exc
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Writer:
    """Sends one body to the store as it arrives (see the module's docstring)."""

    def __init__(self, store: "S3Store") -> None:
        self.name = uuid.uuid4().hex
        self.size = 0
        self._store = store
        self._key = store.key(self.name)
        self._part_size = part_size_for(uploads_settings.MAX_UPLOAD_SIZE)
        # Part buffers, reused: the one being filled, and at most SENDERS + 1 on their way. A
        # request thread that finds none free waits for a sender (back-pressure on the client).
        self._filling: bytearray | None = None
        self._buffered = 0
        self._made = 0
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._hash = Sha256()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._parts_sent = 0
        self._outbox: queue.Queue[tuple[int, bytearray, int] | None] = queue.Queue(maxsize=1)
        self._senders: list[threading.Thread] = []
        self._parts_lock = threading.Lock()
        self._failure: SpoolError | None = None
        self._done = False

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise ValueError("the body is already committed or aborted")
        self._hash.update(chunk)
        self.size += len(chunk)
        view = memoryview(chunk)
        while view:
            if self._filling is None:
                self._filling = self._buffer()
            room = self._part_size - self._buffered
            piece = view[:room]
            self._filling[self._buffered : self._buffered + len(piece)] = piece
            self._buffered += len(piece)
            view = view[len(piece) :]
            if self._buffered == self._part_size:
                self._send()

    def _buffer(self) -> bytearray:
        if self._made <= SENDERS + 1:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                self._made += 1
                return bytearray(self._part_size)
        return self._free.get()

    def _send(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._upload_id is None:
            try:
                started = self._store.client.create_multipart_upload(
                    Bucket=self._store.bucket, Key=self._key
                )
            except (BotoCoreError, ClientError) as exc:
                raise self._store.error(exc, "starting an upload to") from exc
            self._upload_id = started["UploadId"]
            for _ in range(SENDERS):
                sender = threading.Thread(target=self._run, name="spool-s3-parts", daemon=True)
                sender.start()
                self._senders.append(sender)
        if self._filling is None:
            raise ValueError("no part to send")
        self._parts_sent += 1
        self._outbox.put((self._parts_sent, self._filling, self._buffered))
        self._filling, self._buffered = None, 0
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while (item := self._outbox.get()) is not None:
            number, buffer, length = item
            try:
                if self._failure is not None:
                    continue  # drain: the request thread is about to abort
                body = buffer if length == len(buffer) else bytes(memoryview(buffer)[:length])
                sent = self._store.client.upload_part(
                    Bucket=self._store.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=body,
                )
            except (BotoCoreError, ClientError) as exc:
                self._failure = self._store.error(exc, "sending a part to")
                continue
            finally:
                self._free.put(buffer)
            with self._parts_lock:
                self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    def _stop_senders(self) -> None:
        for _ in self._senders:
            self._outbox.put(None)
        for sender in self._senders:
            sender.join()
        self._senders = []

    def commit(self) -> SpooledFile:
        if self._upload_id is None:
            try:
                body = b"" if self._filling is None else self._filling[: self._buffered]
                self._store.client.put_object(Bucket=self._store.bucket, Key=self._key, Body=body)
            except (BotoCoreError, ClientError) as exc:
                raise self._store.error(exc, "storing a body in") from exc
        else:
            if self._buffered:
                self._send()
            self._stop_senders()
            if self._failure is not None:
                raise self._failure
            self._parts.sort(key=lambda part: part["PartNumber"])
            try:
                self._store.client.complete_multipart_upload(
                    Bucket=self._store.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
            except (BotoCoreError, ClientError) as exc:
                raise self._store.error(exc, "completing an upload to") from exc
        self._done = True
        return SpooledFile(name=self.name, size=self.size, sha256=self._hash.hexdigest())

    def abort(self) -> None:
        self._hash.close()
        self._stop_senders()
        self._filling = None
        if self._done:
            return
        self._done = True
        if self._upload_id is not None:
            try:
                self._store.client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id
                )
            except (BotoCoreError, ClientError) as exc:
                # Its parts stay until purge finds the incomplete upload.
                logger.warning("could not abort the upload of %s: %s", self._key, exc)

    def __enter__(self) -> "S3Writer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


class S3Store:
    """The spool in a bucket, under a prefix; one boto3 client (thread-safe) per process."""

    def __init__(self, location: S3Location) -> None:
        self.location = location
        self.bucket = location.bucket
        self._prefix = f"{location.prefix}/" if location.prefix else ""
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=location.endpoint_url,
            aws_access_key_id=location.access_key,
            aws_secret_access_key=location.secret_key,
            region_name=location.region,
            config=Config(
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
                # Checksums only where S3 requires them: not every S3-compatible store accepts
                # the newer default ones, and each body's SHA-256 is checked end to end anyway.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=32,
            ),
        )
        # Incomplete multipart uploads found by `names()`, aborted by `remove()`.
        self._incomplete: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def key(self, name: str) -> str:
        return self._prefix + name

    def error(self, exc: BotoCoreError | ClientError, doing: str) -> SpoolError:
        """The spool's error for a failed storage call (`doing` the bucket)."""
        if isinstance(exc, ClientError) and (_code(exc) in SPACE_CODES or _status(exc) == 507):
            return SpoolFull(f"{self.location} has no room: {exc}")
        return SpoolUnavailable(f"{doing} {self.location} failed: {_describe(exc)}")

    def writer(self) -> S3Writer:
        return S3Writer(self)

    def has_room_for(self, size: int) -> bool:
        return True  # an object store says so only when a write is refused

    def open(self, name: str) -> BinaryIO:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if _code(exc) in MISSING_CODES:
                raise BodyMissing(name) from exc
            raise self.error(exc, "reading from") from exc
        except BotoCoreError as exc:
            raise self.error(exc, "reading from") from exc
        return cast(BinaryIO, _Reader(answer["Body"], str(self.location)))

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        except ClientError as exc:
            if _code(exc) in MISSING_CODES or _status(exc) == 404:
                return False
            raise self.error(exc, "looking in") from exc
        except BotoCoreError as exc:
            raise self.error(exc, "looking in") from exc
        return True

    def remove(self, name: str) -> bool:
        key = self.key(name)
        with self._lock:
            upload_ids = self._incomplete.pop(name, [])
        try:
            for upload_id in upload_ids:
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                except ClientError as exc:
                    if _code(exc) != "NoSuchUpload":
                        raise
            # S3 answers a delete the same whether the object was there or not: ask first.
            existed = self.exists(name)
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError, SpoolError) as exc:
            logger.warning("could not delete %s from %s (purge will): %s", name, self.location, exc)
            return False
        return existed or bool(upload_ids)

    def names(self, *, modified_before: float) -> Iterator[str]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._prefix
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(self._prefix) :]
                    if NAME.fullmatch(name) and entry["LastModified"].timestamp() < modified_before:
                        yield name
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    name = upload["Key"][len(self._prefix) :]
                    if NAME.fullmatch(name) and upload["Initiated"].timestamp() < modified_before:
                        with self._lock:
                            self._incomplete.setdefault(name, []).append(upload["UploadId"])
                        yield name
        except (BotoCoreError, ClientError) as exc:
            raise self.error(exc, "listing") from exc

    def problem(self) -> str | None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = _status(exc)
            if status == 404 or _code(exc) in ("NoSuchBucket", "404"):
                return f"{self.location}: the bucket does not exist"
            if status in (401, 403):
                return f"{self.location}: access denied (check the credentials) ({_code(exc)})"
            return f"{self.location}: {_describe(exc)}"
        except BotoCoreError as exc:
            return f"{self.location}: unreachable ({_describe(exc)})"
        return None

    def make_private(self) -> list[Path]:
        return []  # the bucket's own policy decides who reads it


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')}: {error.get('Message', '') or exc}"
    return f"{type(exc).__name__}: {exc}"
