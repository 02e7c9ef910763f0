"""django-tasks-db as a queue reference: a Django project of its own (settings, one no-op task)
on the bench's PostgreSQL, and `python -m bench.djtasks` to prepare and read a run."""
