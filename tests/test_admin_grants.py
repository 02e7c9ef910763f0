"""The admin for grants, the audit trail and worker heartbeats, through Django's test client."""

import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from tests.factories import make_task
from uploads import services
from uploads.models import AuditEvent, Grant, WorkerHeartbeat

pytestmark = pytest.mark.django_db

GRANTS = reverse("admin:uploads_grant_changelist")
GRANT_ADD = reverse("admin:uploads_grant_add")
AUDIT = reverse("admin:uploads_auditevent_changelist")
HEARTBEATS = reverse("admin:uploads_workerheartbeat_changelist")


def listed(response: Any) -> set[Any]:
    assert response.status_code == 200
    return {row.pk for row in response.context["cl"].result_list}


def query_count(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries)


def body_rows(response: Any) -> list[str]:
    """The changelist's result rows, as HTML."""
    html = response.content.decode()
    body = html[html.index("<tbody>") : html.index("</tbody>")]
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)


def form_errors(response: Any) -> list[str]:
    assert response.status_code == 200, "the form was accepted"
    form = response.context["adminform"].form
    return [str(e) for errors in form.errors.values() for e in errors]


def grant_data(**fields: Any) -> dict[str, Any]:
    data = {
        "user": "",
        "group": "",
        "remote": "local",
        "project": "default",
        "instance_glob": "web*",
        "path_prefixes": "",
        "owners": "",
        "max_size": "",
        "_save": "Save",
    }
    data.update({k: "" if v is None else v for k, v in fields.items()})
    return data


def grant_events() -> list[tuple[str, str]]:
    return list(
        AuditEvent.objects.filter(action="grant")
        .order_by("at", "pk")
        .values_list("outcome", "username")
    )


@pytest.fixture
def carol(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user(username="carol", password="pw-carol-123")


@pytest.fixture
def deployers() -> Group:
    return Group.objects.create(name="deployers")


def staff_client(user: Any, *codenames: str) -> Client:
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="uploads", codename__in=codenames)
    )
    client = Client()
    client.force_login(user)
    return client


# --- grants ----------------------------------------------------------------------------------


class TestGrantList:
    def test_row_shows_the_grant(self, admin_client: Client, carol: Any, deployers: Group) -> None:
        Grant.objects.create(
            user=carol,
            instance_glob="ci-*",
            project="staging",
            remote="prod",
            path_prefixes=["/srv/app", "/var/www"],
            max_size=5 * 1024**2,
        )
        Grant.objects.create(group=deployers, instance_glob="web1")
        rows = body_rows(admin_client.get(GRANTS))
        carols = next(row for row in rows if "ci-*" in row)
        assert ">carol<" in carols
        assert '<td class="field-remote">prod</td>' in carols
        assert '<td class="field-project">staging</td>' in carols
        assert "/srv/app, /var/www" in carols
        assert "5.0\xa0MB" in carols
        groups = next(row for row in rows if "web1" in row)
        assert ">@deployers<" in groups
        assert "any path" in groups
        assert "no limit" in groups

    def test_filters_and_search(
        self, admin_client: Client, user: Any, carol: Any, deployers: Group
    ) -> None:
        alice_all = Grant.objects.get(user=user)
        carols = Grant.objects.create(user=carol, instance_glob="ci-*", remote="prod")
        group = Grant.objects.create(group=deployers, instance_glob="web1", project="staging")
        assert listed(admin_client.get(GRANTS, {"remote": "prod"})) == {carols.pk}
        assert listed(admin_client.get(GRANTS, {"project": "staging"})) == {group.pk}
        assert listed(admin_client.get(GRANTS, {"q": "carol"})) == {carols.pk}
        assert listed(admin_client.get(GRANTS, {"q": "deploy"})) == {group.pk}
        assert listed(admin_client.get(GRANTS, {"q": "ci-"})) == {carols.pk}
        assert listed(admin_client.get(GRANTS, {"q": "alice"})) == {alice_all.pk}

    def test_query_count_does_not_grow_with_rows(
        self, admin_client: Client, django_user_model: Any
    ) -> None:
        def add(i: int) -> None:
            who = django_user_model.objects.create_user(username=f"u{i}")
            group = Group.objects.create(name=f"g{i}")
            Grant.objects.create(user=who, instance_glob=f"a{i}", remote=f"r{i % 3}")
            Grant.objects.create(group=group, instance_glob=f"b{i}", project=f"p{i % 4}")

        add(0)
        few = query_count(admin_client, GRANTS)
        for i in range(1, 20):
            add(i)
        assert Grant.objects.count() == 40
        assert query_count(admin_client, GRANTS) == few


