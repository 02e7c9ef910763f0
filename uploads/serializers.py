"""Parse upload parameters (headers or form fields) and render tasks as JSON."""

import posixpath
import re
from datetime import datetime
from typing import Any

from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from uploads.conf import uploads_settings
from uploads.grants import MAX_ID
from uploads.models import FINISHED, Status, UploadBatch, UploadTask
from uploads.selectors import is_glob

# Incus instance names are hostnames: letters, digits and hyphens, 1-63 characters, not
# starting with a digit or a hyphen, not ending with a hyphen.
INSTANCE_NAME = re.compile(r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
OCTAL_MODE = re.compile(r"^(?:0o?)?([0-7]{1,4})$")
MAX_PATH_BYTES = 4096


def clean_path(value: str) -> str:
    """Validate an absolute destination path and normalise `.` and `..` like Go's filepath.Clean."""
    if "\x00" in value:
        raise serializers.ValidationError(_("The path must not contain NUL bytes."))
    if not value.startswith("/"):
        raise serializers.ValidationError(_("The path must be absolute (start with '/')."))
    if value.endswith("/"):
        raise serializers.ValidationError(
            _("The path must name a file, not a directory (it ends with '/').")
        )
    if len(value.encode()) > MAX_PATH_BYTES:
        raise serializers.ValidationError(
            _("The path is longer than %(max)d bytes.") % {"max": MAX_PATH_BYTES}
        )
    # normpath keeps a leading "//" (POSIX allows it a special meaning); Incus does not.
    cleaned = "/" + posixpath.normpath(value).lstrip("/")
    if cleaned == "/":
        raise serializers.ValidationError(_("The path must name a file, not '/'."))
    return cleaned


def parse_mode(value: str | None) -> int | None:
    """An octal file mode as a client writes it ("0644", "644", "0o644"), None when not given."""
    if value is None or value == "":
        return None
    match = OCTAL_MODE.match(value.strip())
    if not match:
        raise serializers.ValidationError(
            _("'%(mode)s' is not an octal file mode between 0000 and 7777, e.g. 0644.")
            % {"mode": value}
        )
    return int(match.group(1), 8)


class UploadOptionsSerializer(serializers.Serializer[dict[str, Any]]):
    """What a client says about an upload but its instance, from either the raw form's headers
    or form fields."""

    path = serializers.CharField(max_length=MAX_PATH_BYTES * 4, trim_whitespace=False)
    project = serializers.CharField(max_length=63, required=False, default="default")
    remote = serializers.CharField(max_length=63, required=False, default="local")
    filename = serializers.CharField(max_length=4096, required=False, allow_blank=True, default="")
    mode = serializers.CharField(required=False, allow_null=True, default=None)
    uid = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0, max_value=MAX_ID
    )
    gid = serializers.IntegerField(
        required=False, allow_null=True, default=None, min_value=0, max_value=MAX_ID
    )
    create_dirs = serializers.BooleanField(required=False, default=False)
    sha256 = serializers.RegexField(
        r"^[0-9a-fA-F]{64}$",
        required=False,
        allow_null=True,
        default=None,
        error_messages={"invalid": _("A SHA-256 is 64 hexadecimal digits.")},
    )

    def validate_project(self, value: str) -> str:
        if not PROJECT_NAME.match(value):
            raise serializers.ValidationError(
                _("'%(name)s' is not a valid Incus project name.") % {"name": value}
            )
        return value

    def validate_sha256(self, value: str | None) -> str | None:
        return value.lower() if value else None

    def validate_remote(self, value: str) -> str:
        remotes = uploads_settings.remotes
        if value not in remotes:
            raise serializers.ValidationError(
                _("Unknown remote '%(name)s'; configured: %(known)s.")
                % {"name": value, "known": ", ".join(sorted(remotes))}
            )
        return value

    def validate_path(self, value: str) -> str:
        return clean_path(value)

    def validate_filename(self, value: str) -> str:
        # Display only: keep the basename of the client's own path, never use it on disk.
        return posixpath.basename(value.replace("\\", "/").replace("\x00", ""))[:255]

    def validate_mode(self, value: str | None) -> int | None:
        return parse_mode(value)


class UploadParamsSerializer(UploadOptionsSerializer):
    """An upload's instance and options."""

    # The API says container (the seed's X-Container-Name); inside, everything says instance.
    container = serializers.CharField(max_length=63, trim_whitespace=True, source="instance")

    # The instance comes first, in the fields and so in the errors.
    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        return {"container": fields.pop("container"), **fields}

    def validate_container(self, value: str) -> str:
        if not INSTANCE_NAME.match(value):
            raise serializers.ValidationError(
                _(
                    "'%(name)s' is not a valid Incus instance name: 1-63 letters, digits and "
                    "hyphens, starting with a letter and not ending with a hyphen."
                )
                % {"name": value}
            )
        return value


