"""Parse upload parameters (headers or form fields) and render tasks as JSON."""

import copy
import posixpath
import re
from typing import Any, ClassVar

from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.reverse import reverse

from uploads.conf import uploads_settings
from uploads.grants import MAX_ID
from uploads.models import Status, UploadTask

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


class UploadParamsSerializer(serializers.Serializer[dict[str, Any]]):
    """What a client says about an upload, from either the raw form's headers or form fields."""

    container = serializers.CharField(max_length=63, trim_whitespace=True)
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
        if value is None or value == "":
            return None
        match = OCTAL_MODE.match(value.strip())
        if not match:
            raise serializers.ValidationError(
                _("'%(mode)s' is not an octal file mode between 0000 and 7777, e.g. 0644.")
                % {"mode": value}
            )
        return int(match.group(1), 8)


@extend_schema_field({"type": "string", "nullable": True, "example": "0644"})
class OctalModeField(serializers.Field):
    def to_representation(self, value: int) -> str:
        return f"{value:04o}"


class UploadTaskSerializer(serializers.ModelSerializer[UploadTask]):
    url = serializers.SerializerMethodField()
    container = serializers.CharField(source="instance")
    mode = OctalModeField(allow_null=True)

    # ModelSerializer inspects the model again for every instance, which was a fifth of the
    # CPU of a small upload; the fields it builds never change, so build them once per class
    # and hand each instance its own copies (what Serializer does with declared fields).
    _built_fields: ClassVar[dict[str, serializers.Field] | None] = None

    def get_fields(self) -> dict[str, serializers.Field]:
        cls = type(self)
        if cls._built_fields is None:
            cls._built_fields = super().get_fields()
        return copy.deepcopy(cls._built_fields)

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
        ]
        read_only_fields = fields

    def get_url(self, obj: UploadTask) -> str:
        return reverse("upload-detail", args=[obj.pk], request=self.context.get("request"))


class UploadListQuerySerializer(serializers.Serializer[dict[str, Any]]):
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    container = serializers.CharField(required=False, max_length=63)