class TestGrantAdd:
    def test_creates_the_grant_and_audits_it(self, admin_client: Client, carol: Any) -> None:
        response = admin_client.post(
            GRANT_ADD,
            grant_data(
                user=carol.pk,
                instance_glob="ci-*",
                path_prefixes="/srv/app/\r\n\r\n  /var//www/./html  \r\n/srv/app\r\n",
                max_size=1024,
            ),
        )
        assert response.status_code == 302, form_errors(response)
        grant = Grant.objects.get(user=carol)
        assert (grant.instance_glob, grant.path_prefixes, grant.max_size) == (
            "ci-*",
            ["/srv/app", "/var/www/html"],
            1024,
        )
        event = AuditEvent.objects.get(action="grant")
        assert (event.outcome, event.username, event.source) == ("created", "admin", "127.0.0.1")
        assert event.detail == {"grant": str(grant), "grant_id": grant.pk}

    def test_a_group_grant(self, admin_client: Client, deployers: Group) -> None:
        response = admin_client.post(GRANT_ADD, grant_data(group=deployers.pk))
        assert response.status_code == 302, form_errors(response)
        grant = Grant.objects.get(group=deployers)
        assert grant.user is None
        assert grant.path_prefixes == []
        assert grant_events() == [("created", "admin")]

    def test_owners_are_listed_on_one_line(self, admin_client: Client, carol: Any) -> None:
        response = admin_client.post(
            GRANT_ADD, grant_data(user=carol.pk, owners="1000:1000, 33  0033,1000:1000")
        )
        assert response.status_code == 302, form_errors(response)
        assert Grant.objects.get(user=carol).owners == ["1000:1000", "33"]
        assert "1000:1000, 33" in admin_client.get(GRANTS).content.decode()

    def test_a_malformed_owner_is_refused(self, admin_client: Client, carol: Any) -> None:
        response = admin_client.post(GRANT_ADD, grant_data(user=carol.pk, owners="www-data, 1:"))
        assert form_errors(response) == [
            "'www-data' is not an owner: give UID or UID:GID (numbers up to 4294967295), "
            "or * for any",
            "'1:' is not an owner: give UID or UID:GID (numbers up to 4294967295), or * for any",
        ]
        assert not Grant.objects.exists()

    def test_root_stays_root(self, admin_client: Client, carol: Any) -> None:
        admin_client.post(GRANT_ADD, grant_data(user=carol.pk, path_prefixes="/\n//"))
        assert Grant.objects.get(user=carol).path_prefixes == ["/"]

    @pytest.mark.parametrize(
        ("who", "message"),
        [
            ("both", "Choose a user or a group, not both."),
            ("neither", "Choose a user or a group."),
        ],
    )
    def test_exactly_one_of_user_and_group(
        self, admin_client: Client, carol: Any, deployers: Group, who: str, message: str
    ) -> None:
        fields = {"user": carol.pk, "group": deployers.pk} if who == "both" else {}
        response = admin_client.post(GRANT_ADD, grant_data(**fields))
        assert form_errors(response) == [message]
        assert "Constraint" not in response.content.decode()
        assert not Grant.objects.filter(instance_glob="web*").exists()
        assert not AuditEvent.objects.exists()

    @pytest.mark.parametrize(
        ("prefixes", "message"),
        [
            ("srv/app", "“srv/app” is not an absolute path: start it with /."),
            ("/srv/app\n~/x", "“~/x” is not an absolute path: start it with /."),
            ("/srv/../etc", "“/srv/../etc” contains “..”: name the directory itself."),
            ("/srv/app/..", "“/srv/app/..” contains “..”: name the directory itself."),
        ],
    )
    def test_path_prefixes_must_be_absolute_without_parent_steps(
        self, admin_client: Client, carol: Any, prefixes: str, message: str
    ) -> None:
        response = admin_client.post(GRANT_ADD, grant_data(user=carol.pk, path_prefixes=prefixes))
        assert form_errors(response) == [message]
        assert not Grant.objects.filter(user=carol).exists()
        assert not AuditEvent.objects.exists()

    def test_every_bad_line_is_reported_and_the_text_kept(
        self, admin_client: Client, carol: Any
    ) -> None:
        text = "/srv/ok\nrelative\n/a/../b"
        response = admin_client.post(GRANT_ADD, grant_data(user=carol.pk, path_prefixes=text))
        assert len(form_errors(response)) == 2
        assert re.search(
            r'<textarea name="path_prefixes"[^>]*>\s*/srv/ok\s+relative\s+/a/\.\./b<',
            response.content.decode(),
        )

    def test_a_name_like_dots_is_not_a_parent_step(self, admin_client: Client, carol: Any) -> None:
        admin_client.post(GRANT_ADD, grant_data(user=carol.pk, path_prefixes="/srv/..hidden"))
        assert Grant.objects.get(user=carol).path_prefixes == ["/srv/..hidden"]

    @pytest.mark.parametrize("glob", ["", "   "])
    def test_instance_glob_is_required(self, admin_client: Client, carol: Any, glob: str) -> None:
        response = admin_client.post(GRANT_ADD, grant_data(user=carol.pk, instance_glob=glob))
        assert form_errors(response) == ["This field is required."]
        assert not Grant.objects.filter(user=carol).exists()

    def test_staff_needs_the_add_permission(self, staff_user: Any, carol: Any) -> None:
        viewer = staff_client(staff_user, "view_grant")
        assert viewer.get(GRANTS).status_code == 200
        assert viewer.post(GRANT_ADD, grant_data(user=carol.pk)).status_code == 403
        assert not Grant.objects.filter(user=carol).exists()
        adder = staff_client(staff_user, "add_grant")
        assert adder.post(GRANT_ADD, grant_data(user=carol.pk)).status_code == 302
        assert AuditEvent.objects.get().username == "operator"


