"""What a push sends where: the `[<remote>:]<instance>/<path>` target and the local sources,
resolved to one destination per file before anything is uploaded."""

import hashlib
import os
import posixpath
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

CHUNK = 1 << 20


class UsageError(Exception):
    """The command line cannot be right whatever is on disk (exit status 2)."""


class SourceError(Exception):
    """A local source cannot be pushed (exit status 1); nothing was uploaded."""


@dataclass(frozen=True)
class Target:
    instance: str
    path: str
    remote: str | None
    is_dir: bool

    def join(self, relative: str) -> str:
        return posixpath.join(self.path, relative)


def parse_target(text: str) -> Target:
    """`web1/etc/app.conf`, `web1/srv/app/` (a directory) or `remote:web1/etc/app.conf`, split
    and cleaned like `incus file push` does."""
    instance, slash, rest = text.partition("/")
    remote: str | None = None
    if ":" in instance:
        remote, _, instance = instance.partition(":")
        if not remote:
            raise UsageError(f"invalid target {text!r}: the remote before ':' is empty")
    if not slash or not instance:
        raise UsageError(
            f"invalid target {text!r}: expected [<remote>:]<instance>/<path>, "
            "e.g. web1/etc/app.conf"
        )
    # normpath keeps a leading "//"; Incus paths have a single root.
    path = "/" + posixpath.normpath("/" + rest).lstrip("/")
    return Target(
        instance=instance, path=path, remote=remote, is_dir=text.endswith("/") or path == "/"
    )


@dataclass(frozen=True)
class Source:
    """One file to push: where it comes from and where it goes."""

    display: str  # the local path as the user named it, or "-" for standard input
    origin: str | IO[bytes]  # a regular file, or a stream read once (standard input, a pipe)
    path: str  # the destination inside the instance
    mode: int | None  # the local permission bits, kept as `incus file push` keeps them

    @property
    def label(self) -> str:
        return "standard input" if self.display == "-" else self.display


def _check_name(name: str, source: str) -> None:
    try:
        name.encode()
    except UnicodeEncodeError:
        raise SourceError(f"{source}: the file name is not valid UTF-8") from None


def _walk(top: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(local path, path relative to the target) of every regular file under `top`, sorted.

    Symbolic links are refused rather than followed: `incus file push -r` recreates them as
    links, which the service cannot do, and following them could push files from outside the
    tree.
    """
    with os.scandir(top) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        relative = posixpath.join(prefix, entry.name) if prefix else entry.name
        _check_name(entry.name, entry.path)
        if entry.is_symlink():
            raise SourceError(
                f"{entry.path} is a symbolic link; uploadsvc pushes regular files only "
                "(replace the link by its target or leave it out of the tree)"
            )
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, relative)
        elif entry.is_file(follow_symlinks=False):
            yield entry.path, relative
        else:
            raise SourceError(f"{entry.path} isn't a supported file type")


def plan(sources: list[str], target: Target, *, recursive: bool, stdin: IO[bytes]) -> list[Source]:
    """Every file to push, checked before anything is sent (as `incus file push` does)."""
    if "-" in sources:
        if len(sources) > 1 or recursive:
            raise UsageError("'-' (standard input) must be the only source, without -r")
        if target.is_dir:
            raise UsageError(
                "standard input has no file name: name the file in the target, "
                "e.g. web1/etc/app.conf"
            )
        return [Source(display="-", origin=stdin, path=target.path, mode=None)]
    into_dir = target.is_dir or recursive or len(sources) > 1
    planned: list[Source] = []
    for name in sources:
        try:
            st = os.stat(name)
        except OSError as exc:
            raise SourceError(f"{name}: {exc.strerror}") from None
        base = os.path.basename(os.path.normpath(name))
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise SourceError(f"{name} is a directory (use -r to push it with its files)")
            # Like `incus file push -r` and `cp -r`: the directory keeps its name under the
            # target, except "." and ".." whose contents go straight into it.
            prefix = "" if base in (".", "..", "/", "") else base
            _check_name(prefix, name)
            for local, relative in _walk(name, prefix):
                mode = stat.S_IMODE(os.stat(local).st_mode) & 0o777
                planned.append(Source(local, local, target.join(relative), mode))
            continue
        _check_name(base, name)
        path = target.join(base) if into_dir else target.path
        if stat.S_ISREG(st.st_mode):
            planned.append(Source(name, name, path, stat.S_IMODE(st.st_mode) & 0o777))
        else:  # a pipe or a device, e.g. `<(make-config)`: read once, like standard input
            planned.append(Source(name, open(name, "rb"), path, None))
    seen: dict[str, str] = {}
    for source in planned:
        if source.path in seen:
            raise UsageError(
                f"{seen[source.path]} and {source.display} would both be pushed to {source.path}"
            )
        seen[source.path] = source.display
    return planned


@dataclass
class Body:
    """A source ready to send: its size, its SHA-256, and a fresh reader at offset 0 for each
    attempt (a resend after a dropped connection starts again from the first byte)."""

    size: int
    sha256: str
    reopen: Callable[[], IO[bytes]]
    release: Callable[[], None]


def prepare(source: Source, progress: Callable[[int], Callable[[int], None]]) -> Body:
    """Hash a regular file (or spool a stream) before it is sent; `progress(total)` gives the
    callback told of each chunk read (total 0 when the length is not known beforehand)."""
    if isinstance(source.origin, str):
        local = source.origin
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            read = progress(os.fstat(f.fileno()).st_size)
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                read(len(chunk))
            size = f.tell()
        return Body(size, digest.hexdigest(), lambda: open(local, "rb"), lambda: None)
    return _spool(source.origin, progress(0))


def _spool(stream: IO[bytes], progress: Callable[[int], None]) -> Body:
    """Copy a stream that cannot be read twice (standard input, a pipe) to a temporary file,
    hashing it on the way, so it goes with a Content-Length and a digest and can be sent again
    after a dropped connection. The file is unlinked at once; closing it frees the space."""
    file = tempfile.TemporaryFile(prefix="uploadsvc-")
    digest = hashlib.sha256()
    try:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            file.write(chunk)
            progress(len(chunk))
        file.flush()
        size = file.tell()
    except BaseException:
        file.close()
        raise

    def reopen() -> IO[bytes]:
        # A duplicate descriptor: the sender may close it without closing the spooled copy.
        reader = os.fdopen(os.dup(file.fileno()), "rb")
        reader.seek(0)
        return reader

    return Body(size, digest.hexdigest(), reopen, file.close)
