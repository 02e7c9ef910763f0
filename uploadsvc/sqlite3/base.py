"""Django's SQLite backend, with one writing transaction per process at a time.

SQLite lets one connection write at a time. With IMMEDIATE transactions a writer waits for that
lock in SQLite's busy handler, which sleeps for growing intervals (up to 100 ms each) and wakes
in no particular order: with a dozen threads writing, the unlucky ones wait seconds. Here the
threads of one process first queue on a lock of their own, so at most one of them at a time
waits in SQLite's handler (the others wait on a lock that hands over at once), and the tail
shrinks to the few processes that share the file.
"""

import threading
from typing import Any

from django.db import OperationalError
from django.db.backends.sqlite3 import base

_writer = threading.Lock()

# The hooks overridden below are private to Django, and its type stubs do not declare them.
_SQLiteWrapper: Any = base.DatabaseWrapper


class DatabaseWrapper(_SQLiteWrapper):
    _holds_writer = False

    def _start_transaction_under_autocommit(self) -> None:
        if self.transaction_mode != "IMMEDIATE":
            super()._start_transaction_under_autocommit()
            return
        timeout = float(self.settings_dict["OPTIONS"].get("timeout", 5))
        if not _writer.acquire(timeout=timeout):
            raise OperationalError(
                f"database is locked: another thread of this process kept writing for {timeout} s"
            )
        self._holds_writer = True
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._release_writer()
            raise

    def _release_writer(self) -> None:
        if self._holds_writer:
            self._holds_writer = False
            _writer.release()

    def _commit(self) -> Any:
        try:
            return super()._commit()
        finally:
            self._release_writer()

    def _rollback(self) -> Any:
        try:
            return super()._rollback()
        finally:
            self._release_writer()

    def _close(self) -> Any:
        try:
            return super()._close()
        finally:
            self._release_writer()