class TestGrantChange:
    def test_shows_one_prefix_a_line(self, admin_client: Client, carol: Any) -> None:
        grant = Grant.objects.create(
            user=carol, instance_glob="web1", path_prefixes=["/srv/app", "/var/www"]
        )
        html = admin_client.get(reverse("admin:uploads_grant_change", args=[grant.pk])).content
        assert re.search(
            r'<textarea name="path_prefixes"[^>]*>\s*/srv/app\n/var/www</textarea>', html.decode()
        )

    def test_change_is_audited_with_what_it_was(self, admin_client: Client, carol: Any) -> None:
        grant = Grant.objects.create(user=carol, instance_glob="web1", path_prefixes=["/srv/app"])
        before = str(grant)
        url = reverse("admin:uploads_grant_change", args=[grant.pk])
        data = grant_data(user=carol.pk, instance_glob="web1", path_prefixes="/srv/app\n/tmp/")
        response = admin_client.post(url, data)
        assert response.status_code == 302, form_errors(response)
        grant.refresh_from_db()
        assert grant.path_prefixes == ["/srv/app", "/tmp"]
        event = AuditEvent.objects.get(action="grant")
        assert (event.outcome, event.username, event.source) == ("changed", "admin", "127.0.0.1")
        assert event.detail == {
            "grant": str(grant),
            "grant_id": grant.pk,
            "previous": before,
            "changed": ["path_prefixes"],
        }

    def test_saving_without_changes_is_not_an_event(self, admin_client: Client, carol: Any) -> None:
        grant = Grant.objects.create(user=carol, instance_glob="web1", path_prefixes=["/srv/app"])
        url = reverse("admin:uploads_grant_change", args=[grant.pk])
        response = admin_client.post(
            url, grant_data(user=carol.pk, instance_glob="web1", path_prefixes="/srv/app/")
        )
        assert response.status_code == 302, form_errors(response)
        assert not AuditEvent.objects.exists()

    def test_switching_to_both_is_refused(
        self, admin_client: Client, carol: Any, deployers: Group
    ) -> None:
        grant = Grant.objects.create(user=carol, instance_glob="web1")
        url = reverse("admin:uploads_grant_change", args=[grant.pk])
        data = grant_data(user=carol.pk, group=deployers.pk, instance_glob="web1")
        assert form_errors(admin_client.post(url, data)) == ["Choose a user or a group, not both."]
        grant.refresh_from_db()
        assert grant.group is None
        assert not AuditEvent.objects.exists()


