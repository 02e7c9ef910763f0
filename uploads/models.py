"""The durable queue: one `UploadTask` row per upload, one `UploadAttempt` row per push."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from uploads.grants import MAX_ID, describe_owners


class Status(models.TextChoices):
    PENDING = "pending", _("Pending")
    RUNNING = "running", _("Running")
    SUCCEEDED = "succeeded", _("Succeeded")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")


FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


class UploadTaskQuerySet(models.QuerySet["UploadTask"]):
    def pending(self) -> "UploadTaskQuerySet":
        return self.filter(status=Status.PENDING)

    # Readiness and leases are judged by the database's clock, never a host's.
    def ready(self) -> "UploadTaskQuerySet":
        return self.pending().filter(next_attempt_at__lte=Now())

    def running(self) -> "UploadTaskQuerySet":
        return self.filter(status=Status.RUNNING)

    def expired_leases(self) -> "UploadTaskQuerySet":
        return self.running().filter(lease_expires_at__lt=Now())

    def finished(self) -> "UploadTaskQuerySet":
        return self.filter(status__in=FINISHED)


class UploadBatch(models.Model):
    """One upload delivered to several instances (a list or a glob): its body is received and
    kept once, and each destination is an UploadTask of its own that refers to the batch."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="upload_batches",
        verbose_name=_("owner"),
    )
    # The instances as the client named them (names and globs, comma-separated), to tell a
    # resend from another upload with the same idempotency key.
    requested = models.TextField(_("instances requested"))
    count = models.PositiveIntegerField(_("destinations"))
    idempotency_key = models.CharField(_("idempotency key"), max_length=255, blank=True, default="")
    created_at = models.DateTimeField(_("created at"), db_default=Now(), db_index=True)

    class Meta:
        verbose_name = _("batch")
        verbose_name_plural = _("batches")
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="uploadbatch_owner_idempotency_key",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.requested} ({self.count})"


class UploadTask(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="upload_tasks",
        verbose_name=_("owner"),
    )
    remote = models.CharField(_("Incus remote"), max_length=63, default="local")
    project = models.CharField(_("Incus project"), max_length=63, default="default")
    instance = models.CharField(_("instance"), max_length=63)
    path = models.CharField(_("destination path"), max_length=4096)
    filename = models.CharField(_("client file name"), max_length=255, blank=True)
    size = models.PositiveBigIntegerField(_("size in bytes"))
    sha256 = models.CharField(_("SHA-256"), max_length=64)
    mode = models.PositiveIntegerField(_("mode"), null=True, blank=True)
    uid = models.PositiveBigIntegerField(_("uid"), null=True, blank=True)
    gid = models.PositiveBigIntegerField(_("gid"), null=True, blank=True)
    create_dirs = models.BooleanField(_("create parent directories"), default=False)
    spool_name = models.CharField(_("spool file"), max_length=100, blank=True, editable=False)
    # A small body travels in the row itself (UPLOADS['INLINE_MAX_BYTES']): no spool file, and
    # the row's commit is what makes it durable. Cleared once the task succeeded.
    body = models.BinaryField(_("body"), null=True, blank=True, editable=False)
    idempotency_key = models.CharField(
        _("idempotency key"),
        max_length=255,
        blank=True,
        default="",
        help_text=_("The client's Idempotency-Key: a resend with the same key gets this task."),
    )
    # The fan-out this task is one destination of; None for an upload to one instance.
    batch = models.ForeignKey(
        UploadBatch,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="tasks",
        verbose_name=_("batch"),
    )

    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.PENDING
    )
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    max_attempts = models.PositiveIntegerField(_("max attempts"))
    next_attempt_at = models.DateTimeField(_("next attempt at"), db_default=Now())
    last_error = models.TextField(_("last error"), blank=True)

    claim_token = models.UUIDField(_("claim token"), null=True, blank=True, editable=False)
    lease_expires_at = models.DateTimeField(_("lease expires at"), null=True, blank=True)
    worker_id = models.CharField(_("worker"), max_length=200, blank=True)

    created_at = models.DateTimeField(_("created at"), db_default=Now(), db_index=True)
    # Who sent it, with the owner and the creation time: the task row is the record of the
    # accepted upload (refused ones are audit events).
    source = models.GenericIPAddressField(_("source address"), null=True, blank=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)

    objects = UploadTaskQuerySet.as_manager()

    class Meta:
        verbose_name = _("upload")
        verbose_name_plural = _("uploads")
        ordering = ["-created_at"]
        indexes = [
            # The queue query: ready rows by due time, and expired leases.
            models.Index(
                fields=["next_attempt_at"],
                name="uploadtask_ready_idx",
                condition=Q(status="pending"),
            ),
            models.Index(
                fields=["lease_expires_at"],
                name="uploadtask_lease_idx",
                condition=Q(status="running"),
            ),
            # The list filters.
            models.Index(fields=["owner", "-created_at"], name="uploadtask_owner_idx"),
            models.Index(fields=["status", "-created_at"], name="uploadtask_status_idx"),
            models.Index(fields=["instance", "-created_at"], name="uploadtask_instance_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=Status.values), name="uploadtask_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(mode__isnull=True) | Q(mode__lte=0o7777), name="uploadtask_mode_range"
            ),
            models.CheckConstraint(
                condition=Q(uid__isnull=True) | Q(uid__lte=MAX_ID), name="uploadtask_uid_range"
            ),
            models.CheckConstraint(
                condition=Q(gid__isnull=True) | Q(gid__lte=MAX_ID), name="uploadtask_gid_range"
            ),
            models.CheckConstraint(
                condition=Q(max_attempts__gte=1), name="uploadtask_max_attempts_positive"
            ),
            # One task per client key: a resend after a lost answer is not a second upload.
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="uploadtask_owner_idempotency_key",
            ),
            # A running task is always owned by exactly one claim with a lease.
            models.CheckConstraint(
                condition=~Q(status="running")
                | (Q(claim_token__isnull=False) & Q(lease_expires_at__isnull=False)),
                name="uploadtask_running_has_claim",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.filename or self.path} → {self.project}/{self.instance}:{self.path}"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED


