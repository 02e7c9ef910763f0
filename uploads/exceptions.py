"""HTTP errors of the upload API, each rendered by DRF as a JSON body with a `detail`."""

import logging
from typing import Any

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.translation import gettext_lazy as _
from django.views import defaults
from rest_framework import status
from rest_framework.exceptions import APIException, NotFound, PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from uploads.conf import uploads_settings

logger = logging.getLogger(__name__)


class LengthRequired(APIException):
    status_code = status.HTTP_411_LENGTH_REQUIRED
    default_detail = _("A Content-Length header is required.")
    default_code = "length_required"


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = _("The upload is larger than the server accepts.")
    default_code = "too_large"


class InsufficientStorage(APIException):
    status_code = status.HTTP_507_INSUFFICIENT_STORAGE
    default_detail = _("The server has no room for this upload right now; try again later.")
    default_code = "insufficient_storage"


class QueueFull(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = _("Too many uploads are waiting to be delivered; try again later.")
    default_code = "queue_full"

    def __init__(self, wait: int) -> None:
        super().__init__()
        # DRF's exception handler turns `wait` into a Retry-After header.
        self.wait = wait


class IncusUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = _("Incus could not be asked which instances exist; try again later.")
    default_code = "incus_unavailable"

    def __init__(self, detail: str, wait: int) -> None:
        super().__init__(detail)
        self.wait = wait


class StorageUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = _("The storage for uploads is out of reach; try again later.")
    default_code = "storage_unavailable"

    def __init__(self, detail: str, wait: int) -> None:
        super().__init__(detail)
        self.wait = wait


class IncompleteBody(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = _("The request body ended before it was complete.")
    default_code = "incomplete_body"


class BodyTimeout(APIException):
    status_code = status.HTTP_408_REQUEST_TIMEOUT
    default_detail = _("The client stopped sending the body; nothing was kept.")
    default_code = "body_timeout"


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


class IdempotencyKeyReused(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "idempotency_key_reused"


class Gone(APIException):
    status_code = status.HTTP_410_GONE
    default_code = "gone"


def as_http_error(exc: Exception) -> Exception:
    """The HTTP answer to an error of the service's own (uploads.services); others unchanged."""
    from uploads import services, spool  # which import the exceptions the API raises

    if isinstance(exc, services.TaskStateError):
        return Conflict(str(exc))
    if isinstance(exc, services.SpoolFileMissing):
        return Gone(str(exc))
    if isinstance(exc, services.NotGranted):
        return PayloadTooLarge(str(exc)) if exc.too_large else PermissionDenied(str(exc))
    if isinstance(exc, spool.SpoolFull):
        return InsufficientStorage()
    if isinstance(exc, spool.SpoolUnavailable):
        logger.warning("spool unavailable: %s", exc)
        return StorageUnavailable(
            "The storage for uploads is out of reach; try again later.",
            wait=uploads_settings.RETRY_AFTER_SECONDS,
        )
    if isinstance(exc, services.NoMatchingInstance):
        return NotFound(str(exc))
    if isinstance(exc, services.TooManyDestinations):
        return ValidationError({"container": [str(exc)]})
    return exc


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus: the service's own errors get their status here, in one place
    (a state that forbids the change → 409, a body gone → 410, no grant → 403, too large → 413);
    a database that is down or restarting is a 503 to retry, not a 500."""
    exc = as_http_error(exc)
    if isinstance(exc, (OperationalError, InterfaceError)):
        logger.warning("database unavailable: %s", exc)
        response = Response(
            {"detail": "The service's database is unavailable; try again shortly."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(uploads_settings.RETRY_AFTER_SECONDS)},
        )
        return response
    return drf_exception_handler(exc, context)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 page, but JSON under /api/, where every answer is JSON (an id that is not
    one, a URL that names nothing)."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse(
            {"detail": "The server failed to answer; the error is logged."},
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    return defaults.server_error(request)
