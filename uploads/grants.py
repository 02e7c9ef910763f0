"""The rules a grant applies, free of the database and of Incus: which paths lie in a granted
directory and which owners a grant allows. The selectors apply them to a user's grants when an
upload arrives; the Incus pusher applies the path rules again to where a file really lands."""

import re
from collections.abc import Iterable

ANY_OWNER = "*"
MAX_ID = 4_294_967_295
_OWNER = re.compile(r"^(\d{1,10})(?::(\d{1,10}))?$")


def normal_prefix(prefix: str) -> str:
    return "/" + prefix.strip("/")


def path_within(path: str, prefix: str) -> bool:
    """Whether a normalised absolute path is a granted directory or lies in it, respecting
    boundaries: /srv/app holds /srv/app/x but not /srv/application/x."""
    prefix = normal_prefix(prefix)
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def path_below(path: str, prefix: str) -> bool:
    """Whether a normalised absolute path lies strictly inside a granted directory: where a
    file may be written or a directory created (never the granted directory itself)."""
    return path_within(path, prefix) and path != normal_prefix(prefix)


def parse_owner(text: str) -> str:
    """`UID`, `UID:GID` or `*` (any owner), normalised; ValueError with the reason otherwise."""
    text = text.strip()
    if text == ANY_OWNER:
        return text
    match = _OWNER.match(text)
    if not match or any(int(n) > MAX_ID for n in match.groups() if n is not None):
        raise ValueError(
            f"'{text}' is not an owner: give UID or UID:GID (numbers up to {MAX_ID}), or * for any"
        )
    uid, gid = match.groups()
    return f"{int(uid)}:{int(gid)}" if gid is not None else str(int(uid))


def owners_allow(owners: Iterable[str], uid: int | None, gid: int | None) -> bool:
    """Whether a grant's owners let an upload request this uid and gid (None: not requested).

    `UID` allows that uid; `UID:GID` that uid and that gid; `*` any. Asking for neither needs
    nothing: the file keeps the owner of the file it replaces, or root for a new one.
    """
    if uid is None and gid is None:
        return True
    uids: set[int] = set()
    gids: set[int] = set()
    for owner in owners:
        if owner == ANY_OWNER:
            return True
        user, _, group = owner.partition(":")
        uids.add(int(user))
        if group:
            gids.add(int(group))
    return (uid is None or uid in uids) and (gid is None or gid in gids)


def describe_owners(owners: Iterable[str]) -> str:
    listed = sorted(set(owners))
    return ", ".join(listed) if listed else "none (leave uid and gid unset)"
