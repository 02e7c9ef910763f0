"""The operators' admin: watch the queue, read a task's history, retry or cancel uploads;
manage who may push where (grants); read the audit trail and the workers' heartbeats.

Uploads arrive only through the API and every state change belongs to the worker or to the
services, so the change page is read-only: operators act through the "Retry" button and the
changelist actions, which call the same services as the API's retry and cancel. Whatever an
operator does here (retry, cancel, grant, change or revoke a grant) leaves an audit event.
"""

import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets, unquote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import router, transaction
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.http.response import HttpResponseRedirect
from django.template.defaultfilters import filesizeformat
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.timesince import timesince
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from uploads import selectors, services, spool
from uploads.conf import uploads_settings
from uploads.grants import parse_owner
from uploads.models import (
    AuditEvent,
    Grant,
    Status,
    UploadAttempt,
    UploadBatch,
    UploadTask,
    WorkerHeartbeat,
)

if TYPE_CHECKING:
    TaskAdminBase = admin.ModelAdmin[UploadTask]
    AttemptAdminBase = admin.ModelAdmin[UploadAttempt]
    AttemptInlineBase = admin.TabularInline[UploadAttempt, UploadTask]
    GrantAdminBase = admin.ModelAdmin[Grant]
    GrantFormBase = forms.ModelForm[Grant]
    AuditEventAdminBase = admin.ModelAdmin[AuditEvent]
    HeartbeatAdminBase = admin.ModelAdmin[WorkerHeartbeat]
else:
    # Django's admin classes are not subscriptable at run time (django-stubs-ext not patched in).
    TaskAdminBase = admin.ModelAdmin
    AttemptAdminBase = admin.ModelAdmin
    AttemptInlineBase = admin.TabularInline
    GrantAdminBase = admin.ModelAdmin
    GrantFormBase = forms.ModelForm
    AuditEventAdminBase = admin.ModelAdmin
    HeartbeatAdminBase = admin.ModelAdmin

ERROR_PREVIEW_CHARS = 80
# What the admin's own history (LogEntry, the change page's "History") says an operator did.
LOG_RETRIED = "Retried from the admin."
LOG_CANCELLED = "Cancelled from the admin."
RETRYABLE = (Status.FAILED, Status.CANCELLED)
# A partial id must have this many hex digits; fewer would match a large share of all tasks.
MIN_ID_PREFIX = 4
HEX_OR_HYPHEN = re.compile(r"^[0-9a-f-]+$")
# Where the hyphens of a canonical UUID go, counted in hex digits: 8-4-4-4-12.
UUID_GROUP_ENDS = (8, 12, 16, 20)
DETAIL_PREVIEW_CHARS = 100
# Up to this age a heartbeat reads "42 seconds ago"; older ones "3 hours, 5 minutes ago".
SECONDS_SHOWN_UP_TO = 120


def status_badge(status: str) -> SafeString:
    """A task's status as a coloured pill; the colours live in static/uploads/admin.css."""
    label = Status(status).label if status in Status.values else status
    return format_html('<span class="upload-status upload-status-{}">{}</span>', status, label)


def _id_lookup(term: str, field: str = "pk") -> Q | None:
    """The filter that matches a search term against task ids in `field` (a UUIDField), or None
    when it is not an id.

    A full UUID (any spelling uuid.UUID accepts) matches exactly. A hex prefix of at least
    MIN_ID_PREFIX digits, as the changelist's short id shows it, matches the ids that start
    with it: it is re-hyphenated canonically because PostgreSQL compares the text form
    ("1a2b3c4d-…") while SQLite, storing 32 bare hex digits, drops the hyphens from the pattern.
    """
    term = term.strip().lower()
    try:
        return Q(**{field: uuid.UUID(term)})
    except ValueError:
        pass
    if not HEX_OR_HYPHEN.match(term):
        return None
    digits = term.replace("-", "")
    if not MIN_ID_PREFIX <= len(digits) < 32:
        return None
    bounds = (0, *UUID_GROUP_ENDS, 32)
    groups = (digits[start:end] for start, end in zip(bounds, bounds[1:], strict=False))
    prefix = "-".join(group for group in groups if group)
    return Q(**{f"{field}__istartswith": prefix})


