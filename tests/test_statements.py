"""How many SQL statements the hot paths cost, so that a later change cannot quietly add one:
an accepted upload, a claim of a batch, the completion of a batch. PostgreSQL runs each as one
statement; SQLite, the embedded default, takes a transaction of a few."""

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tests.api_utils import raw_upload
from tests.factories import make_task
from uploads import queue
from uploads.queue import Completion, Result

pytestmark = pytest.mark.django_db


def statements(ctx: CaptureQueriesContext) -> list[str]:
    """What reached the database, but the savepoints of the test's own transaction (outside a
    test they are BEGIN and COMMIT, which the drivers do not report)."""
    return [
        q["sql"] for q in ctx.captured_queries if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))
    ]


def postgresql() -> bool:
    return connection.vendor == "postgresql"


def test_an_accepted_upload_is_one_insert(api: APIClient) -> None:
    assert raw_upload(api).status_code == 202  # the token and grants are cached from here on
    with CaptureQueriesContext(connection) as ctx:
        assert raw_upload(api, x_file_path="/srv/app/second").status_code == 202
    sql = statements(ctx)
    if postgresql():
        assert len(sql) == 1 and sql[0].lstrip().startswith("INSERT INTO uploads_uploadtask")
    else:  # the access generation, then the task, in one IMMEDIATE transaction
        assert len(sql) == 2 and sql[1].startswith('INSERT INTO "uploads_uploadtask"')


def test_claiming_a_batch_costs_one_statement_on_postgresql(user: Any) -> None:
    for _ in range(5):
        make_task(user)
    with CaptureQueriesContext(connection) as ctx:
        claims = queue.claim(worker_id="w", limit=5)
    assert len(claims) == 5
    # SQLite: the generation, the ready ids, then per task its update, read-back and attempt.
    assert len(statements(ctx)) == (1 if postgresql() else 2 + 5 * 3)


def test_completing_a_batch_costs_one_statement_on_postgresql(user: Any) -> None:
    for _ in range(5):
        make_task(user)  # each with a spool file, which a success may free
    claims = queue.claim(worker_id="w", limit=5)
    results = [
        Result.SUCCEEDED,
        Result.SUCCEEDED,
        Result.TRANSIENT,
        Result.PERMANENT,
        Result.RELEASED,
    ]
    done = [Completion(c, r, "error") for c, r in zip(claims, results, strict=True)]
    with CaptureQueriesContext(connection) as ctx:
        statuses = queue.complete(done)
    assert sorted(str(s) for s in statuses.values()) == [
        "failed",
        "pending",
        "pending",
        "succeeded",
        "succeeded",
    ]
    # SQLite: per task its update and its attempt's, then which files nobody needs.
    assert len(statements(ctx)) == (1 if postgresql() else 5 * 2 + 1)


def test_an_accepted_fanout_is_one_insert(api: APIClient) -> None:
    assert raw_upload(api).status_code == 202  # the token and grants are cached from here on
    with CaptureQueriesContext(connection) as ctx:
        response = raw_upload(api, x_container_name="web1,web2,web3")
    assert response.status_code == 202 and response.json()["count"] == 3
    sql = statements(ctx)
    if postgresql():  # the batch and its tasks together; then the batch's tasks for the answer
        assert len(sql) == 2 and sql[0].lstrip().startswith("WITH batch AS (")
    else:  # the generation, the batch, its tasks in one INSERT; then the answer's read
        assert len(sql) == 4 and sql[2].startswith('INSERT INTO "uploads_uploadtask"')
