"""Request throttling that holds across every web process: the counts live in the database."""

from typing import Any

from django.core.cache import caches
from rest_framework.throttling import UserRateThrottle

THROTTLE_CACHE = "throttle"


class SharedUserRateThrottle(UserRateThrottle):
    """DRF's per-user rate, counted in the `throttle` cache (Django's database cache), which all
    web processes and hosts share; the default local-memory cache counts per process, so with
    N processes a user got N times the rate. Concurrent requests of one user may still be
    counted a few short: DRF reads and writes the history without a lock."""

    @property
    def cache(self) -> Any:  # type: ignore[override]
        return caches[THROTTLE_CACHE]
