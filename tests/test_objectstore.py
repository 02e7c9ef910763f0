"""The spool on a real S3-compatible store (SeaweedFS): what goes in comes out whole, a refused
or broken upload leaves no object and no multipart upload, errors map to 503/507 and to
transient or permanent push errors, purge sweeps orphans, and memory stays bounded."""

import hashlib
import os
import time
from datetime import timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from tests.api_utils import INLINE_MAX, form_upload, raw_upload
from tests.conftest import S3Spool
from tests.factories import make_task
from uploads import selectors, services, spool
from uploads.checks import check_spool_reachable, check_uploads_settings
from uploads.models import Status, UploadTask
from uploads.objectstore import PART_SIZE
from uploads.pushers import NullPusher, PushRequest
from uploads.worker import Worker

pytestmark = pytest.mark.django_db

MIB = 1024 * 1024


def write(content: bytes, chunk: int = MIB) -> spool.SpooledFile:
    with spool.SpoolWriter() as writer:
        for start in range(0, len(content), chunk):
            writer.write(content[start : start + chunk])
        return writer.commit()


def read(name: str) -> bytes:
    with spool.open_body(name) as body:
        parts = []
        while chunk := body.read(MIB):
            parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("size", [INLINE_MAX + 1, PART_SIZE, 2 * PART_SIZE + 12_345])
def test_a_body_comes_back_whole_and_goes_when_removed(s3_spool: S3Spool, size: int) -> None:
    content = os.urandom(size)
    spooled = write(content)
    assert spooled.size == size
    assert spooled.sha256 == hashlib.sha256(content).hexdigest()
    assert s3_spool.objects() == [spooled.name]
    assert s3_spool.incomplete_uploads() == []
    assert spool.exists(spooled.name)
    assert read(spooled.name) == content
    assert spool.remove(spooled.name)
    assert not spool.exists(spooled.name)
    assert s3_spool.leftovers() == []


def test_a_body_left_unfinished_leaves_no_object_and_no_parts(s3_spool: S3Spool) -> None:
    with pytest.raises(RuntimeError), spool.SpoolWriter() as writer:
        writer.write(os.urandom(2 * PART_SIZE + 1))  # two parts sent already
        raise RuntimeError("the client went away")
    assert s3_spool.leftovers() == []


def test_truncated_and_oversized_streams_leave_nothing(s3_spool: S3Spool) -> None:
    content = os.urandom(PART_SIZE + MIB)
    feed = iter([content[i : i + MIB] for i in range(0, len(content), MIB)])
    with pytest.raises(spool.TruncatedBody):
        spool.spool_stream(lambda n: next(feed, b""), expected=len(content) + 1, max_size=10**12)
    feed = iter([content[i : i + MIB] for i in range(0, len(content), MIB)])
    with pytest.raises(spool.BodyTooLarge):
        spool.spool_stream(lambda n: next(feed, b""), expected=None, max_size=PART_SIZE)
    assert s3_spool.leftovers() == []


@pytest.mark.django_db(transaction=True)
def test_an_upload_through_the_api_is_one_object_until_pushed(
    api: APIClient, s3_spool: S3Spool, user: Any
) -> None:
    body = os.urandom(PART_SIZE + 3)
    response = raw_upload(api, body)
    assert response.status_code == 202, response.content
    task = UploadTask.objects.get()
    assert s3_spool.objects() == [task.spool_name]
    assert task.sha256 == hashlib.sha256(body).hexdigest()
    form = form_upload(api, body, path="/srv/app/other.txt")
    assert form.status_code == 202, form.content
    assert len(s3_spool.objects()) == 2

    bodies: list[bytes] = []

    class ReadingPusher(NullPusher):
        """Reads the body as the Incus pusher does (it has no Incus of its own to reach)."""

        def push(self, request: PushRequest) -> None:
            with request.open_source() as source:
                bodies.append(source.read())

    assert Worker(threads=2, burst=True, pusher_factory=ReadingPusher).run() == 0
    assert bodies == [body, body]
    assert set(UploadTask.objects.values_list("status", flat=True)) == {Status.SUCCEEDED}
    assert s3_spool.leftovers() == []