def parse_upload_params(data: dict[str, Any]) -> dict[str, Any]:
    """Validate an upload's parameters (None: not given) into what UploadParamsSerializer
    gives: the plain cases cheaply, anything else (and every error) through the serializer.

    Building a serializer's fields costs more CPU than the rest of a small upload, and nearly
    every upload is a plain case; a test checks on generated input that the two agree.
    """
    plain = _plain_params(data)
    if plain is not None:
        return plain
    params = UploadParamsSerializer(data={k: v for k, v in data.items() if v is not None})
    params.is_valid(raise_exception=True)
    return dict(params.validated_data)


# What the cheap path accepts as it is: printable ASCII, no surrounding spaces, no NUL.
_PLAIN_TEXT = re.compile(r"^(?:[\x21-\x7e][\x20-\x7e]*[\x21-\x7e]|[\x21-\x7e])$")
_PLAIN_ID = re.compile(r"^[0-9]{1,10}$")
_PLAIN_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def parse_upload_options(data: dict[str, Any]) -> dict[str, Any]:
    """Validate an upload's parameters but its instance (`container` is ignored), as
    parse_upload_params does."""
    options = {k: v for k, v in data.items() if k != "container"}
    plain = _plain_options(options)
    if plain is not None:
        return plain
    params = UploadOptionsSerializer(data={k: v for k, v in options.items() if v is not None})
    params.is_valid(raise_exception=True)
    return dict(params.validated_data)


def _plain_params(data: dict[str, Any]) -> dict[str, Any] | None:
    """The validated parameters when every one is given in its plainest form, else None."""
    container = data.get("container")
    if not isinstance(container, str) or not INSTANCE_NAME.match(container):
        return None
    options = _plain_options(data)
    return None if options is None else {"instance": container, **options}


def _plain_options(data: dict[str, Any]) -> dict[str, Any] | None:
    """The validated parameters but the instance, when each is given in its plainest form."""
    path = data.get("path")
    if not isinstance(path, str) or not _PLAIN_TEXT.match(path):
        return None
    try:
        cleaned_path = clean_path(path)
    except serializers.ValidationError:
        return None
    project = data.get("project")
    if project is not None and (not isinstance(project, str) or not PROJECT_NAME.match(project)):
        return None
    remote = data.get("remote")
    if remote is not None and (
        not isinstance(remote, str)
        or not _PLAIN_TEXT.match(remote)
        or remote not in uploads_settings.remotes
    ):
        return None
    filename = data.get("filename")
    if filename is not None and (
        not isinstance(filename, str) or len(filename) > 4096 or not _PLAIN_TEXT.match(filename)
    ):
        return None
    mode = data.get("mode")
    if mode is not None and (not isinstance(mode, str) or not OCTAL_MODE.match(mode)):
        return None
    ids: dict[str, int | None] = {}
    for name in ("uid", "gid"):
        value = data.get(name)
        if value is not None:
            if not isinstance(value, str) or not _PLAIN_ID.match(value) or int(value) > MAX_ID:
                return None
            ids[name] = int(value)
        else:
            ids[name] = None
    create_dirs = data.get("create_dirs")
    if create_dirs is None:
        create = False
    elif create_dirs in serializers.BooleanField.TRUE_VALUES:
        create = True
    elif create_dirs in serializers.BooleanField.FALSE_VALUES:
        create = False
    else:
        return None
    sha256 = data.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _PLAIN_SHA256.match(sha256)):
        return None
    return {
        "path": cleaned_path,
        "project": project if project is not None else "default",
        "remote": remote if remote is not None else "local",
        "filename": posixpath.basename(filename.replace("\\", "/"))[:255] if filename else "",
        "mode": parse_mode(mode),
        "uid": ids["uid"],
        "gid": ids["gid"],
        "create_dirs": create,
        "sha256": sha256.lower() if sha256 else None,
    }


@extend_schema_field({"type": "string", "nullable": True, "example": "0644"})
class OctalModeField(serializers.Field):
    def to_representation(self, value: int) -> str:
        return f"{value:04o}"


def _datetime(value: datetime | None) -> str | None:
    """As DRF renders a DateTimeField: ISO 8601 in the current time zone, UTC as Z."""
    if value is None:
        return None
    text = timezone.localtime(value).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class UploadTaskSerializer(serializers.ModelSerializer[UploadTask]):
    """A task as the API shows it. The fields describe it (the OpenAPI schema is built from
    them); `to_representation` renders it without building them: building DRF fields for each
    task cost more CPU than the rest of a small upload together (a test keeps both in step)."""

    url = serializers.SerializerMethodField()
    container = serializers.CharField(source="instance")
    mode = OctalModeField(allow_null=True)

    def to_representation(self, instance: UploadTask) -> dict[str, Any]:
        task = instance
        return {
            "id": str(task.pk),
            "url": self.get_url(task),
            "status": task.status,
            "container": task.instance,
            "remote": task.remote,
            "project": task.project,
            "path": task.path,
            "filename": task.filename,
            "size": task.size,
            "sha256": task.sha256,
            "mode": None if task.mode is None else f"{task.mode:04o}",
            "uid": task.uid,
            "gid": task.gid,
            "create_dirs": task.create_dirs,
            "idempotency_key": task.idempotency_key,
            "attempts": task.attempts,
            "max_attempts": task.max_attempts,
            "last_error": task.last_error,
            "next_attempt_at": _datetime(task.next_attempt_at),
            "created_at": _datetime(task.created_at),
            "started_at": _datetime(task.started_at),
            "finished_at": _datetime(task.finished_at),
            "batch": None if task.batch_id is None else str(task.batch_id),
        }

    class Meta:
        model = UploadTask
        fields = [
            "id",
            "url",
            "status",
            "container",
            "remote",
            "project",
            "path",
            "filename",
            "size",
            "sha256",
            "mode",
            "uid",
            "gid",
            "create_dirs",
            "idempotency_key",
            "attempts",
            "max_attempts",
            "last_error",
            "next_attempt_at",
            "created_at",
            "started_at",
            "finished_at",
            "batch",
        ]
        read_only_fields = fields

    def get_url(self, obj: UploadTask) -> str:
        return reverse("upload-detail", args=[obj.pk], request=self.context.get("request"))