class TestGrantDelete:
    def test_delete_is_audited_as_revoked(self, admin_client: Client, carol: Any) -> None:
        grant = Grant.objects.create(user=carol, instance_glob="web1")
        description, pk = str(grant), grant.pk
        url = reverse("admin:uploads_grant_delete", args=[grant.pk])
        assert admin_client.post(url, {"post": "yes"}).status_code == 302
        assert not Grant.objects.filter(pk=pk).exists()
        event = AuditEvent.objects.get(action="grant")
        assert (event.outcome, event.username) == ("revoked", "admin")
        assert event.detail == {"grant": description, "grant_id": pk}

    def test_delete_selected_audits_each(
        self, admin_client: Client, user: Any, carol: Any, deployers: Group
    ) -> None:
        gone = [
            Grant.objects.create(user=carol, instance_glob="web1"),
            Grant.objects.create(group=deployers, instance_glob="web2"),
        ]
        data = {
            "action": "delete_selected",
            "post": "yes",
            ACTION_CHECKBOX_NAME: [str(g.pk) for g in gone],
        }
        assert admin_client.post(GRANTS, data).status_code == 302
        assert list(Grant.objects.values_list("user", flat=True)) == [user.pk]
        events = AuditEvent.objects.filter(action="grant", outcome="revoked")
        assert sorted(e.detail["grant_id"] for e in events) == sorted(g.pk for g in gone)


# --- the audit trail -------------------------------------------------------------------------