def _source(request: HttpRequest) -> str | None:
    # As the API records it; None rather than "" (not a valid inet on PostgreSQL).
    address: str | None = request.META.get("REMOTE_ADDR") or None
    return address


def _duration(attempt: UploadAttempt, empty: str) -> str:
    # `empty` because a read-only field on a change page prints None as "None", unlike a
    # changelist cell, which shows the admin's empty value.
    seconds = attempt.duration
    return empty if seconds is None else f"{seconds:.1f} s"


def _remove_spool_files_on_commit(names: list[str], using: str) -> None:
    # After the commit: a rolled-back delete must leave the task's file where it was, and a file
    # another task may still need stays.
    def remove() -> None:
        for name in selectors.unneeded_bodies(names):
            spool.remove(name)

    transaction.on_commit(remove, using=using)


class UploadAttemptInline(AttemptInlineBase):
    model = UploadAttempt
    fields = ("number", "worker_id", "started_at", "duration_display", "outcome", "error")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = False
    ordering = ("number",)

    @admin.display(description=_("duration"))
    def duration_display(self, attempt: UploadAttempt) -> str:
        return _duration(attempt, self.get_empty_value_display())

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The attempts are the task's history: whoever may see the task sees them, without a
        # separate permission on UploadAttempt.
        opts = UploadTask._meta
        return any(
            request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
            for action in ("view", "change")
        )


class BatchFilter(admin.SimpleListFilter):
    """The tasks of one fan-out: the newest batches to choose from, and any batch by its id
    (`?batch=<id>`, where each task's batch links to)."""

    title = _("batch")
    parameter_name = "batch"
    shown = 20

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        batches = UploadBatch.objects.order_by("-created_at")[: self.shown]
        choices = [(str(b.pk), f"{str(b.pk)[:8]} {b.requested} ({b.count})") for b in batches]
        value = self.value()
        if value and value not in {pk for pk, _ in choices}:
            choices.insert(0, (value, value[:8]))
        return choices

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        try:
            return queryset.filter(batch=uuid.UUID(value))
        except ValueError:
            return queryset.none()


