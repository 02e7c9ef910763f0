"""The SQLite wake-up pipe on its own: a ring wakes a waiting worker and never hurts the ringer."""

import os
import threading
from pathlib import Path

import pytest

from uploads import wakeup


@pytest.fixture
def pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "db.sqlite3.wakeup"
    monkeypatch.setattr(wakeup, "pipe_path", lambda: path)
    return path


def test_ringing_with_no_worker_listening_is_harmless(pipe: Path) -> None:
    wakeup.ring()  # no pipe yet
    with wakeup.Doorbell(pipe):
        pass
    wakeup.ring()  # a pipe with no reader: ENXIO, swallowed
    assert pipe.exists()


def test_a_ring_wakes_a_waiting_worker_and_is_consumed(pipe: Path) -> None:
    with wakeup.Doorbell(pipe) as bell:
        assert not bell.wait(timeout=0.05)
        woken: list[bool] = []
        listener = threading.Thread(target=lambda: woken.append(bell.wait(timeout=5)))
        listener.start()
        wakeup.ring()
        listener.join()
        assert woken == [True]
        assert not bell.wait(timeout=0.05)


def test_with_several_workers_a_ring_wakes_at_least_one(pipe: Path) -> None:
    # Whoever reads first takes the byte; the others may or may not have seen it. One awake
    # worker is enough: it claims, and the poll is there for the rest.
    with wakeup.Doorbell(pipe) as first, wakeup.Doorbell(pipe) as second:
        wakeup.ring()
        assert first.wait(timeout=5) or second.wait(timeout=5)


def test_a_full_pipe_does_not_block_the_web_server(pipe: Path) -> None:
    with wakeup.Doorbell(pipe) as bell:
        for _ in range(70_000):  # more than the 64 KiB a pipe buffers
            wakeup.ring()
        assert bell.wait(timeout=1)
        assert not bell.wait(timeout=0.05)


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3.wakeup"
    path.write_text("not a pipe")
    with pytest.raises(OSError, match="not a named pipe"):
        wakeup.Doorbell(path)
    assert os.path.isfile(path)


@pytest.mark.django_db
def test_the_pipe_sits_beside_a_sqlite_database_only() -> None:
    from django.db import connection

    path = wakeup.pipe_path()
    if connection.vendor == "sqlite":
        assert path == Path(str(connection.settings_dict["NAME"]) + ".wakeup")
    else:
        assert path is None
