"""Settings of the django-tasks-db reference: its two apps, the database backend for tasks, and
a PostgreSQL database from BENCH_DJTASKS_DATABASE_URL with persistent connections
(`CONN_MAX_AGE=None`: without them db_worker opens a connection per task)."""

import os
from importlib.util import find_spec

import environ

SECRET_KEY = "bench-djtasks-only"  # noqa: S105
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["django_tasks_db"]
if find_spec("django.tasks") is None:
    # Before Django 6 (django.tasks), the django-tasks package provides the same API.
    INSTALLED_APPS.insert(0, "django_tasks")
DATABASES = {
    "default": {
        **environ.Env.db_url_config(os.environ["BENCH_DJTASKS_DATABASE_URL"]),
        "CONN_MAX_AGE": None,
    }
}
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