@admin.register(UploadTask)
class UploadTaskAdmin(TaskAdminBase):
    list_display = (
        "short_id",
        "instance_display",
        "path",
        "filename",
        "size_display",
        "status_display",
        "attempts_display",
        "last_error_display",
        "owner",
        "batch_link",
        "created_at",
        "finished_at",
    )
    list_display_links = ("short_id",)
    list_filter = (
        "status",
        BatchFilter,
        "instance",
        "project",
        "remote",
        ("owner", admin.RelatedOnlyFieldListFilter),
        "created_at",
    )
    list_select_related = ("owner",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[UploadTask]:
        # Small bodies travel in the rows: a page of uploads need not load them.
        return super().get_queryset(request).defer("body")

    search_fields = ("instance", "path", "filename", "last_error")
    search_help_text = _(
        "Instance, path, file name or error text; or a task id, whole or its first characters."
    )
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_per_page = 50
    actions = ("retry_selected", "cancel_selected")
    inlines = (UploadAttemptInline,)
    fieldsets = (
        (
            _("Upload"),
            {
                "fields": (
                    "id",
                    "owner",
                    ("remote", "project", "instance"),
                    "path",
                    "filename",
                    "size_display",
                    "sha256",
                    ("mode_display", "uid", "gid"),
                    "create_dirs",
                    ("spool_name", "spool_file_display"),
                    "batch_link",
                    "idempotency_key",
                    "api_link",
                )
            },
        ),
        (
            _("Delivery"),
            {
                "fields": (
                    "status_display",
                    ("attempts", "max_attempts"),
                    "next_attempt_at",
                    "last_error",
                    "worker_id",
                    ("claim_token", "lease_expires_at"),
                )
            },
        ),
        (_("Times"), {"fields": (("created_at", "started_at", "finished_at"),)}),
    )

    class Media:
        css = {"all": ("uploads/admin.css",)}

    # --- columns and read-only fields ------------------------------------------------------

    @admin.display(description=_("id"), ordering="id")
    def short_id(self, task: UploadTask) -> str:
        return str(task.pk)[:8]

    @admin.display(description=_("instance"), ordering="instance")
    def instance_display(self, task: UploadTask) -> str:
        """web1, staging/web1, or with another remote than local: prod:staging/web1."""
        target = task.instance if task.project == "default" else f"{task.project}/{task.instance}"
        return target if task.remote == "local" else f"{task.remote}:{target}"

    @admin.display(description=_("size"), ordering="size")
    def size_display(self, task: UploadTask) -> str:
        return str(filesizeformat(task.size))

    @admin.display(description=_("status"), ordering="status")
    def status_display(self, task: UploadTask) -> SafeString:
        return status_badge(task.status)

    @admin.display(description=_("attempts"), ordering="attempts")
    def attempts_display(self, task: UploadTask) -> str:
        return f"{task.attempts} / {task.max_attempts}"

    @admin.display(description=_("last error"))
    def last_error_display(self, task: UploadTask) -> SafeString | None:
        if not task.last_error:
            return None
        short = Truncator(task.last_error).chars(ERROR_PREVIEW_CHARS)
        return format_html('<span title="{}">{}</span>', task.last_error, short)

    @admin.display(description=_("mode"))
    def mode_display(self, task: UploadTask) -> str:
        return self.get_empty_value_display() if task.mode is None else f"{task.mode:04o}"

    @admin.display(description=_("uploaded file kept"))
    def spool_file_display(self, task: UploadTask) -> str:
        if selectors.body_kept(task):
            return str(_("yes"))
        if task.status in RETRYABLE:
            return str(_("no: the file is gone, so this upload cannot be retried"))
        return str(_("no"))

    @admin.display(description=_("batch"), ordering="batch")
    def batch_link(self, task: UploadTask) -> SafeString | str:
        """A fan-out's tasks: the batch's id, linking to the list of its tasks."""
        if task.batch_id is None:
            return self.get_empty_value_display()
        url = reverse("admin:uploads_uploadtask_changelist") + f"?batch={task.batch_id}"
        return format_html(
            '<a href="{}" title="{}">{}</a>', url, task.batch_id, str(task.batch_id)[:8]
        )

    @admin.display(description=_("API"))
    def api_link(self, task: UploadTask) -> SafeString:
        url = reverse("upload-detail", args=[task.pk])
        return format_html('<a href="{}">{}</a>', url, url)

    def get_readonly_fields(self, request: HttpRequest, obj: UploadTask | None = None) -> Any:
        # Everything: the worker owns the state, and the target of an accepted upload is fixed.
        return flatten_fieldsets(self.fieldsets or ())

    # --- permissions -------------------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # uploads come through the API, with their file

    def has_delete_permission(self, request: HttpRequest, obj: UploadTask | None = None) -> bool:
        return bool(request.user.is_superuser) and super().has_delete_permission(request, obj)

    # --- search ------------------------------------------------------------------------------

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UploadTask], search_term: str
    ) -> tuple[QuerySet[UploadTask], bool]:
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        id_lookup = _id_lookup(search_term)
        if id_lookup is not None:
            # From the same queryset, so the active list filters still apply.
            results = results | queryset.filter(id_lookup)
        return results, may_have_duplicates

    # --- views -------------------------------------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        opts = self.opts
        retry = path(
            "<path:object_id>/retry/",
            self.admin_site.admin_view(self.retry_view),
            name=f"{opts.app_label}_{opts.model_name}_retry",
        )
        # Before the defaults: their "<path:object_id>/" catch-all would take ".../retry/".
        return [retry, *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = dict(extra_context or {})
        if request.method == "GET":
            summary = selectors.queue_summary()
            context["queue_summary"] = summary
            context["queue_counts"] = [
                (value, label, summary["counts"][value]) for value, label in Status.choices
            ]
        return super().changelist_view(request, extra_context=context)

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method == "POST":
            # There is nothing to edit, and a save would rewrite every column from a copy read
            # moments earlier, racing the worker's conditional updates.
            return HttpResponseNotAllowed(["GET", "HEAD"])
        context = {
            **(extra_context or {}),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
        }
        return super().changeform_view(request, object_id, form_url, context)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: UploadTask | None = None,
    ) -> HttpResponse:
        if (
            obj is not None
            and obj.status in RETRYABLE
            and selectors.body_kept(obj)
            and self.has_change_permission(request, obj)
        ):
            context["retry_url"] = self._url("retry", obj.pk)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _url(self, view: str, pk: Any) -> str:
        return reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_{view}",
            args=[pk],
            current_app=self.admin_site.name,
        )

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST only (the admin's CSRF check applies): retry one task, then back to its page."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        task = self.get_object(request, unquote(object_id))
        if task is None:
            raise Http404(_("No upload with this id."))
        if not self.has_change_permission(request, task):
            raise PermissionDenied
        try:
            services.upload_retry(
                task=task, actor=request.user, source=_source(request), via="admin"
            )
        except (services.TaskStateError, services.SpoolFileMissing, services.NotGranted) as exc:
            self.message_user(request, _("Not retried: %s") % exc, messages.ERROR)
        else:
            self.log_change(request, task, LOG_RETRIED)
            self.message_user(request, _("The upload is queued again."), messages.SUCCESS)
        return HttpResponseRedirect(self._url("change", task.pk))

    # --- actions -----------------------------------------------------------------------------

    @admin.action(permissions=["change"], description=_("Retry selected uploads"))
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[UploadTask]) -> None:
        retried = skipped = missing = not_granted = 0
        for task in queryset:
            try:
                services.upload_retry(
                    task=task, actor=request.user, source=_source(request), via="admin"
                )
            except services.TaskStateError:
                skipped += 1
            except services.SpoolFileMissing:
                missing += 1
            except services.NotGranted:
                not_granted += 1
            else:
                self.log_change(request, task, LOG_RETRIED)
                retried += 1
        parts = [ngettext("Retried %d upload", "Retried %d uploads", retried) % retried]
        if skipped:
            parts.append(
                ngettext(
                    "skipped %d that was not failed or cancelled",
                    "skipped %d that were not failed or cancelled",
                    skipped,
                )
                % skipped
            )
        if missing:
            parts.append(
                ngettext(
                    "%d could not be retried because its file is gone (upload it again)",
                    "%d could not be retried because their files are gone (upload them again)",
                    missing,
                )
                % missing
            )
        if not_granted:
            parts.append(
                ngettext(
                    "%d was refused because its owner may no longer write there",
                    "%d were refused because their owners may no longer write there",
                    not_granted,
                )
                % not_granted
            )
        self._report(request, parts, done=retried, problems=skipped + missing + not_granted)

    @admin.action(permissions=["change"], description=_("Cancel selected uploads"))
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[UploadTask]) -> None:
        cancelled = skipped = 0
        for task in queryset:
            try:
                services.upload_cancel(
                    task=task, actor=request.user, source=_source(request), via="admin"
                )
            except services.TaskStateError:
                skipped += 1
            else:
                self.log_change(request, task, LOG_CANCELLED)
                cancelled += 1
        parts = [ngettext("Cancelled %d upload", "Cancelled %d uploads", cancelled) % cancelled]
        if skipped:
            parts.append(
                ngettext(
                    "skipped %d that was not pending", "skipped %d that were not pending", skipped
                )
                % skipped
            )
        self._report(request, parts, done=cancelled, problems=skipped)

    def _report(self, request: HttpRequest, parts: list[str], *, done: int, problems: int) -> None:
        if not problems:
            level = messages.SUCCESS
        elif done:
            level = messages.WARNING
        else:
            level = messages.ERROR
        self.message_user(request, "; ".join(parts) + ".", level)

    # --- deletion (superusers only) ----------------------------------------------------------

    def delete_model(self, request: HttpRequest, obj: UploadTask) -> None:
        using = router.db_for_write(UploadTask)
        super().delete_model(request, obj)
        _remove_spool_files_on_commit([obj.spool_name], using)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[UploadTask]) -> None:
        names = list(queryset.values_list("spool_name", flat=True))
        super().delete_queryset(request, queryset)
        _remove_spool_files_on_commit(names, queryset.db)


