"""The upload API: thin views that parse a request, call a service and render the task."""

import functools
import uuid
from collections.abc import Callable, Collection
from typing import Any, cast

from django.contrib.auth.models import User
from django.http import HttpRequest, QueryDict
from django.http.response import HttpResponseBase
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
)
from rest_framework import mixins, status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import action
from rest_framework.exceptions import (
    APIException,
    NotFound,
    PermissionDenied,
    UnsupportedMediaType,
    ValidationError,
)
from rest_framework.parsers import BaseParser, FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from uploads import incus, metrics, selectors, services, spool
from uploads.access import Access, StaleAccess
from uploads.access import cache as access_cache
from uploads.audit import audit
from uploads.authentication import CachedTokenAuthentication, user_of
from uploads.conf import uploads_settings
from uploads.exceptions import (
    BodyTimeout,
    IdempotencyKeyReused,
    IncompleteBody,
    IncusUnavailable,
    InsufficientStorage,
    LengthRequired,
    PayloadTooLarge,
    QueueFull,
    StorageUnavailable,
    as_http_error,
)
from uploads.headers import (
    content_length,
    expected_sha256,
    idempotency_key,
    is_chunked,
    timed_out,
    wait_seconds,
)
from uploads.headers import source as request_source
from uploads.models import UploadBatch, UploadTask
from uploads.pushers import PermanentPushError, PushError
from uploads.serializers import (
    BatchSerializer,
    RetryChangesSerializer,
    UploadListQuerySerializer,
    UploadTaskSerializer,
    fanout_instances,
    parse_upload_options,
    parse_upload_params,
)
from uploads.waiting import TooManyWaiters, waiters
from uploads.wsgi import ENVIRON_KEY

# Raw-form headers → parameter names (the seed's X-Container-Name / X-File-Path / X-Host-Path).
RAW_HEADERS = {
    "HTTP_X_CONTAINER_NAME": "container",
    "HTTP_X_FILE_PATH": "path",
    "HTTP_X_HOST_PATH": "filename",
    "HTTP_X_FILE_MODE": "mode",
    "HTTP_X_FILE_UID": "uid",
    "HTTP_X_FILE_GID": "gid",
    "HTTP_X_CREATE_DIRS": "create_dirs",
    "HTTP_X_INCUS_PROJECT": "project",
    "HTTP_X_INCUS_REMOTE": "remote",
}
FORM_FIELDS = (
    "container",
    "path",
    "mode",
    "uid",
    "gid",
    "create_dirs",
    "project",
    "remote",
    "sha256",
)

RAW_UPLOAD_PARAMETERS = [
    OpenApiParameter(
        "Idempotency-Key",
        str,
        OpenApiParameter.HEADER,
        description=(
            "Any string of 1-255 printable ASCII characters, unique per upload. A resend with "
            "the same key (after a lost answer or a 503) gets the first upload's task back, "
            "with `Idempotent-Replayed: true`, instead of queueing the file twice. "
            "Both upload forms."
        ),
    ),
    OpenApiParameter(
        "X-Container-Name",
        str,
        OpenApiParameter.HEADER,
        description=(
            "Instance name; or several, comma-separated, and globs (`web-*`): the body is "
            "then stored once and delivered to each (a batch)"
        ),
    ),
    OpenApiParameter(
        "X-File-Path", str, OpenApiParameter.HEADER, description="Absolute destination path"
    ),
    OpenApiParameter(
        "X-Host-Path",
        str,
        OpenApiParameter.HEADER,
        description="Client's own path (basename kept, display only)",
    ),
    OpenApiParameter(
        "X-File-Mode", str, OpenApiParameter.HEADER, description="Octal mode such as 0644"
    ),
    OpenApiParameter("X-File-Uid", int, OpenApiParameter.HEADER),
    OpenApiParameter("X-File-Gid", int, OpenApiParameter.HEADER),
    OpenApiParameter(
        "X-Create-Dirs",
        bool,
        OpenApiParameter.HEADER,
        description="Create missing parent directories",
    ),
    OpenApiParameter(
        "X-Incus-Project",
        str,
        OpenApiParameter.HEADER,
        description="Incus project (default 'default')",
    ),
    OpenApiParameter(
        "X-Incus-Remote",
        str,
        OpenApiParameter.HEADER,
        description="A configured Incus remote (default 'local')",
    ),
    OpenApiParameter(
        "Repr-Digest",
        str,
        OpenApiParameter.HEADER,
        description="RFC 9530 digest, e.g. sha-256=:<base64>: (a mismatch is refused)",
    ),
    OpenApiParameter(
        "X-Content-SHA256",
        str,
        OpenApiParameter.HEADER,
        description="Hex SHA-256 of the body (a mismatch is refused)",
    ),
]


