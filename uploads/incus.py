"""The only module that knows Incus and pylxd.

How a push is delivered through the local unix socket (the facts marked "measured" were
measured on Incus 6.0.4):
- Over Incus's SFTP endpoint: `GET /1.0/instances/{name}/sftp?project=P` with `Upgrade: sftp`
  answers 101, then raw SFTP v3 runs on the connection (uploads.sftp does the transport).
- The data goes to a temporary sibling `.<name>.uploadsvc-<random>.tmp` in pipelined 128 KiB
  packets; then the sibling gets its owner and mode (chown first: chown clears setuid bits,
  measured) and is renamed over the destination with posix-rename. A reader in the instance sees
  the old file or the new one, never a part. Unlike the files endpoint, which applies mode and
  owner only to new files, the requested mode and owner hold after an overwrite too; what is not
  requested is kept from the old file (0644 root:root for a new one), like `incus file push`.
- The sibling's size, mode and owner (and, with UPLOADS['VERIFY_SHA256'], its content, read
  back in 32 KiB reads) are checked before the rename publishes it (the rename keeps the inode).
- A temporary sibling left by a push that died is removed by a later push into the same
  directory once it has not been modified for twice the Incus timeout: a live push modifies
  its own sibling at least that often (every write does; while it reads the file back for
  verification, it refreshes the time), and a single request stalls no longer than the
  timeout. The names are unique, so two concurrent pushes to one path never mix their data
  and the last rename wins.
- Sessions are kept per (project, instance) and reused by the next push, and reopened when they
  broke (an instance that stops breaks its sessions, measured). They are closed after
  UPLOADS['SFTP_IDLE_SECONDS'] without a push: an open session holds the instance, so
  `incus start` of a stopped instance waits for it and a graceful `incus stop` of a running one
  does not finish until it closes (both measured).
- Stopped instances are served by the same endpoint (measured), so they need no fallback.
- A destination that is a symlink is written through, as `incus file push` does: the link's
  target is replaced.
- Incus cannot set setuid, setgid or sticky bits (they are dropped on chmod, measured): a mode
  asking for them is refused, and a replaced file loses them.

Remotes (UPLOADS['REMOTES']): an https:// endpoint gets the same SFTP delivery over TLS, with
the client certificate Incus trusts and the server certificate pinned (Incus servers present
self-signed ones). pylxd, used only for look-ups and health, gets a requests session with
`trust_env = False`: REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE would otherwise replace the pin.

The files endpoint (`POST /1.0/instances/{name}/files`) is not used: it applies mode and owner
only to new files, cannot replace atomically, and pylxd sends it only the X-LXD-* headers that
Incus 7.0.1 and 7.2+ ignore. SFTP has no such headers, so the same code serves Incus 6 and 7.
A pylxd Client shares one requests.Session, which is not thread-safe: one pusher per thread.
"""

import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paramiko
import pylxd
import requests
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_OPENDIR,
)
from paramiko.sftp_attr import SFTPAttributes
from pylxd.client import get_session_for_url
from pylxd.exceptions import ClientConnectionFailed, LXDAPIException, NotFound

from uploads.conf import uploads_settings
from uploads.grants import path_below, path_within
from uploads.pushers import (
    NotHeld,
    OutsideGrant,
    PermanentPushError,
    PushError,
    PushRequest,
    TransientPushError,
)
from uploads.sftp import (
    READ_PACKET,
    WRITE_PACKET,
    LinkBroken,
    UpgradeRefused,
    finish_pipelined_writes,
    open_sftp,
    pipeline,
)

logger = logging.getLogger(__name__)

DIR_MODE = 0o755
NEW_FILE_MODE = 0o644
# Incus's SFTP server, like its files endpoint, silently drops setuid, setgid and sticky bits on
# chmod (measured: 04750 gives 0750), so only these can be set.
PERMISSION_BITS = 0o777
# Read from the spool in 1 MiB pieces; paramiko cuts each into WRITE_PACKET writes.
SOURCE_CHUNK = 1024 * 1024
# Sessions one pusher keeps open at most (one per instance it pushed to recently).
MAX_SESSIONS = 16
MAX_SYMLINKS = 40
# Directories whose last search for stale temporary files a pusher remembers.
MAX_SWEPT = 4096
TEMP_MARK = ".uploadsvc-"
TEMP_PATTERN = re.compile(r"\..+" + re.escape(TEMP_MARK) + r"[0-9a-f]{12}\.tmp")


def _temp_stem(name: str) -> str:
    """The part of the temporary name that ties it to its destination; short enough that the
    temporary name stays within NAME_MAX (255 bytes)."""
    if len(name.encode()) <= 200:
        return name
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def _temp_name(name: str) -> str:
    return f".{_temp_stem(name)}{TEMP_MARK}{secrets.token_hex(6)}.tmp"


def _lands(link_path: str, text: str) -> str:
    """Where a link's text points, as a normalised absolute path in the instance (relative
    texts start from the link's directory; absolute ones from the instance's root)."""
    joined = posixpath.join(posixpath.dirname(link_path), text)
    return "/" + posixpath.normpath(joined).lstrip("/")


def _identity(attrs: Any) -> tuple[Any, ...]:
    return (attrs.st_mode, attrs.st_uid, attrs.st_gid, attrs.st_mtime)