@admin.register(UploadAttempt)
class UploadAttemptAdmin(AttemptAdminBase):
    """Every push across all tasks, read-only: "which worker keeps losing its lease?" """

    list_display = (
        "task_link",
        "number",
        "worker_id",
        "started_at",
        "duration_display",
        "outcome",
        "error_display",
    )
    # Not by worker: its ids name a host and a process, so they pile up with every restart.
    list_filter = ("outcome", "started_at")
    search_fields = ("worker_id", "error")
    list_select_related = ("task",)
    date_hierarchy = "started_at"
    ordering = ("-started_at",)

    @admin.display(description=_("upload"), ordering="task")
    def task_link(self, attempt: UploadAttempt) -> SafeString:
        url = reverse("admin:uploads_uploadtask_change", args=[attempt.task_id])
        task = attempt.task
        return format_html('<a href="{}">{} {}</a>', url, str(task.pk)[:8], task.instance)

    @admin.display(description=_("duration"))
    def duration_display(self, attempt: UploadAttempt) -> str:
        return _duration(attempt, self.get_empty_value_display())

    @admin.display(description=_("error"))
    def error_display(self, attempt: UploadAttempt) -> str:
        return Truncator(attempt.error).chars(ERROR_PREVIEW_CHARS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UploadAttempt | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UploadAttempt | None = None) -> bool:
        return False