# What each error status of the upload means (the README's table, for the OpenAPI schema).
ERRORS = {
    400: "A missing or invalid parameter (the body names the field), a multipart body without "
    "`file`, a body shorter than its Content-Length, or a digest that does not match.",
    401: "No, bad, revoked or expired credentials.",
    403: "No grant lets you write there (to one of the instances named, for a fan-out).",
    404: "A glob matched no instance you may write the file to, or the project does not exist.",
    408: "The client stopped sending the body.",
    411: "No Content-Length and a body the server cannot read as chunked.",
    413: "Larger than the server or your grant accepts (answered before the body is read).",
    415: "A form-encoded or JSON body.",
    422: "An Idempotency-Key already used for an upload to a different destination.",
    503: "Too many uploads waiting, the database is unavailable, or Incus could not list the "
    "instances a glob is matched against, or the spool's object store is out of reach (see "
    "Retry-After).",
    507: "No room on the spool's filesystem (or the object store refused the body for space).",
}


class RawBodyParser(BaseParser):
    """Claims every non-multipart body without reading it: the view streams it to the spool.

    Without it, anything that touches `request.POST` (the CSRF check of session auth does)
    would make DRF look for a parser and answer 415 to a raw upload.
    """

    media_type = "*/*"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        return {}


def _check_capacity(request: Request, copies: int = 1) -> int | None:
    """The checks answered before a single byte of the body is read. `copies`: how many tasks
    will carry the body."""
    length = content_length(request)
    max_size = uploads_settings.MAX_UPLOAD_SIZE
    if length is None and not is_chunked(request):
        raise LengthRequired()
    if length is not None and length > max_size:
        raise PayloadTooLarge(
            f"The upload is {length} bytes; this server accepts at most {max_size} bytes."
        )
    if selectors.pending_count_recent() >= uploads_settings.MAX_PENDING:
        raise QueueFull(wait=uploads_settings.RETRY_AFTER_SECONDS)
    small = length is not None and _inline(length, copies)
    if not small and not spool.has_room_for(length or 0):  # a small body needs no spool
        raise InsufficientStorage()
    return length


def _inline(length: int, copies: int) -> bool:
    """Whether a body travels in its tasks' rows: while the copies together are small."""
    return length * copies <= uploads_settings.INLINE_MAX_BYTES


def _validated(data: dict[str, Any]) -> dict[str, Any]:
    """The upload's parameters; for one naming several instances or a glob (a fan-out), the
    options with the instances as requested under `instances`."""
    instances = fanout_instances(data.get("container"))
    if instances is None:
        if isinstance(data.get("container"), list):  # one multipart field
            data = {**data, "container": data["container"][0]}
        return parse_upload_params(data)
    return {**parse_upload_options(data), "instances": instances}


def _upload_options(params: dict[str, Any]) -> dict[str, Any]:
    """What services.upload_fanout takes of a fan-out's parameters."""
    return {name: value for name, value in params.items() if name != "instances"}


def _verify_digest(params: dict[str, Any], spooled: spool.SpooledFile) -> None:
    expected = params.pop("sha256", None)
    if expected and expected != spooled.sha256:
        spool.remove(spooled.name)
        raise ValidationError(
            {
                "sha256": [
                    f"The body's SHA-256 is {spooled.sha256}, not {expected} as announced; "
                    "nothing was queued."
                ]
            }
        )