class TestAuditList:
    def test_row_shows_the_event(self, admin_client: Client, user: Any) -> None:
        task = make_task(user)
        services.audit(
            action="retry",
            outcome="refused",
            user=user,
            source="10.0.0.7",
            task_id=task.pk,
            reason="<b>nope</b>",
            via="admin",
        )
        response = admin_client.get(AUDIT + "?action=retry")
        [cells] = body_rows(response)
        assert '<td class="field-username">alice</td>' in cells
        assert '<td class="field-action">retry</td>' in cells
        assert '<td class="field-outcome">refused</td>' in cells
        assert '<td class="field-source">10.0.0.7</td>' in cells
        change = reverse("admin:uploads_uploadtask_change", args=[task.pk])
        assert f'<a href="{change}" title="{task.pk}">{str(task.pk)[:8]}</a>' in cells
        assert (
            "{&quot;reason&quot;:&quot;&lt;b&gt;nope&lt;/b&gt;&quot;,&quot;via&quot;:&quot;admin&quot;}"
            in cells
        )
        assert "<b>nope" not in response.content.decode()

    def test_long_detail_is_cut_short(self, admin_client: Client) -> None:
        services.audit(action="upload", outcome="refused", reason="x" * 500)
        [row] = body_rows(admin_client.get(AUDIT))
        full = escape('{"reason":"' + "x" * 500 + '"}')
        shown = escape(('{"reason":"' + "x" * 500)[:99]) + "…"
        assert f'<code title="{full}">{shown}</code>' in row

    def test_a_purged_task_still_links(self, admin_client: Client) -> None:
        gone = uuid.uuid4()
        services.audit(action="cancel", outcome="done", task_id=gone)
        html = admin_client.get(AUDIT).content.decode()
        assert reverse("admin:uploads_uploadtask_change", args=[gone]) in html

    def test_filters_and_date_hierarchy(self, admin_client: Client, user: Any) -> None:
        upload = services.audit(action="upload", outcome="accepted", user=user)
        refused = services.audit(action="upload", outcome="refused", user=user)
        retry = services.audit(action="retry", outcome="done", user=user)
        AuditEvent.objects.filter(pk=retry.pk).update(at=timezone.now().replace(year=2020))
        assert listed(admin_client.get(AUDIT, {"action": "upload"})) == {upload.pk, refused.pk}
        assert listed(admin_client.get(AUDIT, {"outcome": "refused"})) == {refused.pk}
        assert listed(admin_client.get(AUDIT, {"at__year": 2020})) == {retry.pk}
        html = admin_client.get(AUDIT).content.decode()
        assert "?at__year=2020" in html  # the date hierarchy's links

    def test_search_by_user_and_source(self, admin_client: Client, user: Any, carol: Any) -> None:
        alice = services.audit(action="upload", outcome="accepted", user=user, source="10.1.2.3")
        carols = services.audit(action="upload", outcome="accepted", user=carol, source="::1")
        assert listed(admin_client.get(AUDIT, {"q": "alice"})) == {alice.pk}
        assert listed(admin_client.get(AUDIT, {"q": "10.1.2"})) == {alice.pk}
        assert listed(admin_client.get(AUDIT, {"q": "::1"})) == {carols.pk}

    @pytest.mark.parametrize(
        "spell",
        [
            pytest.param(lambda pk: str(pk), id="full"),
            pytest.param(lambda pk: str(pk).upper(), id="upper"),
            pytest.param(lambda pk: pk.hex, id="bare-hex"),
            pytest.param(lambda pk: str(pk)[:8], id="short-id"),
        ],
    )
    def test_search_by_task_id(self, admin_client: Client, spell: Any) -> None:
        ids = [uuid.uuid4() for _ in range(3)]
        events = [services.audit(action="cancel", outcome="done", task_id=i) for i in ids]
        services.audit(action="upload", outcome="refused")
        assert listed(admin_client.get(AUDIT, {"q": spell(ids[1])})) == {events[1].pk}

    @pytest.mark.parametrize("term", ["not-a-uuid", "g" * 32, "0" * 40, "'; --", "12345678-zzzz"])
    def test_search_with_junk_does_not_fail(self, admin_client: Client, term: str) -> None:
        services.audit(action="cancel", outcome="done", task_id=uuid.uuid4(), source="10.0.0.1")
        assert listed(admin_client.get(AUDIT, {"q": term})) == set()

    def test_query_count_does_not_grow_with_rows(
        self, admin_client: Client, user: Any, carol: Any
    ) -> None:
        def add(i: int) -> None:
            task = make_task(user if i % 2 else carol)
            services.audit(
                action=["upload", "retry", "cancel"][i % 3],
                outcome="done",
                user=user if i % 2 else carol,
                source=f"10.0.0.{i}",
                task_id=task.pk,
                n=i,
            )

        add(0)
        few = query_count(admin_client, AUDIT)
        for i in range(1, 30):
            add(i)
        assert query_count(admin_client, AUDIT) == few


class TestAuditIsReadOnly:
    def test_no_add(self, admin_client: Client) -> None:
        assert admin_client.get(reverse("admin:uploads_auditevent_add")).status_code == 403
        assert admin_client.post(reverse("admin:uploads_auditevent_add"), {}).status_code == 403
        assert not AuditEvent.objects.exists()
        assert (
            'href="/admin/uploads/auditevent/add/"' not in admin_client.get(AUDIT).content.decode()
        )

    def test_change_page_shows_but_does_not_save(self, admin_client: Client, user: Any) -> None:
        event = services.audit(
            action="cancel", outcome="done", user=user, source="10.0.0.1", via="admin"
        )
        url = reverse("admin:uploads_auditevent_change", args=[event.pk])
        html = admin_client.get(url).content.decode()
        assert 'name="_save"' not in html
        assert "&quot;via&quot;: &quot;admin&quot;" in html
        response = admin_client.post(
            url, {"action": "grant", "outcome": "created", "username": "x"}
        )
        assert response.status_code == 403
        event.refresh_from_db()
        assert (event.action, event.outcome, event.username) == ("cancel", "done", "alice")

    def test_no_delete_even_for_superusers(self, admin_client: Client) -> None:
        event = services.audit(action="cancel", outcome="done")
        url = reverse("admin:uploads_auditevent_delete", args=[event.pk])
        assert admin_client.post(url, {"post": "yes"}).status_code == 403
        assert admin_client.get(AUDIT).context["action_form"] is None
        data = {"action": "delete_selected", "post": "yes", ACTION_CHECKBOX_NAME: [event.pk]}
        admin_client.post(AUDIT, data)
        assert AuditEvent.objects.filter(pk=event.pk).exists()

    def test_staff_need_the_view_permission(self, staff_user: Any) -> None:
        assert staff_client(staff_user).get(AUDIT).status_code == 403
        assert staff_client(staff_user, "view_auditevent").get(AUDIT).status_code == 200


