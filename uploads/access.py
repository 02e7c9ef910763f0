"""Who is uploading and what they may do, kept in each web process between uploads.

An upload needs its token's user and that user's grants before it reads a byte of the body;
fetching them costs two queries per upload, as much as storing the upload itself. Each web
process keeps them instead, tagged with the database's *access generation*: a counter that every
change to tokens, users, groups and grants bumps (the signal receivers below), in the same
transaction as the change. The upload's INSERT carries the generation it relied on and adds
nothing if the counter moved meanwhile; the upload is then checked again from the database. So
a revoked token or grant stops uploads at once, across processes and hosts.

Changes that bypass model signals (`QuerySet.update()`, raw SQL) do not bump the counter: what
they change is picked up when the entry expires (`TTL_SECONDS`).
"""

import threading
import time
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction
from django.db.models import F
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver
from rest_framework.authtoken.models import Token

from uploads.models import AccessGeneration, Grant
from uploads.selectors import OwnerGrants, owner_grants

TTL_SECONDS = 60.0
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Access:
    """An authenticated token, its user and the grants they hold, as of `generation`."""

    key: str
    user: Any
    token: Token
    grants: OwnerGrants
    generation: int


class StaleAccess(Exception):
    """Tokens, users or grants changed since the access was cached."""


def current_generation() -> int:
    counter, _ = AccessGeneration.objects.get_or_create(pk=AccessGeneration.SINGLETON)
    return counter.value


def bump_generation() -> None:
    """Invalidate every cached access, in every process (inside the caller's transaction)."""
    if not AccessGeneration.objects.filter(pk=AccessGeneration.SINGLETON).update(
        value=F("value") + 1
    ):
        AccessGeneration.objects.get_or_create(pk=AccessGeneration.SINGLETON)


class _Cache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[Access, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Access | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[1] > TTL_SECONDS:
            return None
        return entry[0]

    def load(self, key: str) -> Access | None:
        """The token's access fresh from the database, cached; None for an unknown token."""
        with transaction.atomic():  # one snapshot: the generation and what it covers
            generation = current_generation()
            token = Token.objects.select_related("user").filter(key=key).first()
            if token is None:
                return None
            grants = owner_grants([token.user.pk])[token.user.pk]
        access = Access(key, token.user, token, grants, generation)
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key] = (access, time.monotonic())
        return access

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


cache = _Cache()


@receiver(post_save, sender=Token)
@receiver(post_delete, sender=Token)
@receiver(post_save, sender=Grant)
@receiver(post_delete, sender=Grant)
@receiver(post_save, sender=Group)
@receiver(post_delete, sender=Group)
def _on_access_change(**kwargs: Any) -> None:
    bump_generation()


@receiver(post_save)
@receiver(post_delete)
def _on_user_change(sender: Any, **kwargs: Any) -> None:
    if sender is get_user_model():
        bump_generation()


@receiver(m2m_changed)
def _on_membership_change(sender: Any, action: str, **kwargs: Any) -> None:
    if sender is get_user_model().groups.through and action.startswith("post_"):
        bump_generation()