def test_a_digest_mismatch_and_a_refused_form_leave_nothing(
    api: APIClient, s3_spool: S3Spool
) -> None:
    body = os.urandom(INLINE_MAX + 10)
    assert raw_upload(api, body, x_content_sha256="0" * 64).status_code == 400
    assert form_upload(api, body, sha256="f" * 64).status_code == 400
    assert form_upload(api, body, container=None).status_code == 400
    assert UploadTask.objects.count() == 0
    assert s3_spool.leftovers() == []


def test_an_unreachable_store_is_503_and_nothing_is_queued(
    api: APIClient, s3_spool: S3Spool, settings: Any
) -> None:
    settings.AWS_S3_ENDPOINT_URL = "http://127.0.0.1:9"  # nothing listens on discard
    body = os.urandom(2 * PART_SIZE)
    raw = raw_upload(api, body)
    assert raw.status_code == 503, raw.content
    assert "Retry-After" in raw
    form = form_upload(api, body)
    assert form.status_code == 503, form.content
    assert UploadTask.objects.count() == 0
    # A small body travels in its task's row: the store is not needed for it.
    assert raw_upload(api, b"small").status_code == 202


def test_a_store_refusing_for_space_is_507_and_leaves_nothing(
    api: APIClient, s3_spool: S3Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Injected fault: SeaweedFS cannot be made to run out of quota on demand. The second part
    # is refused as a full store refuses it; the first was sent and must be cleaned up.
    client = spool.backend().client  # type: ignore[attr-defined]
    real_upload_part = client.upload_part

    def upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] > 1:
            raise ClientError(
                {
                    "Error": {"Code": "QuotaExceeded", "Message": "quota"},
                    "ResponseMetadata": {"HTTPStatusCode": 403},
                },
                "UploadPart",
            )
        return real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", upload_part)
    response = raw_upload(api, os.urandom(3 * PART_SIZE))
    assert response.status_code == 507, response.content
    assert UploadTask.objects.count() == 0
    assert s3_spool.leftovers() == []


@pytest.mark.django_db(transaction=True)
def test_a_missing_object_fails_the_push_for_good_with_a_clear_message(
    user: Any, s3_spool: S3Spool
) -> None:
    task = make_task(user, content=os.urandom(INLINE_MAX + 1))
    s3_spool.client.delete_object(
        Bucket=s3_spool.bucket, Key=f"{s3_spool.prefix}/{task.spool_name}"
    )
    Worker(threads=1, burst=True, pusher_factory=NullPusher).run()
    task.refresh_from_db()
    assert task.status == Status.FAILED and task.attempts == 1
    assert "no longer in the spool" in task.last_error
    assert f"s3://{s3_spool.bucket}/{s3_spool.prefix}" in task.last_error


@pytest.mark.django_db(transaction=True)
def test_an_unreachable_store_is_a_transient_push_error(
    user: Any, s3_spool: S3Spool, settings: Any
) -> None:
    task = make_task(user, content=os.urandom(INLINE_MAX + 1))
    settings.AWS_S3_ENDPOINT_URL = "http://127.0.0.1:9"
    Worker(threads=1, burst=True, pusher_factory=NullPusher).run()
    task.refresh_from_db()
    assert task.status == Status.PENDING and task.attempts == 1
    assert "127.0.0.1:9" in task.last_error