@dataclass
class _Destination:
    """Where a push writes: `path`, whose parents are directories (not links) when the push
    is confined; what is there now (`existing`, never a link; None when nothing is); the
    directories to make first (`missing`, outermost first); the links followed to get there
    (`hops`: the link, its text, where it points)."""

    path: str
    existing: Any = None
    missing: list[str] = field(default_factory=list)
    hops: list[tuple[str, str, str]] = field(default_factory=list)


class _DirectoryHandle:
    """An SFTP handle on a directory, to set its owner and mode by handle rather than by path
    (paramiko has no public call for it: these are the plain SFTP v3 requests)."""

    def __init__(self, sftp: Any, path: str) -> None:
        self.sftp = sftp
        kind, message = sftp._request(CMD_OPENDIR, path)
        if kind != CMD_HANDLE:
            raise paramiko.SFTPError("expected a handle")
        self.handle = message.get_binary()

    def stat(self) -> SFTPAttributes:
        kind, message = self.sftp._request(CMD_FSTAT, self.handle)
        if kind != CMD_ATTRS:
            raise paramiko.SFTPError("expected attributes")
        return SFTPAttributes._from_msg(message)

    def setstat(
        self, *, mode: int | None = None, uid: int | None = None, gid: int | None = None
    ) -> None:
        attrs = SFTPAttributes()
        if mode is not None:
            attrs.st_mode = mode
        if uid is not None and gid is not None:
            attrs.st_uid, attrs.st_gid = uid, gid
        self.sftp._request(CMD_FSETSTAT, self.handle, attrs)

    def __enter__(self) -> "_DirectoryHandle":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.sftp._request(CMD_CLOSE, self.handle)
        except OSError:
            pass


def _error_detail(body: bytes, fallback: str) -> str:
    """The `error` of an Incus error response body, else `fallback`."""
    try:
        detail = json.loads(body).get("error")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else fallback


class _Session:
    """An open SFTP session to one instance."""

    def __init__(self, client: Any, link: Any) -> None:
        self.client = client
        self.link = link
        self.last_used = time.monotonic()

    @property
    def broken(self) -> bool:
        return bool(self.link.broken)

    def close(self) -> None:
        try:
            self.client.close()
        except (OSError, LinkBroken):
            pass


