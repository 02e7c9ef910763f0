"""Token authentication with an optional lifetime (UPLOADS['TOKEN_TTL_SECONDS']), and the
variant uploads use, which keeps tokens in the process (uploads.access)."""

import copy
from datetime import timedelta
from typing import Any

from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from rest_framework.authentication import TokenAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed

from uploads import access
from uploads.conf import uploads_settings


class ExpiringTokenAuthentication(TokenAuthentication):
    """DRF's token, refused once older than the configured lifetime, sent as
    `Authorization: Token <key>` or, as most API clients do, `Authorization: Bearer <key>`.

    Revoking is deleting the token (admin, or `manage.py drf_create_token -r USER` to replace it).
    """

    def authenticate(self, request: Any) -> tuple[Any, Any] | None:
        scheme = get_authorization_header(request).split()[:1]
        if scheme and scheme[0].lower() == b"bearer":
            bearer = copy.copy(self)
            bearer.keyword = "Bearer"
            return TokenAuthentication.authenticate(bearer, request)
        return super().authenticate(request)

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        user, token = super().authenticate_credentials(key)
        check_lifetime(token)
        return user, token


def check_lifetime(token: Any) -> None:
    ttl = uploads_settings.TOKEN_TTL_SECONDS
    if ttl and token.created < timezone.now() - timedelta(seconds=ttl):
        raise AuthenticationFailed("Token has expired; ask for a new one.")


class CachedTokenAuthentication(ExpiringTokenAuthentication):
    """The same token check against the process's cache of tokens and grants; `request.auth`
    is then the Access, whose generation the upload's INSERT verifies (uploads.access)."""

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        found = access.cache.get(key) or access.cache.load(key)
        return user_of(found)


def user_of(found: "access.Access | None") -> tuple[Any, Any]:
    """(user, access) for a found access, as DRF's token check would accept it."""
    if found is None:
        raise AuthenticationFailed(_("Invalid token."))
    if not found.user.is_active:
        raise AuthenticationFailed(_("User inactive or deleted."))
    check_lifetime(found.token)
    return found.user, found
