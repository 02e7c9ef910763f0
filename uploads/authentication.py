"""Token authentication with an optional lifetime (UPLOADS['TOKEN_TTL_SECONDS'])."""

from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

from uploads.conf import uploads_settings


class ExpiringTokenAuthentication(TokenAuthentication):
    """DRF's token, refused once older than the configured lifetime.

    Revoking is deleting the token (admin, or `manage.py drf_create_token -r USER` to replace it).
    """

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        user, token = super().authenticate_credentials(key)
        ttl = uploads_settings.TOKEN_TTL_SECONDS
        if ttl and token.created < timezone.now() - timedelta(seconds=ttl):
            raise AuthenticationFailed("Token has expired; ask for a new one.")
        return user, token
