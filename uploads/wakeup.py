"""Wake idle workers at once on SQLite, as LISTEN/NOTIFY does on PostgreSQL.

SQLite has no notifications, so a worker would notice a new task only at its next poll (1 s by
default). The database file is what the web server and the workers share by definition, so a
named pipe beside it (`<database>.wakeup`) carries a doorbell: after a task commits, the web
server writes one byte; every worker holds the pipe open and wakes when it turns readable (a
worker that reads the byte first takes it, so one ring wakes at least one worker).

Best effort on both ends: no worker listening, a full pipe, a database in memory — the byte is
dropped and polling, which remains the guarantee of progress, picks the task up.
"""

import errno
import os
import select
import stat
from pathlib import Path

from django.db import connection

SUFFIX = ".wakeup"


def pipe_path() -> Path | None:
    """The pipe for the default database, or None when it is not a SQLite file."""
    if connection.vendor != "sqlite":
        return None
    name = str(connection.settings_dict["NAME"] or "")
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name).with_name(Path(name).name + SUFFIX)


def ring() -> None:
    """Wake the workers listening on the pipe, if any. Never blocks, never raises for them."""
    path = pipe_path()
    if path is None:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO):  # no worker has listened, or none now
            return
        raise
    try:
        os.write(fd, b"\0")
    except BlockingIOError:
        pass  # the pipe is full of unread rings: the workers are being woken already
    finally:
        os.close(fd)


class Doorbell:
    """A worker's end of the pipe, created if needed and opened read-write, so that it never
    reads end-of-file when no web server has it open."""

    def __init__(self, path: Path) -> None:
        try:
            os.mkfifo(path, 0o660)
        except FileExistsError:
            pass
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a named pipe")
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def wait(self, timeout: float) -> bool:
        """True when rung within `timeout` seconds; the rings waiting are consumed."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass  # drained; another worker may have taken the bytes first, which is fine
        return True

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "Doorbell":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