class BatchSerializer(serializers.ModelSerializer[UploadBatch]):
    """A fan-out: its destinations' tasks (in instance-name order), how many are in each
    state, and whether every one is finished. Expects `tasks` in its context."""

    url = serializers.SerializerMethodField()
    counts = serializers.SerializerMethodField()
    finished = serializers.SerializerMethodField()
    tasks = serializers.SerializerMethodField()

    class Meta:
        model = UploadBatch
        fields = ["id", "url", "count", "requested", "created_at", "counts", "finished", "tasks"]
        read_only_fields = fields

    def _tasks(self) -> list[UploadTask]:
        tasks: list[UploadTask] = self.context["tasks"]
        return tasks

    def get_url(self, obj: UploadBatch) -> str:
        return reverse("batch-detail", args=[obj.pk], request=self.context.get("request"))

    @extend_schema_field(
        {
            "type": "object",
            "properties": {status: {"type": "integer"} for status in Status.values},
            "description": "How many of the batch's tasks are in each state.",
        }
    )
    def get_counts(self, obj: UploadBatch) -> dict[str, int]:
        counts = dict.fromkeys(Status.values, 0)
        for task in self._tasks():
            counts[task.status] += 1
        return counts

    def get_finished(self, obj: UploadBatch) -> bool:
        return all(task.status in FINISHED for task in self._tasks())

    @extend_schema_field(UploadTaskSerializer(many=True))
    def get_tasks(self, obj: UploadBatch) -> list[dict[str, Any]]:
        render = UploadTaskSerializer(context=self.context)
        return [render.to_representation(task) for task in self._tasks()]


class RetryChangesSerializer(serializers.Serializer[dict[str, Any]]):
    """What a retry may correct about how the file is written; anything not given is kept."""

    create_dirs = serializers.BooleanField(required=False)
    mode = serializers.CharField(required=False, allow_null=True, help_text="octal, e.g. 0644")
    uid = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=MAX_ID)
    gid = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=MAX_ID)

    def validate_mode(self, value: str | None) -> int | None:
        return parse_mode(value)


class UploadListQuerySerializer(serializers.Serializer[dict[str, Any]]):
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    container = serializers.CharField(required=False, max_length=63)
    batch = serializers.UUIDField(required=False, help_text="Only the tasks of this batch")


# A glob over instance names: fnmatch's `*`, `?` and `[...]` (`[!...]` negates) among the
# characters of a name.
INSTANCE_GLOB = re.compile(r"^[A-Za-z0-9*?\[\]!-]{1,63}$")


def fanout_instances(value: str | list[str] | None) -> list[str] | None:
    """The instances an upload names, when it names several or a glob: a comma-separated list
    (the raw form's header), or repeated fields (multipart), each a name or a glob. None when
    it names one instance without glob characters (validated as ever, by parse_upload_params).
    """
    values = [value] if isinstance(value, str) else list(value or [])
    items = [item.strip() for text in values for item in text.split(",")]
    if not values or (len(values) == 1 and len(items) == 1 and not is_glob(items[0])):
        return None
    for item in items:
        if not item:
            raise serializers.ValidationError(
                {"container": [_("An empty instance name in the list.")]}
            )
        if is_glob(item):
            if not INSTANCE_GLOB.match(item):
                raise serializers.ValidationError(
                    {
                        "container": [
                            _(
                                "'%(glob)s' is not a glob over instance names: 1-63 letters, "
                                "digits, hyphens and * ? [ ] !."
                            )
                            % {"glob": item}
                        ]
                    }
                )
        elif not INSTANCE_NAME.match(item):
            raise serializers.ValidationError(
                {
                    "container": [
                        _(
                            "'%(name)s' is not a valid Incus instance name: 1-63 letters, "
                            "digits and hyphens, starting with a letter and not ending with "
                            "a hyphen."
                        )
                        % {"name": item}
                    ]
                }
            )
    return list(dict.fromkeys(items))
