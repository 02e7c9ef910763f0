"""Settings for the uploadsvc project, read from the environment (12-factor).

Every variable is documented in `.env.example`; a `.env` file beside `manage.py` is read when it
exists. Nothing domain-specific lives here: the app's own settings are the `UPLOADS` dict, whose
defaults live in `uploads/conf.py`.
"""

import os
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
if (BASE_DIR / ".env").exists():
    env.read_env(BASE_DIR / ".env")

# Where `make` keeps the secret key it generates for a local run (private to the service's user).
LOCAL_SECRET_KEY_FILE = VAR_DIR / "secret-key"
LOCAL_HOSTS = ["localhost", "127.0.0.1", "[::1]"]

DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=LOCAL_HOSTS)
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

# Production: served over HTTPS, or to a host other than this machine. It needs a secret key of
# its own; anywhere else (`make run`, manage.py in a second terminal) the one `make` wrote does.
PRODUCTION = env.bool("DJANGO_HTTPS", default=False) or not set(ALLOWED_HOSTS) <= set(LOCAL_HOSTS)


def _secret_key() -> str:
    key: str = env.str("DJANGO_SECRET_KEY", default="")
    if key:
        return key
    if PRODUCTION:
        raise ImproperlyConfigured(
            "Set DJANGO_SECRET_KEY (50+ random characters): in production (DJANGO_HTTPS=true, "
            "or DJANGO_ALLOWED_HOSTS naming a host other than localhost) the key `make` writes "
            "for local runs is not used."
        )
    if LOCAL_SECRET_KEY_FILE.is_file() and (key := LOCAL_SECRET_KEY_FILE.read_text().strip()):
        return key
    if DEBUG:
        return "insecure-debug-only-key"
    raise ImproperlyConfigured(
        f"Set DJANGO_SECRET_KEY, or run `make` once: it writes a local key to "
        f"{LOCAL_SECRET_KEY_FILE}, used when the variable is unset."
    )


SECRET_KEY = _secret_key()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "uploads",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "uploadsvc.urls"
WSGI_APPLICATION = "uploadsvc.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'uploadsvc.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The queue writes from several threads and processes: WAL lets readers run beside the
    # writer, IMMEDIATE takes the write lock at BEGIN (no lock-upgrade deadlocks) and the
    # timeout waits for it instead of failing with "database is locked". synchronous=FULL
    # syncs the WAL at every commit: a 202'd upload survives a power cut (NORMAL may lose the
    # last commits).
    # One writing transaction per process at a time (uploadsvc/sqlite3/base.py).
    DATABASES["default"]["ENGINE"] = "uploadsvc.sqlite3"
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;",
    }
    # A file, not memory: tests run worker threads and subprocesses against it. One per test
    # process, so concurrent runs on one machine do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DJANGO_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve the admin's and the browsable API's assets from the apps themselves, no collectstatic
# step needed for `make run`.
WHITENOISE_USE_FINDERS = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    # Request counts for throttling, in a table of the service's database (made by `migrate`).
    "throttle": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "uploadsvc_throttle_cache",
    },
}

REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "uploads.authentication.ExpiringTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "uploads.exceptions.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    # Per-user request rate, e.g. "600/min"; off unless set. Counted in the database cache
    # below, shared by every web process.
    "DEFAULT_THROTTLE_CLASSES": ["uploads.throttling.SharedUserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": env.str("DJANGO_THROTTLE_USER_RATE", default=None)},
}

SPECTACULAR_SETTINGS = {
    "TITLE": "uploadsvc API",
    "DESCRIPTION": "Upload files over HTTP; workers deliver them into Incus instances.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and docs describe the API and grant nothing: readable without credentials.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}

# The app's own settings (uploads/conf.py holds each one's default, type and meaning): every
# UPLOADS_<NAME> variable in the environment sets <NAME>; nothing else is repeated here.
UPLOADS: dict[str, Any] = {
    name.removeprefix("UPLOADS_"): value
    for name, value in os.environ.items()
    if name.startswith("UPLOADS_")
}

# Object storage for the spool, when UPLOADS_SPOOL_URL is s3://BUCKET/PREFIX (the names
# django-storages uses). Unset keys leave boto3 to find credentials itself (its own variables,
# ~/.aws, an instance role).
AWS_S3_ENDPOINT_URL = env.str("AWS_S3_ENDPOINT_URL", default=None)
AWS_ACCESS_KEY_ID = env.str("AWS_ACCESS_KEY_ID", default=None)
AWS_SECRET_ACCESS_KEY = env.str("AWS_SECRET_ACCESS_KEY", default=None)
AWS_S3_REGION_NAME = env.str("AWS_S3_REGION_NAME", default="us-east-1")

# Behind HTTPS (set DJANGO_HTTPS=true in production): secure cookies, redirects and HSTS.
if env.bool("DJANGO_HTTPS", default=False):
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SSL_REDIRECT", default=True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=True)
    SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=False)
    if env.bool("DJANGO_BEHIND_PROXY", default=False):
        # Only when a proxy that sets this header (and strips it from clients) fronts us.
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Submitting a domain to the HSTS preload list is the operator's decision, not a default.
SILENCED_SYSTEM_CHECKS = ["security.W021"]

LOG_LEVEL = env.str("DJANGO_LOG_LEVEL", default="INFO")
# "plain" (default) or "json": one JSON object per line, with task_id and other extras as keys.
LOG_FORMAT = env.str("DJANGO_LOG_FORMAT", default="plain")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(threadName)s %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(threadName)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "uploads": {"level": LOG_LEVEL, "handlers": ["console"], "propagate": False},
    },
}
