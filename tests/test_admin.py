"""The operators' admin through Django's test client: lists, search, summary, retry and cancel."""

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from tests.conftest import spool_files
from tests.factories import make_batch, make_task
from uploads import queue, services
from uploads.models import AuditEvent, Outcome, Status, UploadAttempt, UploadTask
from uploads.queue import Completion, Result

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:uploads_uploadtask_changelist")
ERROR = "instance 'web9' not found in project 'default'"


def change_url(task: UploadTask) -> str:
    return reverse("admin:uploads_uploadtask_change", args=[task.pk])


def retry_url(task: UploadTask) -> str:
    return reverse("admin:uploads_uploadtask_retry", args=[task.pk])


def set_state(task: UploadTask, **fields: Any) -> UploadTask:
    UploadTask.objects.filter(pk=task.pk).update(**fields)
    task.refresh_from_db()
    return task


def failed(owner: Any, **fields: Any) -> UploadTask:
    return set_state(make_task(owner, **fields), status=Status.FAILED, last_error=ERROR)


def texts(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def listed(response: Any) -> set[Any]:
    return {task.pk for task in response.context["cl"].result_list}


def run_action(client: Client, action: str, tasks: list[UploadTask]) -> Any:
    data = {"action": action, ACTION_CHECKBOX_NAME: [str(t.pk) for t in tasks]}
    return client.post(CHANGELIST, data, follow=True)


def fail_one_attempt(error: str) -> None:
    """Push the ready tasks once, the way a worker does, and fail them for good."""
    claims = queue.claim(worker_id="worker-a", limit=10)
    queue.complete([Completion(claim, Result.PERMANENT, error) for claim in claims])


@pytest.fixture
def viewer(staff_user: Any) -> Client:
    """A staff operator who may only look at uploads."""
    staff_user.user_permissions.add(
        Permission.objects.get(codename="view_uploadtask", content_type__app_label="uploads")
    )
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def operator(staff_user: Any) -> Client:
    """A staff operator with view and change (and delete) permissions, but no superuser."""
    staff_user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="uploads",
            codename__in=["view_uploadtask", "change_uploadtask", "delete_uploadtask"],
        )
    )
    client = Client()
    client.force_login(staff_user)
    return client