# --- worker heartbeats -----------------------------------------------------------------------


def beat(worker_id: str, seen_ago: timedelta, **fields: Any) -> WorkerHeartbeat:
    now = timezone.now()
    values: dict[str, Any] = {
        "hostname": "push-1",
        "pid": 4242,
        "threads": 8,
        "started_at": now - timedelta(days=1),
        "last_seen_at": now - seen_ago,
        "in_flight": 3,
        "processed": 12345,
    }
    values.update(fields)
    return WorkerHeartbeat.objects.create(worker_id=worker_id, **values)


class TestHeartbeats:
    def test_lists_the_workers(self, admin_client: Client) -> None:
        beat("push-1:4242", timedelta(seconds=5))
        beat("push-2:77", timedelta(hours=3, minutes=5), hostname="push-2", pid=77)
        fresh, stale = body_rows(admin_client.get(HEARTBEATS))  # newest heartbeat first
        assert "push-1:4242" in fresh
        for cell in (
            'hostname">push-1',
            'pid">4242',
            'threads">8',
            'in_flight">3',
            'processed">12345',
        ):
            assert cell in fresh
        assert "<span>5 seconds ago</span>" in fresh
        assert "push-2:77" in stale
        assert re.search(
            r'class="upload-heartbeat-stale"[^>]*>3\xa0hours, 5\xa0minutes ago<', stale
        )

    def test_is_read_only(self, admin_client: Client) -> None:
        worker = beat("push-1:4242", timedelta(seconds=1))
        assert admin_client.get(reverse("admin:uploads_workerheartbeat_add")).status_code == 403
        url = reverse("admin:uploads_workerheartbeat_change", args=[worker.pk])
        assert 'name="_save"' not in admin_client.get(url).content.decode()
        assert admin_client.post(url, {"hostname": "elsewhere"}).status_code == 403
        worker.refresh_from_db()
        assert worker.hostname == "push-1"

    def test_superuser_clears_stale_rows(self, admin_client: Client) -> None:
        stale = beat("push-2:77", timedelta(hours=3))
        live = beat("push-1:4242", timedelta(seconds=1))
        data = {"action": "delete_selected", "post": "yes", ACTION_CHECKBOX_NAME: [stale.pk]}
        assert admin_client.post(HEARTBEATS, data).status_code == 302
        assert list(WorkerHeartbeat.objects.all()) == [live]

    def test_staff_with_delete_permission_still_cannot(self, staff_user: Any) -> None:
        worker = beat("push-2:77", timedelta(hours=3))
        client = staff_client(staff_user, "view_workerheartbeat", "delete_workerheartbeat")
        assert client.get(HEARTBEATS).status_code == 200
        url = reverse("admin:uploads_workerheartbeat_delete", args=[worker.pk])
        assert client.post(url, {"post": "yes"}).status_code == 403
        assert WorkerHeartbeat.objects.filter(pk=worker.pk).exists()

    def test_query_count_does_not_grow_with_rows(self, admin_client: Client) -> None:
        beat("w0", timedelta(seconds=1))
        few = query_count(admin_client, HEARTBEATS)
        for i in range(1, 20):
            beat(f"w{i}", timedelta(minutes=i))
        assert query_count(admin_client, HEARTBEATS) == few
