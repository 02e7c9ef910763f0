"""The API's cheap paths agree with the DRF serializers they stand in for: the task's JSON, and
the upload parameters on generated input."""

from typing import Any

import pytest
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.test import APIRequestFactory

from tests.factories import make_task
from uploads import queue
from uploads.queue import Completion, Result
from uploads.serializers import UploadParamsSerializer, UploadTaskSerializer, parse_upload_params

pytestmark = pytest.mark.django_db


def drf_rendering(task: Any, request: Any) -> dict[str, Any]:
    """What ModelSerializer itself would render for the declared fields."""
    serializer = UploadTaskSerializer(task, context={"request": request})
    return dict(serializers.ModelSerializer.to_representation(serializer, task))


def test_a_task_renders_as_drf_would(user: Any) -> None:
    request = APIRequestFactory().get("/api/uploads/")
    plain = make_task(user)
    full = make_task(
        user, mode=0o640, uid=1000, gid=0, create_dirs=True, filename="a.txt", project="p2"
    )
    (claim,) = queue.claim(worker_id="w", limit=1)
    queue.complete([Completion(claim, Result.TRANSIENT, "blip")])
    for task in (plain, full):
        task.refresh_from_db()
        rendered = UploadTaskSerializer(task, context={"request": request}).data
        assert rendered == drf_rendering(task, request)
    assert any(t.started_at for t in (plain, full))  # one has been claimed: every field set
    assert timezone.is_aware(full.created_at)


names = st.sampled_from(["web1", "web-2", "Web", "1web", "web_1", "", " web1", "w" * 64])
paths = st.sampled_from(
    ["/srv/a", "/srv/./a/../b", "//srv//a", "srv/a", "/srv/a/", "/", "/a b", " /srv/a", "/\x00"]
)
texts = st.one_of(st.none(), st.text(max_size=12))
ids = st.one_of(
    st.none(),
    st.sampled_from(["0", "1000", "4294967295", "4294967296", "-1", "1.0", " 7", "", "0x10"]),
)
modes = st.one_of(st.none(), st.sampled_from(["0644", "644", "0o755", "7777", "8", "", " 0644"]))
flags = st.one_of(st.none(), st.sampled_from(["true", "1", "yes", "no", "0", "FALSE", "maybe", ""]))
digests = st.one_of(st.none(), st.sampled_from(["a" * 64, "A" * 64, "a" * 63, "g" * 64, ""]))
projects = st.one_of(st.none(), st.sampled_from(["default", "p2", "p.2_x-y", "", "p 2", "-p"]))
remotes = st.one_of(st.none(), st.sampled_from(["local", "edge", "", " local"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    container=names,
    path=paths,
    project=projects,
    remote=remotes,
    filename=st.one_of(texts, st.sampled_from(["a\\b\\c.txt", "../x", " f "])),
    mode=modes,
    uid=ids,
    gid=ids,
    create_dirs=flags,
    sha256=digests,
)
def test_upload_parameters_parse_as_the_serializer_does(**data: Any) -> None:
    serializer = UploadParamsSerializer(data={k: v for k, v in data.items() if v is not None})
    if serializer.is_valid():
        assert parse_upload_params(data) == dict(serializer.validated_data)
    else:
        with pytest.raises(ValidationError) as refused:
            parse_upload_params(data)
        assert refused.value.detail == serializer.errors