def _check_granted(request: Request, params: dict[str, Any], size: int | None) -> None:
    destination = {
        "remote": params["remote"],
        "project": params["project"],
        "instance": params["instance"],
        "path": params["path"],
        "size": size,
        "uid": params["uid"],
        "gid": params["gid"],
    }
    cached = request.auth if isinstance(request.auth, Access) else None
    if cached is not None:
        permission = selectors.check_grants(cached.grants, **destination)
        if not permission.allowed:
            # Grants cached in this process may miss one added since: refuse only on fresh ones.
            access_cache.forget(cached.key)
            request.user, fresh = user_of(access_cache.load(cached.key))
            request.auth = fresh
            permission = selectors.check_grants(fresh.grants, **destination)
    else:
        permission = selectors.upload_permission(user=request.user, **destination)
    if not permission.allowed:
        raise services.NotGranted(permission.reason, too_large=permission.too_large)


def _listing(request: Request, remote: str, project: str) -> list[str]:
    """The instances of a project on a remote, asked of Incus once per request."""
    listed: dict[tuple[str, str], list[str]] = request._request.__dict__.setdefault(
        "uploads_listed", {}
    )
    if (remote, project) not in listed:
        try:
            listed[remote, project] = incus.instance_names(remote=remote, project=project)
        except PermanentPushError as exc:
            raise NotFound(exc.message) from exc
        except PushError as exc:
            raise IncusUnavailable(exc.message, wait=uploads_settings.RETRY_AFTER_SECONDS) from exc
    return listed[remote, project]


def _destinations(request: Request, params: dict[str, Any], size: int | None) -> list[str]:
    """The instances a fan-out goes to (services.fanout_destinations), checked against the
    grants as _check_granted does: refused on cached grants, checked again on fresh ones."""

    def resolve(grants: selectors.OwnerGrants) -> list[str]:
        return services.fanout_destinations(
            grants,
            requested=params["instances"],
            list_instances=lambda: _listing(request, params["remote"], params["project"]),
            remote=params["remote"],
            project=params["project"],
            path=params["path"],
            size=size,
            uid=params["uid"],
            gid=params["gid"],
        )

    cached = request.auth if isinstance(request.auth, Access) else None
    if cached is None:
        user = cast(User, request.user)
        return resolve(selectors.owner_grants([user.pk])[user.pk])
    try:
        return resolve(cached.grants)
    except (services.NotGranted, services.NoMatchingInstance):
        # Grants cached in this process may miss one added since: refuse only on fresh ones.
        access_cache.forget(cached.key)
        request.user, fresh = user_of(access_cache.load(cached.key))
        request.auth = fresh
        return resolve(fresh.grants)


def _raw_params(request: Request) -> dict[str, Any]:
    raw = {name: request.META.get(h) for h, name in RAW_HEADERS.items()}
    return _validated({**raw, "sha256": expected_sha256(request)})


def _check_same_upload(params: dict[str, Any], earlier: UploadTask | UploadBatch) -> None:
    """A resend must name the destination the key was first used for (for a fan-out: the
    instances as it named them)."""
    requested = ",".join(params["instances"]) if "instances" in params else params["instance"]
    sent = (params["remote"], params["project"], requested, params["path"])
    if isinstance(earlier, UploadBatch):
        task = selectors.batch_tasks(earlier).first()
        instances, what = earlier.requested, f"batch {earlier.pk}"
    else:
        task, instances, what = earlier, earlier.instance, f"upload {earlier.pk}"
    if task is None or sent != (task.remote, task.project, instances, task.path):
        where = "" if task is None else f" to {task.remote}:{task.project}/{instances}:{task.path}"
        raise IdempotencyKeyReused(
            f"This Idempotency-Key was used for {what}{where}; use a new key for a different "
            "upload."
        )


def _hold(
    ids: Collection[uuid.UUID], seconds: float, unfinished: Callable[[], Collection[uuid.UUID]]
) -> dict[str, str]:
    """Hold a `?wait=` answer until the tasks `ids` finished or `seconds` passed: the headers
    that say how the wait ended (timed out, or turned away because too many requests wait)."""
    try:
        if not waiters.wait(ids, seconds, unfinished):
            return {"Wait-Timed-Out": "true"}
    except TooManyWaiters:
        return {"Retry-After": "1"}
    return {}


class UploadViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[UploadTask]
):
    serializer_class = UploadTaskSerializer
    parser_classes = [MultiPartParser, RawBodyParser]
    lookup_value_regex = r"[0-9a-fA-F-]{32,36}"

    def get_queryset(self) -> Any:
        return selectors.visible_tasks(user=self.request.user)

    def initialize_request(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Request:
        drf_request = super().initialize_request(request, *args, **kwargs)
        if self.action == "create":
            # Only an upload streams its file part into the spool; every other form in the
            # service is parsed by Django's own handlers, which clean up after themselves.
            request.upload_handlers = [spool.SpoolUploadHandler(request)]
            # An upload's INSERT verifies that the token and grants it was checked against are
            # still current, so they may come from the process's cache (uploads.access).
            drf_request.authenticators = (CachedTokenAuthentication(), SessionAuthentication())
        return drf_request

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            return super().dispatch(request, *args, **kwargs)
        finally:
            # A form can be read before the view runs (the CSRF check of session auth reads
            # it) and refused anywhere after: whatever no task took is deleted here.
            spool.discard_unkept(request)

    def get_object(self) -> UploadTask:
        try:
            return super().get_object()
        except (ValueError, ValidationError) as exc:
            raise NotFound() from exc

    def _changeable_object(self) -> UploadTask:
        task = self.get_object()
        if not selectors.may_change_task(self.request.user, task):
            raise PermissionDenied(
                "You may see this upload but not change it: retrying or cancelling another "
                "user's upload needs the permission to change uploads."
            )
        return task

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "wait",
                int,
                OpenApiParameter.QUERY,
                description=(
                    "Hold the answer up to this many seconds (1-60) until the upload is "
                    "finished (succeeded, failed or cancelled); an unfinished upload is then "
                    "answered with `Wait-Timed-Out: true`. When the server already holds too "
                    "many waiting requests it answers at once, with `Retry-After`."
                ),
            )
        ],
        responses={200: UploadTaskSerializer, 400: OpenApiResponse(), 404: OpenApiResponse()},
    )
    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        wait = wait_seconds(request)
        task = self.get_object()
        headers = {}
        if wait and not task.is_finished:

            def unfinished() -> list[uuid.UUID]:
                task.refresh_from_db(fields=["status"])
                return [] if task.is_finished else [task.pk]

            headers = _hold([task.pk], wait, unfinished)
            task.refresh_from_db()
        return Response(self.get_serializer(task).data, headers=headers)

    @extend_schema(parameters=[UploadListQuerySerializer])
    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        query = UploadListQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        tasks = selectors.task_list(user=request.user, **query.validated_data)
        page = self.paginate_queryset(tasks)
        serializer = self.get_serializer(page, many=True)
        return self.get_paginated_response(serializer.data)

    @extend_schema(
        summary="Upload a file for delivery into an Incus instance",
        description=(
            "Either a raw body (any Content-Type but forms; parameters in X-* headers) or "
            "multipart/form-data with a `file` part. Answers 202 as soon as the body is spooled: "
            "with the task, or, for several instances or a glob (a fan-out), with the batch "
            "(`Location: /api/batches/<id>/`) and its tasks, one per instance."
        ),
        parameters=RAW_UPLOAD_PARAMETERS,
        request={
            "application/octet-stream": OpenApiTypes.BINARY,
            "multipart/form-data": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "container": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "An instance, or several (repeated), names or globs",
                    },
                    "path": {"type": "string"},
                    "mode": {"type": "string"},
                    "uid": {"type": "integer"},
                    "gid": {"type": "integer"},
                    "create_dirs": {"type": "boolean"},
                    "project": {"type": "string"},
                    "remote": {"type": "string"},
                    "sha256": {
                        "type": "string",
                        "description": "Hex SHA-256 of the file (a mismatch is refused)",
                    },
                },
                "required": ["file", "container", "path"],
            },
        },
        responses={
            202: PolymorphicProxySerializer(
                component_name="Accepted",
                serializers=[UploadTaskSerializer, BatchSerializer],
                resource_type_field_name=None,
                many=False,
            ),
            400: OpenApiResponse(description=ERRORS[400]),
            401: OpenApiResponse(description=ERRORS[401]),
            403: OpenApiResponse(description=ERRORS[403]),
            404: OpenApiResponse(description=ERRORS[404]),
            408: OpenApiResponse(description=ERRORS[408]),
            411: OpenApiResponse(description=ERRORS[411]),
            413: OpenApiResponse(description=ERRORS[413]),
            415: OpenApiResponse(description=ERRORS[415]),
            422: OpenApiResponse(description=ERRORS[422]),
            503: OpenApiResponse(description=ERRORS[503]),
            507: OpenApiResponse(description=ERRORS[507]),
        },
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            return self._create(request)
        except Exception as error:
            exc = as_http_error(error)
            if not isinstance(exc, APIException):
                raise
            metrics.UPLOADS_REFUSED.labels(status=str(exc.status_code)).inc()
            audit(
                action="upload",
                outcome="refused",
                user=request.user,
                source=request_source(request),
                status=exc.status_code,
                reason=exc.detail,
            )
            raise

    def _create(self, request: Request) -> Response:
        content_type = request.content_type.split(";")[0].strip().lower()
        owner = cast(User, request.user)  # IsAuthenticated has run
        key = idempotency_key(request)
        earlier: UploadTask | UploadBatch | None = None
        if key:
            earlier = selectors.task_by_idempotency_key(
                owner=owner, key=key
            ) or selectors.batch_by_idempotency_key(owner=owner, key=key)
        if content_type == "multipart/form-data":
            params, spooled = self._receive_multipart(request)
            if earlier is not None:
                # A resend: its fields came in the body, so the body had to be read to compare
                # them; the part it brought is not kept.
                _check_same_upload(params, earlier)
                return self._replayed(request, earlier)
            self._check_multipart(request, params, spooled)
        elif content_type in ("application/x-www-form-urlencoded", "application/json"):
            raise UnsupportedMediaType(
                content_type,
                detail=(
                    f"'{content_type}' is not an upload. Send the file as the raw body "
                    "(e.g. application/octet-stream) or as multipart/form-data."
                ),
            )
        elif earlier is not None:
            # A resend (the answer to the first one was lost): the body is not read again.
            _check_same_upload(_raw_params(request), earlier)
            return self._replayed(request, earlier)
        else:
            params, spooled = self._receive_raw(request)
        cached = request.auth if isinstance(request.auth, Access) else None
        if "instances" in params:
            return self._create_fanout(request, owner, key, params, spooled)
        create = functools.partial(
            services.upload_create,
            spooled=spooled,
            idempotency_key=key,
            source=request_source(request),
            **params,
        )
        try:
            try:
                task = create(owner=owner, generation=cached.generation if cached else None)
            except StaleAccess:
                # Tokens, users or grants changed since this process cached them (only a
                # cached access can be stale): check again, from the database.
                task = create(
                    owner=self._recheck_access(request, cast(Access, cached), params, spooled)
                )
        except services.DuplicateUpload as exc:  # a resend that raced the first one
            _check_same_upload(params, exc.task)
            return self._replayed(request, exc.task)
        spool.keep(request._request, spooled.name)
        metrics.UPLOADS_ACCEPTED.inc()
        metrics.UPLOAD_BYTES.inc(task.size)
        return self._accepted(task)

    def _create_fanout(
        self,
        request: Request,
        owner: User,
        key: str,
        params: dict[str, Any],
        spooled: spool.SpooledFile,
    ) -> Response:
        cached = request.auth if isinstance(request.auth, Access) else None
        destinations = params.pop("destinations")
        create = functools.partial(
            services.upload_fanout,
            spooled=spooled,
            requested=",".join(params["instances"]),
            idempotency_key=key,
            source=request_source(request),
            **_upload_options(params),
        )
        try:
            try:
                batch = create(
                    owner=owner,
                    instances=destinations,
                    generation=cached.generation if cached else None,
                )
            except StaleAccess:
                # As for one upload: check again from the database, the glob's matches too.
                owner = self._reload_access(request, cast(Access, cached), spooled)
                try:
                    destinations = _destinations(request, params, spooled.size)
                except BaseException:
                    spool.remove(spooled.name)
                    raise
                batch = create(owner=owner, instances=destinations)
        except services.DuplicateBatch as exc:  # a resend that raced the first one
            _check_same_upload(params, exc.batch)
            return self._replayed(request, exc.batch)
        spool.keep(request._request, spooled.name)
        metrics.UPLOADS_ACCEPTED.inc()
        metrics.UPLOAD_BYTES.inc(spooled.size)  # received once, however many destinations
        return self._accepted(batch)

    def _reload_access(self, request: Request, cached: Access, spooled: spool.SpooledFile) -> User:
        """The request's token, user and grants fresh from the database (the body is deleted
        if the token is gone)."""
        access_cache.forget(cached.key)
        try:
            user, request.auth = user_of(access_cache.load(cached.key))
        except APIException:
            spool.remove(spooled.name)
            raise
        request.user = user
        return cast(User, user)

    def _recheck_access(
        self, request: Request, cached: Access, params: dict[str, Any], spooled: spool.SpooledFile
    ) -> User:
        user = self._reload_access(request, cached, spooled)
        try:
            _check_granted(request, params, spooled.size)
        except (APIException, services.NotGranted):
            spool.remove(spooled.name)
            raise
        return user

    def _accepted(self, accepted: UploadTask | UploadBatch, **headers: str) -> Response:
        if isinstance(accepted, UploadBatch):
            location = reverse("batch-detail", args=[accepted.pk])
            data = batch_data(accepted, request=self.request)
        else:
            location = reverse("upload-detail", args=[accepted.pk])
            data = self.get_serializer(accepted).data
        return Response(
            data, status=status.HTTP_202_ACCEPTED, headers={"Location": location, **headers}
        )

    def _replayed(self, request: Request, earlier: UploadTask | UploadBatch) -> Response:
        audit(
            action="upload",
            outcome="replayed",
            user=request.user,
            source=request_source(request),
            **(
                {"batch_id": str(earlier.pk)}
                if isinstance(earlier, UploadBatch)
                else {"task_id": earlier.pk}
            ),
        )
        return self._accepted(earlier, **{"Idempotent-Replayed": "true"})

    def _receive_raw(self, request: Request) -> tuple[dict[str, Any], spool.SpooledFile]:
        params = _raw_params(request)
        copies = 1
        if "instances" in params:
            params["destinations"] = _destinations(request, params, content_length(request))
            copies = len(params["destinations"])
        else:
            _check_granted(request, params, content_length(request))
        length = _check_capacity(request, copies)
        environ = request._request.META
        if length is None:
            # Django reads a chunked body as empty (ticket #35838); read the server's own
            # de-chunked input when it promises to end it (granian sets wsgi.input_terminated).
            if not environ.get("wsgi.input_terminated"):
                raise LengthRequired(
                    "This server cannot read a chunked body; send a Content-Length."
                )
            read = environ["wsgi.input"].read
        else:
            read = request._request.read
        try:
            if length is not None and _inline(length, copies):
                spooled = spool.read_small(read, expected=length)
            else:
                spooled = spool.spool_stream(
                    read, expected=length, max_size=uploads_settings.MAX_UPLOAD_SIZE
                )
        except spool.BodyTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except spool.SpoolFull as exc:
            raise InsufficientStorage() from exc
        except spool.SpoolUnavailable as exc:
            raise StorageUnavailable(str(exc), wait=uploads_settings.RETRY_AFTER_SECONDS) from exc
        except spool.TruncatedBody as exc:
            if timed_out(exc):
                raise BodyTimeout() from exc
            raise IncompleteBody(str(exc)) from exc
        if length is None:
            try:  # the size of a chunked body
                if "instances" in params:
                    params["destinations"] = _destinations(request, params, spooled.size)
                else:
                    _check_granted(request, params, spooled.size)
            except BaseException:
                spool.remove(spooled.name)
                raise
        _verify_digest(params, spooled)
        return params, spooled

    def _receive_multipart(self, request: Request) -> tuple[dict[str, Any], spool.SpooledFile]:
        """Read the form: its file part goes to the spool as it arrives. What is not kept for a
        task is deleted when the request ends, whatever refused it (see `dispatch`)."""
        length = _check_capacity(request)
        if length is None:
            raise LengthRequired("A multipart upload needs a Content-Length.")
        django_request = request._request
        try:
            form: QueryDict = request.POST
            files = request.FILES
        except spool.BodyTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except spool.SpoolFull as exc:
            raise InsufficientStorage() from exc
        except spool.SpoolUnavailable as exc:
            raise StorageUnavailable(str(exc), wait=uploads_settings.RETRY_AFTER_SECONDS) from exc
        except OSError as exc:  # UnreadablePostError: reset, or the read timed out
            if timed_out(exc):
                raise BodyTimeout() from exc
            raise IncompleteBody(f"the connection failed while reading the body: {exc}") from exc
        counter = django_request.META.get(ENVIRON_KEY)
        if counter is not None and counter.bytes_read < length:
            raise IncompleteBody(
                f"the body ended after {counter.bytes_read} of {length} bytes (Content-Length)"
            )
        upload = files.get("file")
        if not isinstance(upload, spool.SpooledUpload):
            raise ValidationError({"file": ["A 'file' part is required."]})
        data: dict[str, Any] = {name: form.get(name) for name in FORM_FIELDS}
        data["container"] = form.getlist("container") or None
        data["filename"] = upload.name or ""
        return _validated(data), upload.spooled

    def _check_multipart(
        self, request: Request, params: dict[str, Any], spooled: spool.SpooledFile
    ) -> None:
        # Multipart fields arrive in the body, so these checks can only run after it.
        if "instances" in params:
            params["destinations"] = _destinations(request, params, spooled.size)
        else:
            _check_granted(request, params, spooled.size)
        _verify_digest(params, spooled)

    @extend_schema(
        request=RetryChangesSerializer,
        responses={
            200: UploadTaskSerializer,
            400: OpenApiResponse(description="A correction is not valid."),
            403: OpenApiResponse(description="No grant allows the upload (as corrected)."),
            404: OpenApiResponse(description="No such upload of yours."),
            409: OpenApiResponse(description="Only failed or cancelled uploads are retried."),
            410: OpenApiResponse(description="The uploaded file is gone: upload it again."),
        },
    )
    @action(detail=True, methods=["post"], parser_classes=[JSONParser, FormParser, MultiPartParser])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """Queue a failed or cancelled upload again, optionally correcting create_dirs, mode,
        uid or gid (checked against your grants as for a new upload)."""
        task = self._changeable_object()
        corrections = RetryChangesSerializer(data=request.data)
        corrections.is_valid(raise_exception=True)
        task = services.upload_retry(
            task=task,
            actor=request.user,
            source=request_source(request),
            changes=dict(corrections.validated_data),
        )
        return Response(self.get_serializer(task).data)

    @extend_schema(
        request=None,
        responses={
            200: UploadTaskSerializer,
            403: OpenApiResponse(description="You may see this upload but not change it."),
            404: OpenApiResponse(description="No such upload of yours."),
            409: OpenApiResponse(description="Only pending uploads are cancelled."),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        task = self._changeable_object()
        task = services.upload_cancel(task=task, actor=request.user, source=request_source(request))
        return Response(self.get_serializer(task).data)


def batch_data(batch: UploadBatch, *, request: Request) -> Any:
    tasks = list(selectors.batch_tasks(batch))
    return BatchSerializer(batch, context={"request": request, "tasks": tasks}).data


class BatchViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet[UploadBatch]):
    """One upload fanned out to several instances: its tasks and how they stand."""

    serializer_class = BatchSerializer
    lookup_value_regex = r"[0-9a-fA-F-]{32,36}"

    def get_queryset(self) -> Any:
        return selectors.visible_batches(user=self.request.user)

    def get_object(self) -> UploadBatch:
        try:
            return super().get_object()
        except (ValueError, ValidationError) as exc:
            raise NotFound() from exc

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "wait",
                int,
                OpenApiParameter.QUERY,
                description=(
                    "Hold the answer up to this many seconds (1-60) until every task of the "
                    "batch is finished; otherwise as for one upload's `wait`."
                ),
            )
        ],
        responses={200: BatchSerializer, 400: OpenApiResponse(), 404: OpenApiResponse()},
    )
    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        wait = wait_seconds(request)
        batch = self.get_object()
        headers = {}
        if wait:
            ids = list(selectors.batch_tasks(batch).values_list("pk", flat=True))
            headers = _hold(ids, wait, lambda: selectors.unfinished_tasks(ids))
        return Response(batch_data(batch, request=request), headers=headers)