class _Delivery:
    """One push over an open SFTP session: temporary sibling, data, owner and mode, rename,
    verification. SFTP error replies arrive as OSError (ENOENT and EACCES carry their errno,
    everything else is a bare "failure"); where a reply can mean several things, a stat decides.
    A dead connection raises LinkBroken, which the pusher handles."""

    def __init__(
        self, sftp: Any, req: PushRequest, sweep: Callable[[str], bool], stale_after: float
    ) -> None:
        self.sftp = sftp
        self.req = req
        self.where = req.instance
        # Whether to look for stale temporary files in a directory this time.
        self.sweep = sweep
        # A temporary sibling not modified for this long belongs to a push that died.
        self.stale_after = stale_after
        # Our temporary sibling while it exists.
        self.temp: str | None = None

    # --- what a failure means -----------------------------------------------------------

    def _non_directory_ancestor(self, path: str) -> str | None:
        """The first existing ancestor of `path` that is not a directory, if any."""
        current = ""
        for part in [p for p in path.split("/") if p][:-1]:
            current = f"{current}/{part}"
            try:
                attrs = self.sftp.stat(current)
            except OSError:
                return None
            if not stat.S_ISDIR(attrs.st_mode or 0):
                return current
        return None

    def _failed(self, exc: OSError, doing: str, path: str) -> PushError:
        if isinstance(exc, PermissionError):
            return PermanentPushError(f"permission denied {doing} {path} in {self.where}")
        blocker = self._non_directory_ancestor(path)
        if blocker is not None:
            return PermanentPushError(f"{blocker} is not a directory in {self.where}")
        return TransientPushError(f"{doing} {path} in {self.where} failed: {exc}")

    def _is_directory(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(self.sftp.stat(path).st_mode or 0)
        except OSError:
            return False

    # --- the steps ----------------------------------------------------------------------

    def resolve(self) -> _Destination:
        """Where the file goes and what is there now. Also the session's first request, so it
        tells whether a kept session still works.

        An unconfined push (a superuser, or a grant on the whole instance) writes through
        symlinks as `incus file push` does, and the server follows the links among the parents.
        A confined one resolves every component itself and must land inside its grant.
        """
        if self.req.confined_to is None:
            path, attrs = self._follow_final_links(self.req.path)
            return _Destination(path, attrs)
        destination = self._walk(self.req.path)
        self._confine(destination)
        return destination

    def _follow_final_links(self, path: str) -> tuple[str, Any]:
        for _ in range(MAX_SYMLINKS):
            try:
                attrs = self.sftp.lstat(path)
            except FileNotFoundError:
                return path, None
            except OSError as exc:
                raise self._failed(exc, "looking up", path) from exc
            if not stat.S_ISLNK(attrs.st_mode or 0):
                return path, attrs
            link = self._readlink(path)
            path = _lands(path, link)
        raise PermanentPushError(
            f"too many levels of symbolic links at {self.req.path} in {self.where}"
        )

    def _readlink(self, path: str) -> str:
        try:
            return str(self.sftp.readlink(path))
        except OSError as exc:
            raise self._failed(exc, "reading the link", path) from exc

    def _walk(self, path: str) -> _Destination:
        """Resolve `path` the way the instance's kernel would, one component at a time
        (SFTP's realpath does not follow links: measured), remembering each link followed."""
        parts = deque(part for part in path.split("/") if part)
        current = "/"
        hops: list[tuple[str, str, str]] = []
        while parts:
            part = parts.popleft()
            if part == ".":
                continue
            if part == "..":
                current = posixpath.dirname(current)
                continue
            candidate = posixpath.join(current, part)
            try:
                attrs = self.sftp.lstat(candidate)
            except FileNotFoundError:
                return self._missing_from(candidate, parts, hops)
            except OSError as exc:
                raise self._failed(exc, "looking up", candidate) from exc
            if stat.S_ISLNK(attrs.st_mode or 0):
                if len(hops) >= MAX_SYMLINKS:
                    raise PermanentPushError(
                        f"too many levels of symbolic links at {self.req.path} in {self.where}"
                    )
                link = self._readlink(candidate)
                hops.append((candidate, link, _lands(candidate, link)))
                if link.startswith("/"):
                    current = "/"
                parts.extendleft(reversed([p for p in link.split("/") if p]))
                continue
            if not parts:
                return _Destination(candidate, attrs, hops=hops)
            if not stat.S_ISDIR(attrs.st_mode or 0):
                raise PermanentPushError(f"{candidate} is not a directory in {self.where}")
            current = candidate
        # The path named a directory (e.g. a link to one, or ending in "..").
        return _Destination(current, self._lstat(current), hops=hops)

    def _missing_from(
        self, first: str, rest: deque[str], hops: list[tuple[str, str, str]]
    ) -> _Destination:
        """`first` does not exist, so neither does anything below it: the directories to make
        and the file's path follow from the names alone."""
        names = [name for name in rest if name != "."]
        if ".." in names:
            # The kernel cannot walk out of a directory that does not exist, nor may we.
            raise PermanentPushError(
                f"parent directory {first} does not exist in {self.where} (set create_dirs)"
            )
        if not names:
            return _Destination(first, None, hops=hops)
        missing = [first]
        for name in names[:-1]:
            missing.append(posixpath.join(missing[-1], name))
        return _Destination(posixpath.join(missing[-1], names[-1]), None, missing, hops)

    def _lstat(self, path: str) -> Any:
        try:
            return self.sftp.lstat(path)
        except OSError as exc:
            raise self._failed(exc, "looking up", path) from exc

    def _confine(self, destination: _Destination) -> None:
        """Refuse a destination outside the grant, and directories it would make above it."""
        roots = self.req.confined_to or ()
        if not any(path_below(destination.path, root) for root in roots):
            raise OutsideGrant(self._escape(destination, roots))
        if destination.missing and not any(
            path_below(destination.missing[0], root) for root in roots
        ):
            granted = max((r for r in roots if path_below(destination.path, r)), key=len)
            raise OutsideGrant(
                f"the granted directory {granted} does not exist in {self.where}; "
                "create_dirs makes directories only inside it"
            )
        if destination.missing and not self.req.create_dirs:
            directory = posixpath.dirname(destination.path)
            raise PermanentPushError(
                f"parent directory {directory} does not exist in {self.where} (set create_dirs)"
            )

    def _escape(self, destination: _Destination, roots: tuple[str, ...]) -> str:
        granted = f"outside the directories granted in {self.where}: {', '.join(roots)}"
        for link, text, lands in destination.hops:
            if not any(path_within(lands, root) for root in roots):
                leads = text if text == lands else f"{text} ({lands})"
                return f"{link} is a symbolic link to {leads}, {granted}"
        return f"{self.req.path} leads to {destination.path}, {granted}"

    def _pin(self, handle: Any, temp: str, directory: str) -> None:
        """Check that our temporary file is really in `directory`, reached through directories
        only, and not where a link planted on the way sent it.

        The file is marked through its handle (a random modification time, which a process
        in the instance cannot give a file it does not own), then looked up by path after every
        directory on the way was checked. A process swapping a directory for a link and back
        must hit the instant between these requests, twice per push (after the file is
        created, and right before the rename), to move a file out of the grant.
        """
        marker = secrets.randbelow(1 << 30)
        try:
            current = handle.stat()
            handle.utime((current.st_atime, marker))
        except OSError as exc:
            raise self._failed(exc, "marking", temp) from exc
        self._recheck(directory)
        try:
            seen = self.sftp.lstat(temp)
        except FileNotFoundError:
            seen = None
        except OSError as exc:
            raise self._failed(exc, "looking up", temp) from exc
        if (
            seen is None
            or not stat.S_ISREG(seen.st_mode or 0)
            or seen.st_mtime != marker
            or (seen.st_uid, seen.st_gid, seen.st_size)
            != (current.st_uid, current.st_gid, current.st_size)
        ):
            raise OutsideGrant(
                f"a directory on the way to {directory} in {self.where} changed while the file "
                "was being placed; nothing was published"
            )

    def _recheck(self, directory: str) -> None:
        """After our temporary file exists: every directory on its way must still be one, not
        a link planted meanwhile by a process in the instance. Nothing is written before."""
        current = "/"
        for part in [p for p in directory.split("/") if p]:
            current = posixpath.join(current, part)
            attrs = self._lstat(current)
            if not stat.S_ISDIR(attrs.st_mode or 0) or stat.S_ISLNK(attrs.st_mode or 0):
                raise OutsideGrant(
                    f"{current} in {self.where} changed into something other than a directory "
                    "while the file was being placed; nothing was written"
                )

    def run(self, destination: _Destination) -> None:
        req = self.req
        target, existing = destination.path, destination.existing
        if existing is not None and stat.S_ISDIR(existing.st_mode or 0):
            raise PermanentPushError(f"{req.path} is a directory in {self.where}")
        if req.mode is not None and req.mode & ~PERMISSION_BITS:
            raise PermanentPushError(
                f"mode {req.mode:04o}: Incus cannot set setuid, setgid or sticky bits"
            )
        # What is not requested is kept from the file being replaced, like the CLI; but not
        # its setuid, setgid or sticky bits, which Incus cannot set.
        if existing is not None:
            mode, uid, gid = existing.st_mode & PERMISSION_BITS, existing.st_uid, existing.st_gid
        else:
            mode, uid, gid = NEW_FILE_MODE, 0, 0
        mode = req.mode if req.mode is not None else mode
        uid = req.uid if req.uid is not None else uid
        gid = req.gid if req.gid is not None else gid

        directory, name = posixpath.split(target)
        temp = posixpath.join(directory, _temp_name(name))
        confined = req.confined_to is not None
        if destination.missing:
            self._make_directories(destination.missing)
        handle = self._create(temp, directory, make_parents=not confined)
        self.temp = temp
        try:
            if confined:
                self._pin(handle, temp, directory)  # before a byte of data is written
            if mode & 0o044 != 0o044:
                # The server creates files 0644 (pkg/sftp's fixed mode): hide the data from the
                # readers the final mode shuts out while it is being written.
                try:
                    handle.chmod(0o600)
                except OSError as exc:
                    raise self._failed(exc, "setting the mode of", temp) from exc
            if self.sweep(directory):
                self._remove_stale_temps(directory, temp)
            digest = self._write(handle, temp)
            written = self._set_owner_and_mode(handle, target, uid, gid, mode)
            problem = self._mismatch(written, mode, uid, gid)
            if problem:
                raise TransientPushError(f"the new {target} in {self.where} {problem}")
            if digest is not None and self._remote_sha256(temp) != digest:
                raise TransientPushError(
                    f"the new {target} in {self.where} differs from the upload (SHA-256)"
                )
            if confined:
                self._pin(handle, temp, directory)  # and once more right before the rename
                try:
                    handle.utime((written.st_atime, written.st_mtime))  # the marker goes
                except OSError as exc:
                    raise self._failed(exc, "setting the time of", temp) from exc
            self._still_held()
            self._close_and_rename(handle, temp, target)
            self.temp = None
        except BaseException:
            self._discard(handle, temp)
            raise

    def _create(self, temp: str, directory: str, *, make_parents: bool) -> Any:
        try:
            return self.sftp.open(temp, "wx")
        except FileNotFoundError as exc:
            if not make_parents:
                # A confined push resolved its directory a moment ago: it was removed since.
                raise TransientPushError(
                    f"{directory} in {self.where} disappeared during the push"
                ) from exc
            if not self.req.create_dirs:
                missing = f"parent directory {directory} does not exist in {self.where}"
                raise PermanentPushError(f"{missing} (set create_dirs)") from exc
        except OSError as exc:
            raise self._failed(exc, "creating a file in", directory) from exc
        self._make_parents(directory)
        try:
            return self.sftp.open(temp, "wx")
        except OSError as exc:
            raise self._failed(exc, "creating a file in", directory) from exc

    def _directory_owner(self) -> tuple[int, int] | None:
        """Directories made for a push are owned as requested for the file (root where only
        one of uid and gid is requested), like `incus file push -p`."""
        if self.req.uid is None and self.req.gid is None:
            return None
        return (self.req.uid or 0, self.req.gid or 0)

    def _make_parents(self, directory: str) -> None:
        """Create each missing directory down to `directory`: 0755, owned as requested."""
        missing = []
        current = directory
        while current not in ("/", ""):
            try:
                attrs = self.sftp.stat(current)
            except FileNotFoundError:
                missing.append(current)
                current = posixpath.dirname(current)
                continue
            except OSError as exc:
                raise self._failed(exc, "looking up", current) from exc
            if not stat.S_ISDIR(attrs.st_mode or 0):
                raise PermanentPushError(f"{current} is not a directory in {self.where}")
            break
        owner = self._directory_owner()
        for path in reversed(missing):
            try:
                self.sftp.mkdir(path, DIR_MODE)
            except OSError as exc:
                if self._is_directory(path):
                    continue  # a concurrent push made it: leave it as it is
                raise self._failed(exc, "creating the directory", path) from exc
            try:
                if owner is not None:
                    self.sftp.chown(path, *owner)
                self.sftp.chmod(path, DIR_MODE)  # mkdir's mode passes through the umask
            except OSError as exc:
                raise self._failed(exc, "setting the owner and mode of", path) from exc

    def _make_directories(self, missing: list[str]) -> None:
        """Create the directories a confined push resolved as missing, outermost first.

        Their owner and mode are set through a handle on the directory, not by path: a
        process in the instance that swapped the new directory for a link meanwhile would
        otherwise have us give the link's target away. The handle must be the directory we
        made (a link in its place is caught by lstat; a directory of another age or owner by
        comparing its attributes).
        """
        if not self.req.create_dirs:  # _confine refused this already; never make one unasked
            raise PermanentPushError(f"parent directory {missing[-1]} does not exist")
        owner = self._directory_owner()
        for path in missing:
            try:
                self.sftp.mkdir(path, DIR_MODE)
            except OSError as exc:
                attrs = self._lstat(path)
                if stat.S_ISDIR(attrs.st_mode or 0) and not stat.S_ISLNK(attrs.st_mode or 0):
                    continue  # a concurrent push made it: leave it as it is
                raise self._failed(exc, "creating the directory", path) from exc
            try:
                with _DirectoryHandle(self.sftp, path) as handle:
                    self._check_same_directory(path, handle)
                    if owner is not None:
                        handle.setstat(uid=owner[0], gid=owner[1])
                    handle.setstat(mode=DIR_MODE)  # mkdir's mode passes through the umask
            except OSError as exc:
                raise self._failed(exc, "setting the owner and mode of", path) from exc

    def _check_same_directory(self, path: str, handle: "_DirectoryHandle") -> None:
        """Whether the open handle is the directory at `path` (not a link's target). SFTP v3
        has no inode numbers: compare what it has, including the modification time, which a
        process in the instance cannot set on a directory it does not own. A push writing
        into the new directory meanwhile changes both sides alike, hence the second look."""
        replaced = OutsideGrant(f"{path} in {self.where} was replaced while it was being created")
        for _ in range(3):
            seen = self._lstat(path)
            if not stat.S_ISDIR(seen.st_mode or 0) or stat.S_ISLNK(seen.st_mode or 0):
                raise replaced
            held = handle.stat()
            if _identity(seen) == _identity(held):
                return
        raise replaced

    def _remove_stale_temps(self, directory: str, temp: str) -> None:
        """Remove temporary files in `directory` left by pushes that died.

        Only those not modified for `stale_after` seconds: a live push to the same
        path writes its own sibling continuously, and removing it would fail that push's
        rename (never corrupt it: names are unique). Ages are compared with our own fresh
        sibling's mtime, the server's clock. Best effort: a listing that fails leaves them for
        a later push.
        """
        try:
            entries = self.sftp.listdir_attr(directory)
        except OSError:
            return
        own_name = posixpath.basename(temp)
        now = next((e.st_mtime for e in entries if e.filename == own_name), None)
        if now is None:
            return
        stale_after = self.stale_after
        for entry in entries:
            if (
                entry.filename != own_name
                and TEMP_PATTERN.fullmatch(entry.filename)
                and stat.S_ISREG(entry.st_mode or 0)
                and entry.st_mtime is not None
                and now - entry.st_mtime >= stale_after
            ):
                try:
                    self.sftp.remove(posixpath.join(directory, entry.filename))
                except OSError:
                    pass  # a concurrent push removed it first

    def _write(self, handle: Any, temp: str) -> str | None:
        """Send the spool file; its SHA-256 when it is to be verified."""
        req = self.req
        digest = hashlib.sha256() if uploads_settings.VERIFY_SHA256 else None
        handle.MAX_REQUEST_SIZE = WRITE_PACKET
        handle.set_pipelined(True)
        sent = 0
        try:
            source = req.open_source()
        except OSError as exc:
            raise TransientPushError(f"cannot read the spooled file: {exc}") from exc
        with source:
            while True:
                try:
                    chunk = source.read(SOURCE_CHUNK)
                except OSError as exc:
                    raise TransientPushError(f"cannot read the spooled file: {exc}") from exc
                if not chunk:
                    break
                self._still_held()
                try:
                    handle.write(chunk)
                except OSError as exc:
                    raise self._failed(exc, "writing", temp) from exc
                sent += len(chunk)
                if digest is not None:
                    digest.update(chunk)
        try:
            finish_pipelined_writes(handle)
        except OSError as exc:
            raise self._failed(exc, "writing", temp) from exc
        if sent != req.size:
            # Never publish it: the destination keeps its old content.
            raise TransientPushError(
                f"the spooled file has {sent} bytes, the upload had {req.size}; not replacing "
                f"{req.path} in {self.where}"
            )
        return digest.hexdigest() if digest is not None else None

    def _set_owner_and_mode(self, handle: Any, target: str, uid: int, gid: int, mode: int) -> Any:
        """Give the temporary file its owner and mode and read back what the rename will
        publish (it keeps the inode), in one round trip. Owner and mode go in two requests:
        Incus's SFTP server reads a request that sets both in another field order than
        paramiko writes them (measured: the gid became the owner and the mode the group)."""
        owner, permissions = SFTPAttributes(), SFTPAttributes()
        owner.st_uid, owner.st_gid = uid, gid
        permissions.st_mode = mode
        chowned, chmodded, stat_reply = pipeline(
            self.sftp,
            (CMD_FSETSTAT, (handle.handle, owner)),
            (CMD_FSETSTAT, (handle.handle, permissions)),
            (CMD_FSTAT, (handle.handle,)),
        )
        if isinstance(chowned, OSError):
            # Typically a uid or gid outside the instance's id map: retrying cannot help.
            raise PermanentPushError(
                f"cannot give {target} in {self.where} the owner {uid}:{gid}: {chowned}"
            ) from chowned
        for reply in (chmodded, stat_reply):
            if isinstance(reply, OSError):
                raise self._failed(reply, "setting the mode of", self.temp or target) from reply
        return SFTPAttributes._from_msg(stat_reply)

    def _close_and_rename(self, handle: Any, temp: str, target: str) -> None:
        """Close the temporary file and rename it over the target, in one round trip (the
        server waits for the handle's writes before the close, and renames after it)."""
        closed, renamed = pipeline(
            self.sftp,
            (CMD_CLOSE, (handle.handle,)),
            (CMD_EXTENDED, ("posix-rename@openssh.com", temp, target)),
        )
        handle._closed = True  # paramiko's own flag: do not close it again
        if isinstance(renamed, OSError):
            self._rename_failed(renamed, target)
        if isinstance(closed, OSError):  # published all the same: the writes had succeeded
            logger.warning("closing %s in %s failed after the push: %s", temp, self.where, closed)

    def _still_held(self) -> None:
        if not self.req.held():
            raise NotHeld(
                f"this worker no longer holds the upload to {self.req.path} in {self.where}; "
                "stopped before publishing it"
            )

    def _rename_failed(self, exc: OSError, target: str) -> None:
        if isinstance(exc, FileNotFoundError):
            # Our sibling is gone: removed as stale by a concurrent push after a long stall, or
            # its directory was removed. Another attempt sorts out which.
            raise TransientPushError(
                f"the temporary file for {target} in {self.where} disappeared before the rename"
            ) from exc
        if self._is_directory(target):
            raise PermanentPushError(f"{self.req.path} is a directory in {self.where}") from exc
        raise self._failed(exc, "replacing", target) from exc

    def _discard(self, handle: Any, temp: str) -> None:
        """Best effort: close and remove our temporary sibling after a failure."""
        if self.sftp.sock.broken:
            return  # the pusher removes it on its next push to this instance
        try:
            handle.close()
            self.sftp.remove(temp)
        except (OSError, LinkBroken, paramiko.SSHException):
            # The connection died meanwhile: the pusher removes it on its next push there.
            # Either way the error that brought us here is what the push reports.
            pass

    def _mismatch(self, attrs: Any, mode: int, uid: int, gid: int) -> str | None:
        """How `attrs` differ from the push, if they do."""
        if attrs.st_size != self.req.size:
            return f"has {attrs.st_size} bytes, expected {self.req.size}"
        found = (attrs.st_mode & PERMISSION_BITS, attrs.st_uid, attrs.st_gid)
        if found != (mode, uid, gid):
            return (
                f"has mode {found[0]:04o} and owner {found[1]}:{found[2]}, "
                f"expected {mode:04o} and {uid}:{gid}"
            )
        return None

    def _remote_sha256(self, target: str) -> str:
        digest = hashlib.sha256()
        refresh_every = self.stale_after / 4
        refresh_at = time.monotonic() + refresh_every
        try:
            with self.sftp.open(target, "r") as remote:
                remote.prefetch(self.req.size, max_concurrent_requests=64)
                while data := remote.read(READ_PACKET):
                    digest.update(data)
                    if time.monotonic() >= refresh_at:
                        # Reading writes nothing: keep the file's time fresh so that no other
                        # push takes it for one left by a dead push.
                        self.sftp.utime(target, None)
                        refresh_at = time.monotonic() + refresh_every
        except OSError as exc:
            raise TransientPushError(f"cannot read {target} back from {self.where}: {exc}") from exc
        return digest.hexdigest()


class IncusPusher:
    """Pushes files into Incus instances; one pusher per thread (its sessions are not shared)."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float | None = None,
        *,
        remote: str = "local",
        cert: str | None = None,
        key: str | None = None,
        verify: str | bool = True,
    ) -> None:
        """`endpoint` is a unix socket path or an https:// URL. Over https, `cert` and `key`
        are the client certificate Incus trusts and `verify` the server certificate to pin
        (a path), or True to check the server against the system's CAs."""
        self.remote = remote
        self.timeout = timeout if timeout is not None else uploads_settings.INCUS_TIMEOUT
        # Twice the longest a live push leaves its temporary sibling untouched (one request
        # that stalls up to the timeout).
        self.stale_after = 2 * float(self.timeout)
        if endpoint is None:
            # The remote's own settings (the implicit "local" one is INCUS_ENDPOINT).
            options = uploads_settings.remotes.get(remote, {})
            endpoint = options.get("endpoint") or uploads_settings.INCUS_ENDPOINT
            cert, key = options.get("cert", cert), options.get("key", key)
            verify = options.get("verify", verify)
        self.endpoint = endpoint
        self.cert = cert
        self.key = key
        self.verify = verify
        self._client: pylxd.Client | None = None
        # Pushers for the other configured remotes, made on first use.
        self._remotes: dict[str, IncusPusher] = {}
        # (project, instance) -> idle session, least recently used first. The lock is shared
        # with the idle reaper; a session in use is never in here.
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()
        # The session a push is using right now, for interrupt() from another thread.
        self._busy: _Session | None = None
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._closing = threading.Event()
        # When each directory was last searched for stale temporary files.
        self._swept: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        # Temporary files of our own pushes whose connection broke, to remove on the next one.
        self._orphans: dict[tuple[str, str], set[str]] = {}

    @property
    def _local(self) -> bool:
        return self.endpoint.startswith("/")

    # --- connection ---------------------------------------------------------------------

    @classmethod
    def for_remote(cls, name: str, timeout: float | None = None) -> "IncusPusher":
        """A pusher for a remote named in UPLOADS['REMOTES'] (or the implicit 'local')."""
        if name not in uploads_settings.remotes:
            raise PermanentPushError(f"remote '{name}' is not configured on this server")
        return cls(timeout=timeout, remote=name)

    def _session_for_url(self) -> requests.Session:
        session = get_session_for_url(
            self.endpoint,
            verify=self.verify,
            cert=(self.cert, self.key) if self.cert and self.key else None,
        )
        # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment would replace `verify` (and
        # with it the pinned server certificate) on every request.
        session.trust_env = False
        return session

    def client(self) -> pylxd.Client:
        if self._client is None:
            if self._local and not os.path.exists(self.endpoint):
                raise TransientPushError(self._missing_socket())
            try:
                if self._local:
                    self._client = pylxd.Client(endpoint=self.endpoint, timeout=self.timeout)
                else:
                    self._client = pylxd.Client(
                        endpoint=self.endpoint,
                        timeout=self.timeout,
                        session=self._session_for_url(),
                    )
            except (ClientConnectionFailed, requests.RequestException, OSError) as exc:
                raise TransientPushError(
                    f"cannot reach Incus at {self.endpoint}: {exc or type(exc).__name__}"
                ) from exc
        return self._client

    def _missing_socket(self) -> str:
        return f"the Incus socket {self.endpoint} does not exist (is incusd running?)"

    def close(self) -> None:
        for other in self._remotes.values():
            other.close()
        self._remotes.clear()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            reaper, self._reaper = self._reaper, None
            self._closing.set()
        for session in sessions:
            session.close()
        if reaper is not None:
            reaper.join()
        self._closing = threading.Event()
        if self._client is not None:
            self._client.api.session.close()
            self._client = None

    def check(self) -> str | None:
        try:
            self.client().api.get()
        except TransientPushError as exc:
            return exc.message
        except (LXDAPIException, requests.RequestException, OSError) as exc:
            self.close()
            return f"cannot reach Incus at {self.endpoint}: {exc}"
        return None

    def _project_missing(self, project: str) -> bool:
        """Whether Incus says the project does not exist (to tell a missing project from a
        missing instance: both answer 404 to the SFTP request). False when it cannot tell."""
        try:
            self.client().api.projects[project].get()
        except NotFound:
            return True
        except (PushError, LXDAPIException, requests.RequestException, OSError):
            return False
        return False

    # --- SFTP sessions ------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        """A raw stream connection to the API: the unix socket, or TLS with the client
        certificate and the pinned server certificate for an https:// remote."""
        if not self._local:
            return self._connect_tls()
        if not os.path.exists(self.endpoint):
            raise TransientPushError(self._missing_socket())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.endpoint)
        except OSError as exc:
            sock.close()
            raise TransientPushError(
                f"cannot reach Incus at {self.endpoint}: {exc or type(exc).__name__}"
            ) from exc
        return sock

    def _connect_tls(self) -> socket.socket:
        url = urllib.parse.urlsplit(self.endpoint)
        host, port = url.hostname or "localhost", url.port or 8443
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        pinned: bytes | None = None
        if isinstance(self.verify, str):
            # Incus servers present self-signed certificates: pin the one we were given.
            with open(self.verify) as pem:
                pinned = ssl.PEM_cert_to_DER_cert(pem.read())
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert and self.key:
            context.load_cert_chain(self.cert, self.key)
        try:
            raw = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as exc:
            raise TransientPushError(
                f"cannot reach Incus at {self.endpoint}: {exc or type(exc).__name__}"
            ) from exc
        try:
            sock = context.wrap_socket(raw, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise TransientPushError(f"TLS with Incus at {self.endpoint} failed: {exc}") from exc
        if pinned is not None and sock.getpeercert(binary_form=True) != pinned:
            sock.close()
            raise PermanentPushError(
                f"the server at {self.endpoint} does not present the pinned certificate "
                f"{self.verify}"
            )
        return sock

    def _open_session(self, req: PushRequest) -> _Session:
        name = urllib.parse.quote(req.instance, safe="")
        query = urllib.parse.urlencode({"project": req.project})
        try:
            client, link = open_sftp(self._connect(), target=f"/1.0/instances/{name}/sftp?{query}")
        except UpgradeRefused as exc:
            detail = _error_detail(exc.body, exc.reason)
            if exc.status == 404:
                if self._project_missing(req.project):
                    raise PermanentPushError(
                        f"project '{req.project}' does not exist on remote '{req.remote}'"
                    ) from exc
                raise PermanentPushError(
                    f"instance '{req.instance}' not found in project '{req.project}'"
                ) from exc
            if exc.status == 403:
                raise PermanentPushError(
                    f"Incus refused access to {req.instance} (403): {detail}"
                ) from exc
            if exc.status == 400:
                raise PermanentPushError(f"Incus refused the request (400): {detail}") from exc
            if exc.status == 503:
                raise TransientPushError(f"Incus is not ready (503): {detail}") from exc
            raise TransientPushError(f"Incus answered {exc.status}: {detail}") from exc
        except (LinkBroken, paramiko.SSHException) as exc:
            raise TransientPushError(
                f"connection to Incus failed while opening SFTP to {req.instance}: {exc}"
            ) from exc
        return _Session(client, link)

    def _take_session(self, key: tuple[str, str]) -> _Session | None:
        with self._lock:
            return self._sessions.pop(key, None)

    def _keep_session(self, key: tuple[str, str], session: _Session) -> None:
        idle = float(uploads_settings.SFTP_IDLE_SECONDS)
        if session.broken or idle <= 0:
            session.close()
            return
        session.last_used = time.monotonic()
        evicted = []
        with self._lock:
            self._sessions[key] = session
            while len(self._sessions) > MAX_SESSIONS:
                evicted.append(self._sessions.popitem(last=False)[1])
            if self._reaper is None:
                self._reaper = threading.Thread(
                    target=self._reap, args=(idle, self._closing), name="incus-sftp-idle"
                )
                self._reaper.daemon = True
                self._reaper.start()
        for old in evicted:
            old.close()

    def _reap(self, idle: float, closing: threading.Event) -> None:
        """Close sessions idle for `idle` seconds; end when none is left."""
        while not closing.wait(min(idle / 2, 1.0)):
            now = time.monotonic()
            with self._lock:
                expired = [k for k, s in self._sessions.items() if now - s.last_used >= idle]
                sessions = [self._sessions.pop(k) for k in expired]
                done = not self._sessions
                if done:
                    self._reaper = None
            for session in sessions:
                session.close()
            if done:
                return

    # --- pushing ------------------------------------------------------------------------

    def push(self, request: PushRequest) -> None:
        self._pusher_for(request.remote)._push_sftp(request)

    def _pusher_for(self, remote: str) -> "IncusPusher":
        if remote == self.remote:
            return self
        if remote not in self._remotes:
            self._remotes[remote] = IncusPusher.for_remote(remote, self.timeout)
        return self._remotes[remote]

    def interrupt(self) -> None:
        """Break the connection of the push in progress, if any: its next request fails."""
        for other in list(self._remotes.values()):
            other.interrupt()
        with self._lock:
            busy = self._busy
        if busy is not None:
            busy.link.shutdown()

    def _use(self, session: _Session | None) -> None:
        with self._lock:
            self._busy = session

    def _push_sftp(self, req: PushRequest) -> None:
        try:
            self._push_sftp_session(req)
        finally:
            self._use(None)

    def _push_sftp_session(self, req: PushRequest) -> None:
        key = (req.project, req.instance)
        session = self._take_session(key)
        reused = session is not None
        if session is None:
            session = self._open_session(req)
        self._use(session)
        delivery = _Delivery(session.client, req, self._sweep_due(key), self.stale_after)
        try:
            try:
                destination = delivery.resolve()
            except (LinkBroken, paramiko.SSHException):
                if not reused:
                    raise
                # The kept session died meanwhile (instance stopped, daemon restarted): nothing
                # was written yet, so start afresh once.
                session.close()
                session = self._open_session(req)
                self._use(session)
                delivery = _Delivery(session.client, req, self._sweep_due(key), self.stale_after)
                destination = delivery.resolve()
            self._remove_orphans(key, session)
            delivery.run(destination)
        except PushError:
            if session.broken and delivery.temp is not None:
                self._orphans.setdefault(key, set()).add(delivery.temp)
            self._keep_session(key, session)  # an SFTP error reply leaves the session usable
            raise
        except (LinkBroken, paramiko.SSHException, paramiko.SFTPError, EOFError) as exc:
            session.close()
            if delivery.temp is not None:
                self._orphans.setdefault(key, set()).add(delivery.temp)
            raise TransientPushError(
                f"connection to Incus failed: {exc or type(exc).__name__}"
            ) from exc
        except OSError as exc:
            # An SFTP error reply no step above expected.
            self._keep_session(key, session)
            raise TransientPushError(
                f"SFTP request for {req.path} in {req.instance} failed: {exc}"
            ) from exc
        except BaseException:
            session.close()
            raise
        self._keep_session(key, session)

    def _sweep_due(self, key: tuple[str, str]) -> Callable[[str], bool]:
        """Whether a directory is due for a look for stale temporary files: at most once per
        `stale_after` per directory and pusher (a file only becomes stale after that long,
        and a listing costs a request per entry on the server)."""

        def due(directory: str) -> bool:
            now = time.monotonic()
            where = (*key, directory)
            last = self._swept.get(where)
            if last is not None and now - last < self.stale_after:
                return False
            self._swept[where] = now
            self._swept.move_to_end(where)
            while len(self._swept) > MAX_SWEPT:
                self._swept.popitem(last=False)
            return True

        return due

    def _remove_orphans(self, key: tuple[str, str], session: _Session) -> None:
        """Remove the temporary files our own pushes left when their connection broke."""
        for path in self._orphans.pop(key, ()):
            try:
                session.client.remove(path)
            except OSError:
                pass  # already gone


# --- look-ups --------------------------------------------------------------------------------

LIST_TIMEOUT = 10.0


def instance_names(*, remote: str, project: str) -> list[str]:
    """The names of the instances in `project` on `remote`, sorted (one request, names only:
    no instance's state is read). A project that does not exist raises PermanentPushError;
    an Incus that cannot be reached or fails, TransientPushError."""
    pusher = IncusPusher.for_remote(
        remote, timeout=min(LIST_TIMEOUT, float(uploads_settings.INCUS_TIMEOUT))
    )
    try:
        try:
            response = pusher.client().api.instances.get(params={"project": project})
            urls = response.json()["metadata"]
        except (LXDAPIException, requests.RequestException, OSError, ValueError, KeyError) as exc:
            raise TransientPushError(
                f"cannot list the instances of project '{project}' on remote '{remote}': {exc}"
            ) from exc
        names = sorted(
            urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]) for url in urls
        )
        # Incus lists an unknown project as empty: tell the two apart when it matters.
        if not names and pusher._project_missing(project):
            raise PermanentPushError(f"project '{project}' does not exist on remote '{remote}'")
        return names
    finally:
        pusher.close()