def test_purge_removes_orphans_and_incomplete_uploads_older_than_the_grace_period(
    user: Any, s3_spool: S3Spool
) -> None:
    store = spool.backend()
    live = make_task(user, content=os.urandom(INLINE_MAX + 1))
    orphan = write(b"left by a crash between spooling and queueing" * 2000)
    stale = store.writer()  # a web server killed mid-upload: its multipart upload stays
    stale.write(os.urandom(PART_SIZE))
    time.sleep(2.5)
    cutoff = timezone.now() - timedelta(seconds=1)
    fresh = write(b"being queued right now" * 4000)
    receiving = store.writer()
    receiving.write(os.urandom(PART_SIZE))
    try:
        assert set(s3_spool.incomplete_uploads()) == {stale.name, receiving.name}
        plan = selectors.purge_plan(
            succeeded_before=cutoff, failed_before=cutoff, orphans_before=cutoff
        )
        assert sorted(plan.spool_names) == sorted([orphan.name, stale.name])
        result = services.purge_finished(
            succeeded_before=cutoff, failed_before=cutoff, orphans_before=cutoff
        )
        assert result.spool_files == 2
        assert s3_spool.objects() == sorted([live.spool_name, fresh.name])
        assert s3_spool.incomplete_uploads() == [receiving.name]
    finally:
        receiving.abort()


def test_purge_command_deletes_a_purged_tasks_object(user: Any, s3_spool: S3Spool) -> None:
    task = make_task(user, content=os.urandom(INLINE_MAX + 1))
    UploadTask.objects.filter(pk=task.pk).update(
        status=Status.CANCELLED, finished_at=timezone.now() - timedelta(days=30)
    )
    call_command("purge_uploads", "--older-than", "7")
    assert s3_spool.leftovers() == []


def test_healthz_and_the_start_up_check_name_a_missing_bucket_or_bad_credentials(
    s3_spool: S3Spool, settings: Any
) -> None:
    """/healthz, `check --deploy` and the workers' start say what is wrong with the bucket;
    commands that never touch the spool (migrate's checks) do not ask it."""
    assert Client().get("/healthz").status_code == 200
    assert check_spool_reachable() == []
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_URL": "s3://no-such-bucket/spool"}
    answer = Client().get("/healthz")
    assert answer.status_code == 503
    assert "s3://no-such-bucket/spool" in answer.json()["checks"]["spool"]
    assert "bucket does not exist" in answer.json()["checks"]["spool"]
    errors = check_spool_reachable()
    assert [e.id for e in errors] == ["uploads.E011"]
    assert "no-such-bucket" in errors[0].msg
    assert check_uploads_settings() == []
    with pytest.raises(CommandError, match="no-such-bucket.*bucket does not exist.*E011"):
        call_command("run_push_workers", "--burst")
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_URL": f"s3://{s3_spool.bucket}/spool"}
    settings.AWS_SECRET_ACCESS_KEY = "wrong"
    answer = Client().get("/healthz")
    assert answer.status_code == 503
    assert "access denied" in answer.json()["checks"]["spool"]
    assert [e.id for e in check_spool_reachable()] == ["uploads.E011"]


def test_a_spool_url_that_is_neither_a_path_nor_s3_is_reported(
    settings: Any, tmp_path: Any
) -> None:
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_URL": "ftp://host/dir"}
    assert [e.id for e in check_uploads_settings()] == ["uploads.E010"]
    settings.UPLOADS = {**settings.UPLOADS, "SPOOL_URL": str(tmp_path / "elsewhere")}
    assert check_uploads_settings() == []
    assert write(b"x" * (INLINE_MAX + 1)).name in os.listdir(tmp_path / "elsewhere")


def rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM, the peak resident set size


def rss_peak() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_a_large_body_streams_in_bounded_memory(s3_spool: S3Spool) -> None:
    # 256 MiB here for speed; `python -m bench ingest` measures a whole 1 GiB upload.
    chunk = os.urandom(MIB)
    write(chunk * 12)  # warm up: boto3's client and connections exist before measuring
    rss_peak_reset()
    before = rss_peak()
    with spool.SpoolWriter() as writer:
        for _ in range(256):
            writer.write(chunk)
        spooled = writer.commit()
    grown = rss_peak() - before
    assert spooled.size == 256 * MIB
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB"
    with spool.open_body(spooled.name) as body:
        rss_peak_reset()
        before = rss_peak()
        digest = hashlib.sha256()
        while data := body.read(MIB):
            digest.update(data)
        grown = rss_peak() - before
    assert digest.hexdigest() == spooled.sha256
    assert grown < 64 * MIB, f"RSS grew {grown / MIB:.0f} MiB while reading"
    spool.remove(spooled.name)