# --- grants ----------------------------------------------------------------------------------


class PathPrefixesField(forms.Field):
    """The JSON list of directories as a textarea, one absolute path a line.

    Each path is normalised the way the grant check compares them (no trailing or doubled
    slashes, no "." components); relative paths and ".." are refused rather than guessed at.
    """

    widget = forms.Textarea(attrs={"rows": 4, "cols": 60})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return "\n".join(str(prefix) for prefix in value)
        return value

    def to_python(self, value: Any) -> list[str]:
        prefixes: list[str] = []
        errors: list[forms.ValidationError] = []
        for line in str(value or "").splitlines():
            line = line.strip()
            if not line:
                continue
            if "\x00" in line:
                errors.append(
                    forms.ValidationError(_("A path may not contain NUL characters."), code="null")
                )
                continue
            if not line.startswith("/"):
                errors.append(
                    forms.ValidationError(
                        _("“%(path)s” is not an absolute path: start it with /."),
                        code="relative",
                        params={"path": line},
                    )
                )
                continue
            parts = line.split("/")
            if ".." in parts:
                errors.append(
                    forms.ValidationError(
                        _("“%(path)s” contains “..”: name the directory itself."),
                        code="parent",
                        params={"path": line},
                    )
                )
                continue
            normal = "/" + "/".join(part for part in parts if part not in ("", "."))
            if normal not in prefixes:
                prefixes.append(normal)
        if errors:
            raise forms.ValidationError(errors)
        return prefixes


