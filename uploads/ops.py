"""Operational endpoints: /healthz for load balancers and orchestrators, /metrics for
Prometheus. Both are unauthenticated and reveal no instance names or paths."""

import os
from typing import Any

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from uploads import metrics, spool
from uploads.conf import uploads_settings
from uploads.incus import IncusPusher

HEALTH_TIMEOUT = 3.0


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}"
    return None


def _check_remote(name: str) -> str | None:
    pusher = IncusPusher.for_remote(name, timeout=HEALTH_TIMEOUT)
    try:
        return pusher.check()
    finally:
        pusher.close()


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, Any] = {
        "database": _check_database() or "ok",
        "spool": spool.problem() or "ok",
        "incus": {name: _check_remote(name) or "ok" for name in uploads_settings.remotes},
    }
    healthy = (
        checks["database"] == "ok"
        and checks["spool"] == "ok"
        and all(v == "ok" for v in checks["incus"].values())
    )
    return JsonResponse(
        {"status": "ok" if healthy else "unhealthy", "pid": os.getpid(), "checks": checks},
        status=200 if healthy else 503,
    )


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    body, content_type = metrics.render()
    return HttpResponse(body, content_type=content_type)