class Outcome(models.TextChoices):
    RUNNING = "running", _("Running")
    SUCCEEDED = "succeeded", _("Succeeded")
    RETRY = "retry", _("Failed, will retry")
    FAILED = "failed", _("Failed")
    LOST = "lost", _("Worker lost")
    INTERRUPTED = "interrupted", _("Interrupted by shutdown")


class UploadAttempt(models.Model):
    task = models.ForeignKey(
        UploadTask, on_delete=models.CASCADE, related_name="attempt_log", verbose_name=_("upload")
    )
    number = models.PositiveIntegerField(_("attempt"))
    worker_id = models.CharField(_("worker"), max_length=200)
    claim_token = models.UUIDField(_("claim token"))
    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    outcome = models.CharField(
        _("outcome"), max_length=16, choices=Outcome.choices, default=Outcome.RUNNING
    )
    error = models.TextField(_("error"), blank=True)

    class Meta:
        verbose_name = _("attempt")
        verbose_name_plural = _("attempts")
        ordering = ["task", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "claim_token"], name="uploadattempt_one_per_claim"
            ),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.task_id}"

    @property
    def duration(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class Grant(models.Model):
    """Who may push where: a user or a group, a remote, a project, an instance-name glob,
    optional path prefixes and an optional size limit."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="upload_grants",
        verbose_name=_("user"),
    )
    group = models.ForeignKey(
        "auth.Group",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="upload_grants",
        verbose_name=_("group"),
    )
    remote = models.CharField(_("remote"), max_length=63, default="local")
    project = models.CharField(
        _("project"), max_length=63, default="default", help_text=_("A project name or a glob.")
    )
    instance_glob = models.CharField(
        _("instances"), max_length=63, help_text=_("An instance-name glob, e.g. ci-* or web1.")
    )
    path_prefixes = models.JSONField(
        _("path prefixes"),
        default=list,
        blank=True,
        help_text=_("Directories under which files may be written; empty allows every path."),
    )
    max_size = models.PositiveBigIntegerField(
        _("maximum file size"), null=True, blank=True, help_text=_("In bytes; empty for none.")
    )
    owners = models.JSONField(
        _("owners"),
        default=list,
        blank=True,
        help_text=_(
            "The uid or uid:gid an upload may ask its file to get (* for any); empty allows "
            "none: files then keep the owner of the file they replace, or root."
        ),
    )
    created_at = models.DateTimeField(_("created at"), default=timezone.now)

    class Meta:
        verbose_name = _("grant")
        verbose_name_plural = _("grants")
        ordering = ["instance_glob", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(user__isnull=False) & Q(group__isnull=True))
                | (Q(user__isnull=True) & Q(group__isnull=False)),
                name="grant_user_xor_group",
            ),
        ]

    def __str__(self) -> str:
        who = f"user {self.user}" if self.user_id else f"group {self.group}"
        prefixes = ", ".join(self.path_prefixes) or "any path"
        owners = f"; owners {describe_owners(self.owners)}" if self.owners else ""
        return f"{who}: {self.remote}:{self.project}/{self.instance_glob} ({prefixes}{owners})"


class AuditEvent(models.Model):
    """Who did what to which upload or grant, from where, and how it ended."""

    at = models.DateTimeField(_("at"), default=timezone.now, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        verbose_name=_("user"),
    )
    username = models.CharField(_("user name"), max_length=150, blank=True)
    action = models.CharField(_("action"), max_length=32, db_index=True)
    outcome = models.CharField(_("outcome"), max_length=32)
    source = models.GenericIPAddressField(_("source address"), null=True, blank=True)
    task_id = models.UUIDField(_("upload"), null=True, blank=True, db_index=True)
    detail = models.JSONField(_("detail"), default=dict, blank=True)

    class Meta:
        verbose_name = _("audit event")
        verbose_name_plural = _("audit events")
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username or '-'} {self.action} {self.outcome}"


class AccessGeneration(models.Model):
    """One row: a counter bumped by every change to tokens, users, groups and grants, so that
    web processes can keep them between uploads and still see a revocation at once (see
    uploads.access)."""

    SINGLETON = 1

    id = models.PositiveSmallIntegerField(primary_key=True, default=SINGLETON)
    value = models.BigIntegerField(default=0)

    class Meta:
        verbose_name = _("access generation")

    def __str__(self) -> str:
        return str(self.value)


class WorkerHeartbeat(models.Model):
    """One row per running `run_push_workers` process, refreshed by its heartbeat thread."""

    worker_id = models.CharField(_("worker"), max_length=200, primary_key=True)
    hostname = models.CharField(_("host"), max_length=255)
    pid = models.PositiveIntegerField(_("process id"))
    threads = models.PositiveIntegerField(_("threads"))
    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    last_seen_at = models.DateTimeField(_("last seen at"), default=timezone.now)
    in_flight = models.PositiveIntegerField(_("pushes in flight"), default=0)
    processed = models.PositiveBigIntegerField(_("pushes done"), default=0)

    class Meta:
        verbose_name = _("worker heartbeat")
        verbose_name_plural = _("worker heartbeats")
        ordering = ["-last_seen_at"]

    def __str__(self) -> str:
        return self.worker_id
