"""The service's own files that hold secrets or users' data are readable by its user only.

The secret key, the SQLite database (every API token is in it) and the spool (users' files) are
made private when they are created, and again at every start for files made before that:
`make_private()` runs when the web server loads the application and when the push workers start.
"""

import logging
import os
import stat
from pathlib import Path

from django.conf import settings
from django.db import connections

logger = logging.getLogger(__name__)

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
# What processes of the service create is private too (Django's SQLite files, logs).
UMASK = 0o077


def restrict(path: Path, mode: int) -> bool:
    """chmod `path` to `mode` when it exists and allows more; True when it changed."""
    try:
        current = stat.S_IMODE(path.lstat().st_mode)
    except FileNotFoundError:
        return False
    if path.is_symlink() or current & ~mode == 0:
        return False
    os.chmod(path, current & mode)
    return True


def _sqlite_files() -> list[Path]:
    files = []
    for alias in connections:
        params = connections[alias].settings_dict
        name = str(params.get("NAME") or "")
        if params["ENGINE"].endswith("sqlite3") and name and not name.startswith(("file:", ":")):
            files += [Path(name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
    return files


def make_private() -> int:
    """Restrict the secret key file, the SQLite database files and the spool; returns how many
    were changed (each is logged)."""
    from uploads import spool  # imported here: the spool uses this module's modes

    files = [Path(settings.LOCAL_SECRET_KEY_FILE), *_sqlite_files()]
    changed = [path for path in files if restrict(path, PRIVATE_FILE)]
    changed += spool.make_private()
    for path in changed:
        logger.warning("%s was readable by other users; it is now private to this user", path)
    return len(changed)