class TestChangelist:
    def test_row_shows_the_task_at_a_glance(self, admin_client: Client, user: Any) -> None:
        long_error = "push failed: " + "x" * 200
        task = make_task(user, content=b"z" * 2048, instance="web1", project="staging")
        set_state(task, status=Status.FAILED, last_error=long_error, attempts=2)
        response = admin_client.get(CHANGELIST)
        assert response.status_code == 200
        html = response.content.decode()
        assert str(task.pk)[:8] in html
        assert str(task.pk) not in re.sub(r'href="[^"]*"|value="[^"]*"', "", html)
        assert "staging/web1" in html
        assert "/srv/app/file.txt" in html
        assert "2.0\xa0KB" in html
        assert '<span class="upload-status upload-status-failed">Failed</span>' in html
        assert "2 / 5" in html
        assert long_error[:79] + "…" in html
        assert f'title="{long_error}"' in html

    @pytest.mark.parametrize(
        ("target", "shown"),
        [
            ({}, "web1"),
            ({"project": "staging"}, "staging/web1"),
            ({"remote": "prod"}, "prod:web1"),
            ({"remote": "prod", "project": "staging"}, "prod:staging/web1"),
        ],
    )
    def test_instance_column_names_project_and_remote_when_not_default(
        self, admin_client: Client, user: Any, target: dict[str, str], shown: str
    ) -> None:
        make_task(user, instance="web1", **target)
        html = admin_client.get(CHANGELIST).content.decode()
        assert f'<td class="field-instance_display">{shown}</td>' in html

    def test_error_text_is_escaped(self, admin_client: Client, user: Any) -> None:
        failed(user)
        UploadTask.objects.update(last_error='<script>alert("x")</script>')
        html = admin_client.get(CHANGELIST).content.decode()
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html

    def test_newest_first(self, admin_client: Client, user: Any) -> None:
        old = make_task(user)
        new = make_task(user)
        set_state(old, created_at=new.created_at.replace(year=2020))
        rows = list(admin_client.get(CHANGELIST).context["cl"].result_list)
        assert [t.pk for t in rows] == [new.pk, old.pk]

    def test_filters_by_status(self, admin_client: Client, user: Any) -> None:
        bad = failed(user)
        make_task(user)
        response = admin_client.get(CHANGELIST, {"status__exact": "failed"})
        assert listed(response) == {bad.pk}

    def test_filters_by_instance_project_and_owner(
        self, admin_client: Client, user: Any, other_user: Any
    ) -> None:
        web1 = make_task(user, instance="web1")
        web2 = make_task(other_user, instance="web2", project="staging")
        assert listed(admin_client.get(CHANGELIST, {"instance": "web2"})) == {web2.pk}
        assert listed(admin_client.get(CHANGELIST, {"project": "default"})) == {web1.pk}
        response = admin_client.get(CHANGELIST, {"owner__id__exact": other_user.pk})
        assert listed(response) == {web2.pk}
        prod = make_task(user, remote="prod")
        assert listed(admin_client.get(CHANGELIST, {"remote": "prod"})) == {prod.pk}

    def test_search_by_instance_path_and_error(self, admin_client: Client, user: Any) -> None:
        web1 = make_task(user, instance="web1")
        web2 = failed(user, instance="web2", path="/etc/motd")
        assert listed(admin_client.get(CHANGELIST, {"q": "web2"})) == {web2.pk}
        assert listed(admin_client.get(CHANGELIST, {"q": "motd"})) == {web2.pk}
        assert listed(admin_client.get(CHANGELIST, {"q": "not found"})) == {web2.pk}
        assert listed(admin_client.get(CHANGELIST, {"q": "web1"})) == {web1.pk}

    @pytest.mark.parametrize(
        "spell",
        [
            pytest.param(lambda pk: str(pk), id="full"),
            pytest.param(lambda pk: str(pk).upper(), id="upper"),
            pytest.param(lambda pk: pk.hex, id="bare-hex"),
            pytest.param(lambda pk: f" {pk} ", id="spaces"),
            pytest.param(lambda pk: str(pk)[:8], id="short-id"),
            pytest.param(lambda pk: str(pk)[:15], id="hyphenated-prefix"),
            pytest.param(lambda pk: pk.hex[:14], id="bare-prefix"),
        ],
    )
    def test_search_by_id(self, admin_client: Client, user: Any, spell: Any) -> None:
        tasks = [make_task(user) for _ in range(3)]
        wanted = tasks[1]
        response = admin_client.get(CHANGELIST, {"q": spell(wanted.pk)})
        assert response.status_code == 200
        assert listed(response) == {wanted.pk}

    @pytest.mark.parametrize(
        "term", ["not-a-uuid", "zz", "12345678-zzzz", "g" * 32, "0" * 40, "----", "ab", "'; --"]
    )
    def test_search_with_junk_finds_nothing_and_does_not_fail(
        self, admin_client: Client, user: Any, term: str
    ) -> None:
        make_task(user)
        response = admin_client.get(CHANGELIST, {"q": term})
        assert response.status_code == 200
        assert listed(response) == set()

    def test_search_by_id_keeps_the_active_filters(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        response = admin_client.get(CHANGELIST, {"q": str(task.pk), "status__exact": "failed"})
        assert listed(response) == set()

    def test_query_count_does_not_grow_with_rows(
        self, admin_client: Client, user: Any, other_user: Any, django_user_model: Any
    ) -> None:
        def queries() -> int:
            with CaptureQueriesContext(connection) as ctx:
                response = admin_client.get(CHANGELIST)
            assert response.status_code == 200
            return len(ctx.captured_queries)

        owners = [user, other_user]
        for i in range(3):
            failed(owners[i % 2], instance=f"web{i}")
        few = queries()
        owners += [django_user_model.objects.create_user(username=f"u{i}") for i in range(3)]
        for i in range(27):
            make_task(owners[i % len(owners)], instance=f"db{i}", project=f"p{i % 3}")
        fail_one_attempt("boom")
        assert UploadTask.objects.count() == 30
        assert queries() == few


class TestQueueSummary:
    def test_counts_oldest_pending_and_waiting(self, admin_client: Client, user: Any) -> None:
        oldest = make_task(user)
        set_state(oldest, created_at=timezone.now() - timedelta(hours=3, minutes=5, seconds=30))
        make_task(user)
        waiting = make_task(user)
        set_state(waiting, attempts=1, last_error="timeout")
        failed(user)
        failed(user)
        response = admin_client.get(CHANGELIST)
        summary = response.context["queue_summary"]
        assert summary["counts"][Status.PENDING] == 3
        assert summary["counts"][Status.FAILED] == 2
        assert summary["waiting_for_retry"] == 1
        html = response.content.decode()
        section = html[html.index('id="queue-summary"') : html.index("</section>")]
        assert re.search(r"queue-count-pending.*?<dd>3</dd>", section, re.S)
        assert re.search(r"queue-count-failed.*?<dd>2</dd>", section, re.S)
        assert re.search(r"queue-count-running.*?<dd>0</dd>", section, re.S)
        assert re.search(r"Oldest pending</dt>\s*<dd>3\xa0hours, 5\xa0minutes ago</dd>", section)
        assert re.search(r"Waiting for a retry</dt><dd>1</dd>", section)

    def test_empty_queue(self, admin_client: Client) -> None:
        html = admin_client.get(CHANGELIST).content.decode()
        assert re.search(r"Oldest pending</dt>\s*<dd>none</dd>", html)


class TestActions:
    def test_retry_selected_reports_retried_and_skipped(
        self, admin_client: Client, user: Any
    ) -> None:
        one = failed(user)
        two = set_state(make_task(user), status=Status.CANCELLED)
        pending = make_task(user)
        response = run_action(admin_client, "retry_selected", [one, two, pending])
        assert texts(response) == ["Retried 2 uploads; skipped 1 that was not failed or cancelled."]
        statuses = dict(UploadTask.objects.values_list("pk", "status"))
        assert statuses == {one.pk: "pending", two.pk: "pending", pending.pk: "pending"}

    def test_retry_selected_counts_missing_spool_files(
        self, admin_client: Client, user: Any, spool: Path
    ) -> None:
        kept = failed(user)
        gone = failed(user)
        (spool / gone.spool_name).unlink()
        succeeded = set_state(make_task(user), status=Status.SUCCEEDED)
        response = run_action(admin_client, "retry_selected", [kept, gone, succeeded])
        assert texts(response) == [
            "Retried 1 upload; skipped 1 that was not failed or cancelled; "
            "1 could not be retried because its file is gone (upload it again)."
        ]
        gone.refresh_from_db()
        kept.refresh_from_db()
        assert (kept.status, gone.status) == (Status.PENDING, Status.FAILED)

    def test_cancel_selected_cancels_pending_only(
        self, admin_client: Client, user: Any, spool: Path
    ) -> None:
        first = make_task(user)
        second = make_task(user)
        bad = failed(user)
        response = run_action(admin_client, "cancel_selected", [first, second, bad])
        assert texts(response) == ["Cancelled 2 uploads; skipped 1 that was not pending."]
        statuses = dict(UploadTask.objects.values_list("pk", "status"))
        assert statuses == {first.pk: "cancelled", second.pk: "cancelled", bad.pk: "failed"}
        # Kept until purge, so that each can still be retried.
        assert spool_files(spool) == sorted(t.spool_name for t in (first, second, bad))

    def test_retry_selected_counts_owners_without_a_grant(
        self, admin_client: Client, user: Any, django_user_model: Any
    ) -> None:
        granted = failed(user)
        ungranted = failed(django_user_model.objects.create_user(username="carol"))
        response = run_action(admin_client, "retry_selected", [granted, ungranted])
        assert texts(response) == [
            "Retried 1 upload; 1 was refused because its owner may no longer write there."
        ]
        ungranted.refresh_from_db()
        assert ungranted.status == Status.FAILED

    def test_actions_are_in_the_task_history(self, admin_client: Client, user: Any) -> None:
        retried = failed(user)
        cancelled = make_task(user)
        run_action(admin_client, "retry_selected", [retried])
        run_action(admin_client, "cancel_selected", [cancelled])
        for task, message in [
            (retried, "Retried from the admin."),
            (cancelled, "Cancelled from the admin."),
        ]:
            url = reverse("admin:uploads_uploadtask_history", args=[task.pk])
            assert message in admin_client.get(url).content.decode()

    def test_nothing_done_is_an_error(self, admin_client: Client, user: Any) -> None:
        done = set_state(make_task(user), status=Status.SUCCEEDED)
        response = run_action(admin_client, "cancel_selected", [done])
        [message] = list(get_messages(response.wsgi_request))
        assert str(message) == "Cancelled 0 uploads; skipped 1 that was not pending."
        assert message.level_tag == "error"

    def test_operator_with_change_permission_has_the_actions(
        self, operator: Client, user: Any
    ) -> None:
        task = failed(user)
        choices = dict(operator.get(CHANGELIST).context["action_form"].fields["action"].choices)
        assert set(choices) == {"", "retry_selected", "cancel_selected"}
        run_action(operator, "retry_selected", [task])
        task.refresh_from_db()
        assert task.status == Status.PENDING


class TestRetryButton:
    def test_failed_task_has_a_working_retry_button(self, admin_client: Client, user: Any) -> None:
        task = failed(user)
        html = admin_client.get(change_url(task)).content.decode()
        assert f'<form method="post" action="{retry_url(task)}">' in html
        response = admin_client.post(retry_url(task))
        assert response.status_code == 302
        assert response["Location"] == change_url(task)
        page = admin_client.get(response["Location"])
        assert texts(page) == ["The upload is queued again."]
        task.refresh_from_db()
        assert task.status == Status.PENDING
        assert retry_url(task) not in page.content.decode()

    def test_cancelled_task_has_the_button(self, admin_client: Client, user: Any) -> None:
        task = set_state(make_task(user), status=Status.CANCELLED)
        assert retry_url(task) in admin_client.get(change_url(task)).content.decode()

    @pytest.mark.parametrize("status", [Status.PENDING, Status.SUCCEEDED])
    def test_no_button_for_a_task_that_cannot_be_retried(
        self, admin_client: Client, user: Any, status: Status
    ) -> None:
        task = set_state(make_task(user), status=status)
        assert retry_url(task) not in admin_client.get(change_url(task)).content.decode()

    def test_retrying_a_pending_task_shows_the_error(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        response = admin_client.post(retry_url(task), follow=True)
        assert texts(response) == [
            "Not retried: only failed or cancelled uploads can be retried (this one is pending)"
        ]

    def test_missing_spool_file_hides_the_button_and_retry_says_why(
        self, admin_client: Client, user: Any, spool: Path
    ) -> None:
        task = failed(user)
        (spool / task.spool_name).unlink()
        html = admin_client.get(change_url(task)).content.decode()
        assert retry_url(task) not in html
        assert "no: the file is gone, so this upload cannot be retried" in html
        response = admin_client.post(retry_url(task), follow=True)
        assert texts(response) == [
            "Not retried: the uploaded file is no longer on the server; upload it again"
        ]
        task.refresh_from_db()
        assert task.status == Status.FAILED

    def test_owner_without_a_grant_is_refused(
        self, admin_client: Client, django_user_model: Any
    ) -> None:
        task = failed(django_user_model.objects.create_user(username="carol"), instance="db1")
        response = admin_client.post(retry_url(task), follow=True)
        [message] = texts(response)
        assert message.startswith("Not retried: you have no grant for instance 'db1'")
        task.refresh_from_db()
        assert task.status == Status.FAILED

    def test_get_is_not_allowed(self, admin_client: Client, user: Any) -> None:
        task = failed(user)
        assert admin_client.get(retry_url(task)).status_code == 405
        task.refresh_from_db()
        assert task.status == Status.FAILED

    def test_post_without_csrf_token_is_refused(self, django_user_model: Any, user: Any) -> None:
        task = failed(user)
        client = Client(enforce_csrf_checks=True)
        client.force_login(django_user_model.objects.create_superuser("root", password="pw-root"))
        assert client.post(retry_url(task)).status_code == 403
        task.refresh_from_db()
        assert task.status == Status.FAILED

    def test_unknown_or_malformed_id_is_404(self, admin_client: Client) -> None:
        unknown = "00000000-0000-0000-0000-000000000000"
        assert admin_client.post(f"{CHANGELIST}{unknown}/retry/").status_code == 404
        assert admin_client.post(f"{CHANGELIST}not-an-id/retry/").status_code == 404


def audit_trail() -> list[tuple[str, str, Any, str, str | None, dict[str, Any]]]:
    """What operators did; the uploads that made the tasks are audited too, and left out here."""
    return [
        (e.action, e.outcome, e.task_id, e.username, e.source, e.detail)
        for e in AuditEvent.objects.exclude(action="upload").order_by("at", "pk")
    ]


class TestAudit:
    """Every retry and cancel an operator makes here is in the audit trail, one event a task."""

    def test_retry_button(self, admin_client: Client, user: Any) -> None:
        task = failed(user)
        admin_client.post(retry_url(task))
        assert audit_trail() == [
            ("retry", "done", task.pk, "admin", "127.0.0.1", {"via": "admin"}),
        ]

    def test_refused_retry_button_says_why(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        admin_client.post(retry_url(task))
        reason = "only failed or cancelled uploads can be retried (this one is pending)"
        assert audit_trail() == [
            ("retry", "refused", task.pk, "admin", "127.0.0.1", {"via": "admin", "reason": reason}),
        ]

    def test_retry_action(
        self, admin_client: Client, user: Any, spool: Path, django_user_model: Any
    ) -> None:
        retried = failed(user)
        pending = make_task(user)
        gone = failed(user)
        (spool / gone.spool_name).unlink()
        ungranted = failed(django_user_model.objects.create_user(username="carol"))
        run_action(admin_client, "retry_selected", [retried, pending, gone, ungranted])
        events = {e[2]: e for e in audit_trail()}
        assert len(events) == 4
        assert events[retried.pk][:2] == ("retry", "done")
        for task in (pending, gone, ungranted):
            action, outcome, _, username, source, detail = events[task.pk]
            assert (action, outcome, username, source) == ("retry", "refused", "admin", "127.0.0.1")
            assert detail["via"] == "admin"
        assert "file is no longer on the server" in events[gone.pk][5]["reason"]
        assert "no grant" in events[ungranted.pk][5]["reason"]

    def test_cancel_action(self, admin_client: Client, user: Any) -> None:
        pending = make_task(user)
        done = set_state(make_task(user), status=Status.SUCCEEDED)
        run_action(admin_client, "cancel_selected", [pending, done])
        events = {e[2]: e[:2] for e in audit_trail()}
        assert events == {pending.pk: ("cancel", "done"), done.pk: ("cancel", "refused")}

    def test_nothing_is_recorded_without_permission(self, viewer: Client, user: Any) -> None:
        task = failed(user)
        assert viewer.post(retry_url(task)).status_code == 403
        run_action(viewer, "cancel_selected", [make_task(user)])
        assert audit_trail() == []


class TestViewOnlyStaff:
    def test_sees_the_list_without_actions(self, viewer: Client, user: Any) -> None:
        failed(user)
        response = viewer.get(CHANGELIST)
        assert response.status_code == 200
        assert response.context["action_form"] is None
        assert 'name="action"' not in response.content.decode()
        assert "queue-summary" in response.content.decode()

    def test_sees_the_change_page_without_retry_button(self, viewer: Client, user: Any) -> None:
        task = failed(user)
        response = viewer.get(change_url(task))
        assert response.status_code == 200
        html = response.content.decode()
        assert retry_url(task) not in html
        assert escape(ERROR) in html
        assert "Retry" not in html

    def test_cannot_retry_or_run_actions(self, viewer: Client, user: Any) -> None:
        task = failed(user)
        assert viewer.post(retry_url(task)).status_code == 403
        run_action(viewer, "retry_selected", [task])
        task.refresh_from_db()
        assert task.status == Status.FAILED

    def test_sees_the_attempts(self, viewer: Client, user: Any) -> None:
        task = make_task(user)
        fail_one_attempt("connection refused")
        assert "connection refused" in viewer.get(change_url(task)).content.decode()


class TestChangePage:
    def test_everything_is_read_only(self, admin_client: Client, user: Any) -> None:
        task = failed(user)
        html = admin_client.get(change_url(task)).content.decode()
        inputs = re.findall(r'<(?:input|select|textarea)[^>]*name="([^"]+)"', html)
        assert {name for name in inputs if not name.startswith("attempt_log-")} == {
            "csrfmiddlewaretoken"
        }
        assert 'name="_save"' not in html
        assert 'name="_continue"' not in html

    def test_posting_the_form_changes_nothing(self, admin_client: Client, user: Any) -> None:
        task = failed(user)
        response = admin_client.post(change_url(task), {"path": "/etc/shadow", "status": "pending"})
        assert response.status_code == 405
        task.refresh_from_db()
        assert (task.path, task.status) == ("/srv/app/file.txt", Status.FAILED)

    def test_shows_the_task(self, admin_client: Client, user: Any) -> None:
        task = make_task(user, mode=0o640, project="staging")
        html = admin_client.get(change_url(task)).content.decode()
        assert task.sha256 in html
        assert "0640" in html
        assert '<span class="upload-status upload-status-pending">Pending</span>' in html
        api = reverse("upload-detail", args=[task.pk])
        assert f'<a href="{api}">{api}</a>' in html

    def test_api_link_answers_with_the_task(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        response = admin_client.get(
            reverse("upload-detail", args=[task.pk]), HTTP_ACCEPT="application/json"
        )
        assert response.json()["id"] == str(task.pk)

    def test_shows_whether_the_uploaded_file_is_kept(
        self, admin_client: Client, user: Any, spool: Path
    ) -> None:
        task = make_task(user)
        field = re.compile(r'Uploaded file kept:</label>\s*<div class="readonly">([^<]*)</div>')
        assert field.search(admin_client.get(change_url(task)).content.decode())[1] == "yes"
        (spool / task.spool_name).unlink()
        assert field.search(admin_client.get(change_url(task)).content.decode())[1] == "no"

    def test_attempts_inline(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        fail_one_attempt("instance 'web1' is stopped")
        task.refresh_from_db()
        services.upload_retry(task=task)
        fail_one_attempt("instance 'web1' not found")
        assert list(task.attempt_log.values_list("number", "outcome")) == [
            (1, Outcome.FAILED),
            (2, Outcome.FAILED),
        ]
        html = admin_client.get(change_url(task)).content.decode()
        assert 'id="attempt_log-group"' in html
        rows = re.findall(r'<tr class="form-row[^"]*"[^>]*>(.*?)</tr>', html, re.S)
        assert len(rows) == 2
        assert "worker-a" in rows[0]
        assert "instance &#x27;web1&#x27; is stopped" in rows[0]
        assert "instance &#x27;web1&#x27; not found" in rows[1]
        assert all(re.search(r"\d+\.\d s", row) for row in rows)
        assert "attempt_log-empty" not in html  # the blank row the admin's JS clones to add one

    def test_unset_values_show_as_empty_not_none(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        queue.claim(worker_id="worker-a", limit=1)  # a running attempt: no duration yet
        html = admin_client.get(change_url(task)).content.decode()
        assert re.search(r'<td class="field-duration_display">\s*<p>-</p>\s*</td>', html)
        assert re.search(r'Mode:</label>\s*<div class="readonly">-</div>', html)
        assert ">None<" not in html

    def test_cannot_add(self, admin_client: Client) -> None:
        assert admin_client.get(reverse("admin:uploads_uploadtask_add")).status_code == 403


class TestDelete:
    def test_superuser_deletes_task_and_spool_file(
        self,
        admin_client: Client,
        user: Any,
        spool: Path,
        django_capture_on_commit_callbacks: Any,
    ) -> None:
        task = failed(user)
        other = make_task(user)
        url = reverse("admin:uploads_uploadtask_delete", args=[task.pk])
        with django_capture_on_commit_callbacks(execute=True):
            response = admin_client.post(url, {"post": "yes"})
        assert response.status_code == 302
        assert list(UploadTask.objects.all()) == [other]
        assert spool_files(spool) == [other.spool_name]

    def test_delete_selected_removes_spool_files(
        self,
        admin_client: Client,
        user: Any,
        spool: Path,
        django_capture_on_commit_callbacks: Any,
    ) -> None:
        tasks = [failed(user), make_task(user)]
        kept = make_task(user)
        data = {
            "action": "delete_selected",
            "post": "yes",
            ACTION_CHECKBOX_NAME: [str(t.pk) for t in tasks],
        }
        with django_capture_on_commit_callbacks(execute=True):
            admin_client.post(CHANGELIST, data)
        assert list(UploadTask.objects.all()) == [kept]
        assert spool_files(spool) == [kept.spool_name]

    def test_staff_with_delete_permission_still_cannot(
        self, operator: Client, user: Any, spool: Path
    ) -> None:
        task = failed(user)
        url = reverse("admin:uploads_uploadtask_delete", args=[task.pk])
        assert operator.post(url, {"post": "yes"}).status_code == 403
        assert UploadTask.objects.filter(pk=task.pk).exists()
        assert spool_files(spool) == [task.spool_name]


class TestAttemptAdmin:
    def test_lists_attempts_and_filters_by_outcome(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        fail_one_attempt("boom")
        make_task(user)
        claims = queue.claim(worker_id="worker-b", limit=10)
        queue.complete([Completion(claim, Result.SUCCEEDED) for claim in claims])
        url = reverse("admin:uploads_uploadattempt_changelist")
        response = admin_client.get(url, {"outcome__exact": Outcome.FAILED})
        assert response.status_code == 200
        [attempt] = response.context["cl"].result_list
        assert (attempt.task_id, attempt.worker_id) == (task.pk, "worker-a")
        assert change_url(task) in response.content.decode()

    def test_is_read_only(self, admin_client: Client, user: Any) -> None:
        make_task(user)
        fail_one_attempt("boom")
        attempt = UploadAttempt.objects.get()
        assert admin_client.get(reverse("admin:uploads_uploadattempt_add")).status_code == 403
        url = reverse("admin:uploads_uploadattempt_change", args=[attempt.pk])
        assert 'name="_save"' not in admin_client.get(url).content.decode()
        assert admin_client.post(url, {"error": "changed"}).status_code == 403
        attempt.refresh_from_db()
        assert attempt.error == "boom"


class TestBatches:
    def test_each_task_links_to_its_batch_whose_tasks_a_filter_lists_and_retries(
        self, admin_client: Client, user: Any, spool: Path
    ) -> None:
        batch = make_batch(user, ["web1", "web2", "web3"])
        alone = failed(user)
        tasks = {t.instance: t for t in UploadTask.objects.filter(batch=batch)}
        for name in ("web1", "web2"):
            set_state(tasks[name], status=Status.FAILED, last_error=ERROR)
        set_state(tasks["web3"], status=Status.SUCCEEDED)
        page = admin_client.get(CHANGELIST)
        link = f'<a href="{CHANGELIST}?batch={batch.pk}" title="{batch.pk}">{str(batch.pk)[:8]}</a>'
        assert page.content.decode().count(link) == 3
        assert f"{str(batch.pk)[:8]} web1,web2,web3 (3)" in page.content.decode()  # a choice
        filtered = admin_client.get(f"{CHANGELIST}?batch={batch.pk}")
        assert listed(filtered) == {t.pk for t in tasks.values()}
        assert listed(admin_client.get(f"{CHANGELIST}?batch=junk")) == set()
        assert alone.pk in listed(page)
        assert link in admin_client.get(change_url(tasks["web1"])).content.decode()
        response = run_action(admin_client, "retry_selected", list(tasks.values()))
        assert texts(response) == ["Retried 2 uploads; skipped 1 that was not failed or cancelled."]
        statuses = dict(UploadTask.objects.filter(batch=batch).values_list("instance", "status"))
        assert statuses == {"web1": "pending", "web2": "pending", "web3": "succeeded"}
        assert len(spool_files(spool)) == 2  # the batch's one body, and the other upload's