class OwnersField(forms.Field):
    """The JSON list of owners as one line: `1000:1000, 33`, or `*` for any."""

    widget = forms.TextInput(attrs={"size": 40})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return ", ".join(str(owner) for owner in value)
        return value

    def to_python(self, value: Any) -> list[str]:
        owners: set[str] = set()
        errors: list[forms.ValidationError] = []
        for item in str(value or "").replace(",", " ").split():
            try:
                owners.add(parse_owner(item))
            except ValueError as exc:
                errors.append(forms.ValidationError(str(exc), code="owner"))
        if errors:
            raise forms.ValidationError(errors)
        return sorted(owners)


class GrantAdminForm(GrantFormBase):
    owners = OwnersField(
        label=_("owners"),
        required=False,
        help_text=_(
            "The uid or uid:gid uploads may give their files, separated by commas, e.g. "
            "1000:1000, 33; * allows any. Empty: uploads may not ask for an owner (files keep "
            "the owner of the file they replace, or root)."
        ),
    )
    path_prefixes = PathPrefixesField(
        label=_("path prefixes"),
        required=False,
        help_text=_(
            "One absolute directory a line, e.g. /srv/app; files may be written only under "
            "them. Empty allows every path."
        ),
    )

    class Meta:
        model = Grant
        fields = services.GRANT_FIELDS

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned_data = self.cleaned_data
        if "user" in self.errors or "group" in self.errors:
            return cleaned_data
        user, group = cleaned_data.get("user"), cleaned_data.get("group")
        # On a field, not the whole form: a field with an error is left out of the model's
        # constraint check, so the operator does not also read "Constraint … is violated".
        if user is None and group is None:
            self.add_error("user", _("Choose a user or a group."))
        elif user is not None and group is not None:
            self.add_error("group", _("Choose a user or a group, not both."))
        return cleaned_data


@admin.register(Grant)
class GrantAdmin(GrantAdminBase):
    """Who may push where. Every add, change and delete here is audited."""

    form = GrantAdminForm
    list_display = (
        "who_display",
        "remote",
        "project",
        "instance_glob",
        "path_prefixes_display",
        "owners_display",
        "max_size_display",
        "created_at",
    )
    list_filter = ("remote", "project")
    list_select_related = ("user", "group")
    search_fields = ("user__username", "group__name", "instance_glob")
    search_help_text = _("User name, group name or instance glob.")
    fields = (
        "user",
        "group",
        "remote",
        "project",
        "instance_glob",
        "path_prefixes",
        "owners",
        "max_size",
        "created_at",
    )
    readonly_fields = ("created_at",)

    @admin.display(description=_("who"))
    def who_display(self, grant: Grant) -> str:
        if grant.user_id:
            return str(grant.user)
        return f"@{grant.group}"

    @admin.display(description=_("path prefixes"))
    def path_prefixes_display(self, grant: Grant) -> str:
        return ", ".join(grant.path_prefixes) or str(_("any path"))

    @admin.display(description=_("owners"))
    def owners_display(self, grant: Grant) -> str:
        return ", ".join(grant.owners) or str(_("none"))

    @admin.display(description=_("maximum file size"), ordering="max_size")
    def max_size_display(self, grant: Grant) -> str:
        return str(_("no limit")) if grant.max_size is None else str(filesizeformat(grant.max_size))

    def get_fields(self, request: HttpRequest, obj: Grant | None = None) -> Any:
        fields = super().get_fields(request, obj)
        # A new grant has no creation time yet (the default would show the form's load time).
        return fields if obj is not None else [f for f in fields if f != "created_at"]

    def save_model(self, request: HttpRequest, obj: Grant, form: Any, change: bool) -> None:
        services.grant_save(actor=request.user, grant=obj, source=_source(request))

    def delete_model(self, request: HttpRequest, obj: Grant) -> None:
        services.grant_revoke(actor=request.user, grants=[obj], source=_source(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Grant]) -> None:
        # The "delete selected" action runs outside the admin's transaction: all or none.
        with transaction.atomic(using=queryset.db):
            services.grant_revoke(actor=request.user, grants=queryset, source=_source(request))


