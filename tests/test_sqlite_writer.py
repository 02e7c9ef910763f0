"""The SQLite backend lets one thread per process write at a time (uploadsvc/sqlite3). These
tests open their own SQLite file whatever database the suite runs on."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError
from django.db.utils import ConnectionHandler

from uploadsvc.sqlite3.base import _writer


@pytest.fixture
def databases(tmp_path: Path, django_db_blocker: Any) -> Iterator[ConnectionHandler]:
    django_db_blocker.unblock()
    handler = ConnectionHandler(
        {
            "default": {
                "ENGINE": "uploadsvc.sqlite3",
                "NAME": str(tmp_path / "writer.sqlite3"),
                "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 0.5},
            }
        }
    )
    with handler["default"].cursor() as cursor:
        cursor.execute("CREATE TABLE log (who TEXT)")
    handler["default"].close()
    yield handler
    handler.close_all()
    django_db_blocker.restore()


def _write(handler: ConnectionHandler, who: str, *, hold: float = 0.0, fail: bool = False) -> None:
    """One writing transaction on this thread's own connection to the test file."""
    connection = handler.create_connection("default")
    try:
        with connection.cursor():
            pass
        connection.set_autocommit(False, force_begin_transaction_with_broken_autocommit=True)
        try:
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO log VALUES (%s)", [f"{who} begins"])
            if _writer.locked():
                connection.cursor().execute(
                    "INSERT INTO log VALUES (%s)", [f"{who} holds the process's lock"]
                )
            time.sleep(hold)
            if fail:
                raise RuntimeError(who)
            connection.commit()
        except RuntimeError:
            connection.rollback()
        finally:
            connection.set_autocommit(True)
        connection.set_autocommit(False, force_begin_transaction_with_broken_autocommit=True)
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO log VALUES (%s)", [f"{who} ends"])
        connection.commit()
        connection.set_autocommit(True)
    finally:
        connection.close()


def _log(handler: ConnectionHandler) -> list[str]:
    with handler["default"].cursor() as cursor:
        cursor.execute("SELECT who FROM log")
        return [row[0] for row in cursor.fetchall()]


def _in_threads(*targets: Any) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # the first thread's BEGIN comes first
    for thread in threads:
        thread.join(10)
    return errors


def test_a_second_thread_writes_only_after_the_first_committed(databases: Any) -> None:
    """A holds its transaction for 0.2 s; B, started meanwhile, waits on the process's lock
    (not in SQLite's busy handler) and begins only after A committed."""
    errors = _in_threads(lambda: _write(databases, "A", hold=0.2), lambda: _write(databases, "B"))
    assert errors == []
    log = _log(databases)
    assert log.index("A begins") < log.index("B begins")
    assert "A holds the process's lock" in log and "B holds the process's lock" in log
    assert not _writer.locked()


def test_a_rolled_back_transaction_hands_the_lock_on(databases: Any) -> None:
    """A fails and rolls back; B and A's next transaction both get to write."""
    errors = _in_threads(
        lambda: _write(databases, "A", hold=0.1, fail=True), lambda: _write(databases, "B")
    )
    assert errors == []
    assert sorted(_log(databases)) == ["A ends", "B begins", "B ends", "B holds the process's lock"]
    assert not _writer.locked()


def test_a_closed_connection_hands_the_lock_on(databases: Any) -> None:
    """A connection closed in the middle of its transaction (a worker thread that ends) does
    not keep the other threads from writing."""
    connection = databases.create_connection("default")
    connection.set_autocommit(False, force_begin_transaction_with_broken_autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO log VALUES ('lost')")
    connection.close()
    assert _in_threads(lambda: _write(databases, "B")) == []
    assert _log(databases) == ["B begins", "B holds the process's lock", "B ends"]
    assert not _writer.locked()


def test_waiting_longer_than_the_timeout_is_database_is_locked(databases: Any) -> None:
    """B gives up after the database's timeout (0.5 s here) with SQLite's own error."""
    errors = _in_threads(lambda: _write(databases, "A", hold=1.5), lambda: _write(databases, "B"))
    assert len(errors) == 1 and isinstance(errors[0], OperationalError)
    assert "database is locked: another thread of this process" in str(errors[0])
    assert "A ends" in _log(databases)
