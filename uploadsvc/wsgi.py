"""WSGI entry point. Uploads are served by a WSGI server that streams request bodies
(gunicorn with gthread workers): ASGI would spool the whole body before the view runs."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "uploadsvc.settings")

from uploads.localfiles import UMASK, make_private  # noqa: E402
from uploads.wsgi import BodyCountingMiddleware  # noqa: E402

os.umask(UMASK)
application = BodyCountingMiddleware(get_wsgi_application())
make_private()