# --- the audit trail -------------------------------------------------------------------------


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str)


@admin.register(AuditEvent)
class AuditEventAdmin(AuditEventAdminBase):
    """The audit trail, read-only for everyone: no add, change or delete, not even superusers."""

    list_display = (
        "at",
        "username",
        "action",
        "outcome",
        "source",
        "task_link",
        "detail_display",
    )
    list_filter = ("action", "outcome", "at")
    search_fields = ("username", "source")
    search_help_text = _("User name or source address; or an upload id, whole or its start.")
    date_hierarchy = "at"
    ordering = ("-at",)
    list_per_page = 100
    fields = (
        "at",
        "user",
        "username",
        "action",
        "outcome",
        "source",
        "task_link",
        "detail_pretty",
    )
    readonly_fields = fields

    @admin.display(description=_("upload"), ordering="task_id")
    def task_link(self, event: AuditEvent) -> SafeString | None:
        if event.task_id is None:
            return None
        # Linked without checking the task still exists (that would be a query a row); a purged
        # task's link leads to the admin's "doesn't exist" message.
        url = reverse("admin:uploads_uploadtask_change", args=[event.task_id])
        return format_html(
            '<a href="{}" title="{}">{}</a>', url, event.task_id, str(event.task_id)[:8]
        )

    @admin.display(description=_("detail"))
    def detail_display(self, event: AuditEvent) -> SafeString | None:
        if not event.detail:
            return None
        text = _compact_json(event.detail)
        short = Truncator(text).chars(DETAIL_PREVIEW_CHARS)
        return format_html('<code title="{}">{}</code>', text, short)

    @admin.display(description=_("detail"))
    def detail_pretty(self, event: AuditEvent) -> SafeString:
        text = json.dumps(event.detail, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        return format_html("<pre>{}</pre>", text)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[AuditEvent], search_term: str
    ) -> tuple[QuerySet[AuditEvent], bool]:
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        # Parsed first, so text that is no id never reaches the UUID column's lookup.
        id_lookup = _id_lookup(search_term, field="task_id")
        if id_lookup is not None:
            results = results | queryset.filter(id_lookup)
        return results, may_have_duplicates

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False


# --- workers ---------------------------------------------------------------------------------


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(HeartbeatAdminBase):
    """The running workers as their heartbeats report them; superusers may clear stale rows."""

    list_display = (
        "worker_id",
        "hostname",
        "pid",
        "threads",
        "started_at",
        "last_seen_display",
        "in_flight",
        "processed",
    )
    ordering = ("-last_seen_at",)

    class Media:
        css = {"all": ("uploads/admin.css",)}

    @admin.display(description=_("last seen"), ordering="last_seen_at")
    def last_seen_display(self, beat: WorkerHeartbeat) -> SafeString:
        now = timezone.now()
        seconds = max(int((now - beat.last_seen_at).total_seconds()), 0)
        if seconds <= SECONDS_SHOWN_UP_TO:
            text = ngettext("%d second ago", "%d seconds ago", seconds) % seconds
        else:
            text = _("%(age)s ago") % {"age": timesince(beat.last_seen_at, now)}
        # A worker silent for longer than a lease has lost its claims to the reaper: likely gone.
        if seconds > uploads_settings.LEASE_SECONDS:
            return format_html(
                '<span class="upload-heartbeat-stale" title="{}">{}</span>',
                _("No heartbeat for longer than a lease: this worker has probably stopped."),
                text,
            )
        return format_html("<span>{}</span>", text)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: WorkerHeartbeat | None = None
    ) -> bool:
        return False

    def has_delete_permission(
        self, request: HttpRequest, obj: WorkerHeartbeat | None = None
    ) -> bool:
        return bool(request.user.is_superuser) and super().has_delete_permission(request, obj)
