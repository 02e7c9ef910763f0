"""purge_uploads: retention per outcome, spool files removed, live tasks untouched."""

import os
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from tests.conftest import spool_files
from tests.factories import make_batch, make_task
from uploads.models import Status, UploadAttempt, UploadBatch, UploadTask

pytestmark = pytest.mark.django_db


def age(task: Any, status: str, days: float) -> None:
    UploadTask.objects.filter(pk=task.pk).update(
        status=status, finished_at=timezone.now() - timedelta(days=days)
    )


def test_purge_keeps_recent_and_live_tasks(user: Any, spool: Path) -> None:
    old_ok, new_ok, old_failed, mid_failed, pending = (make_task(user) for _ in range(5))
    age(old_ok, Status.SUCCEEDED, 20)
    age(new_ok, Status.SUCCEEDED, 1)
    age(old_failed, Status.FAILED, 40)
    age(mid_failed, Status.CANCELLED, 20)
    out = StringIO()
    call_command("purge_uploads", "--older-than", "14", "--batch-size", "1", stdout=out)
    left = set(UploadTask.objects.values_list("pk", flat=True))
    assert left == {new_ok.pk, mid_failed.pk, pending.pk}
    assert set(spool_files(spool)) == {t.spool_name for t in (new_ok, mid_failed, pending)}
    assert "Deleted 2 upload(s)" in out.getvalue()


def test_purge_removes_old_orphan_spool_files_only(user: Any, spool: Path) -> None:
    task = make_task(user)
    orphan = spool / ("a" * 32)
    orphan.write_bytes(b"left by a crash")
    fresh_orphan = spool / ("b" * 32 + ".part")
    fresh_orphan.write_bytes(b"being written right now")
    old = time.time() - 3 * 86400
    os.utime(orphan, (old, old))
    os.utime(spool / task.spool_name, (old, old))
    call_command("purge_uploads", stdout=StringIO())
    assert set(spool_files(spool)) == {task.spool_name, fresh_orphan.name}
    assert UploadAttempt.objects.count() == 0


def test_a_fanouts_body_stays_while_one_of_its_tasks_may_need_it(user: Any, spool: Path) -> None:
    batch = make_batch(user, ["web1", "web2", "web3"])
    first, second, third = UploadTask.objects.filter(batch=batch).order_by("instance")
    age(first, Status.SUCCEEDED, 20)
    age(second, Status.FAILED, 20)  # may still be retried, until it is purged
    age(third, Status.SUCCEEDED, 1)
    call_command(
        "purge_uploads", "--older-than", "14", "--failed-older-than", "30", stdout=StringIO()
    )
    assert set(UploadTask.objects.values_list("pk", flat=True)) == {second.pk, third.pk}
    assert spool_files(spool) == [first.spool_name]
    call_command(
        "purge_uploads", "--older-than", "14", "--failed-older-than", "10", stdout=StringIO()
    )
    assert spool_files(spool) == []  # the failed one went; the one left had succeeded
    call_command("purge_uploads", "--older-than", "0", stdout=StringIO())
    assert not UploadTask.objects.exists()
    assert not UploadBatch.objects.exists()  # the batch went with its last task


def test_dry_run_says_what_would_go_and_deletes_nothing(user: Any, spool: Path) -> None:
    old_ok, new_ok, old_failed, mid_failed, pending = (make_task(user) for _ in range(5))
    age(old_ok, Status.SUCCEEDED, 20)
    age(new_ok, Status.SUCCEEDED, 1)
    age(old_failed, Status.FAILED, 40)
    age(mid_failed, Status.CANCELLED, 20)
    orphan = spool / ("a" * 32)
    orphan.write_bytes(b"left by a crash")
    partial = spool / ("b" * 32 + ".part")
    partial.write_bytes(b"a body whose upload never ended")
    old = time.time() - 3 * 86400
    for path in (orphan, partial, spool / pending.spool_name):
        os.utime(path, (old, old))
    tasks_before = set(UploadTask.objects.values_list("pk", flat=True))
    files_before = spool_files(spool)

    out = StringIO()
    call_command("purge_uploads", "--dry-run", "-v", "2", stdout=out)
    lines = out.getvalue().splitlines()
    assert set(UploadTask.objects.values_list("pk", flat=True)) == tasks_before
    assert spool_files(spool) == files_before
    assert lines[-1] == (
        "Would delete 2 upload(s) and 4 spool file(s); nothing was deleted (dry run)."
    )
    # Oldest first; the pending task's old file is needed and stays off the list.
    assert [line.split()[1] for line in lines if line.startswith("upload ")] == [
        str(old_failed.pk),
        str(old_ok.pk),
    ]
    assert sorted(line.split()[2] for line in lines if line.startswith("spool file ")) == sorted(
        [old_ok.spool_name, old_failed.spool_name, orphan.name, "b" * 32]
    )

    out = StringIO()
    call_command("purge_uploads", stdout=out)
    assert out.getvalue() == "Deleted 2 upload(s) and 4 spool file(s).\n"
    assert set(spool_files(spool)) == {t.spool_name for t in (new_ok, mid_failed, pending)}


def test_dry_run_keeps_a_fanouts_body_while_one_of_its_tasks_may_need_it(
    user: Any, spool: Path
) -> None:
    """As the real purge: the shared file stays while a task that could be retried is kept."""
    batch = make_batch(user, ["web1", "web2"])
    first, second = UploadTask.objects.filter(batch=batch).order_by("instance")
    age(first, Status.SUCCEEDED, 20)
    age(second, Status.FAILED, 20)
    out = StringIO()
    call_command("purge_uploads", "--dry-run", stdout=out)
    assert out.getvalue().startswith("Would delete 1 upload(s) and 0 spool file(s)")
    out = StringIO()
    call_command("purge_uploads", stdout=out)
    assert out.getvalue() == "Deleted 1 upload(s) and 0 spool file(s).\n"
    assert spool_files(spool) == [first.spool_name]
    out = StringIO()
    call_command("purge_uploads", "--dry-run", "--failed-older-than", "10", stdout=out)
    assert out.getvalue().startswith("Would delete 1 upload(s) and 1 spool file(s)")
