"""WSGI entry point. Uploads are served by a WSGI server that streams request bodies to the
view (granian's WSGI interface, started by scripts/web): ASGI would spool the whole body before
the view runs."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "uploadsvc.settings")

from uploads import spool  # noqa: E402
from uploads.localfiles import UMASK, make_private  # noqa: E402
from uploads.wsgi import (  # noqa: E402
    BodyCountingMiddleware,
    BodyDeadlineMiddleware,
    ProcessEnvironMiddleware,
)

os.umask(UMASK)
application = ProcessEnvironMiddleware(
    BodyDeadlineMiddleware(BodyCountingMiddleware(get_wsgi_application()))
)
make_private()
spool.log_problem()
