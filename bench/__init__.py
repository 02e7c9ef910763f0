"""uploadsvc's benchmark suite (`make bench`, `python -m bench [NAME ...] [--quick]`).

Everything runs on this machine against the real servers: the web server as `scripts/run`
starts it (`scripts/web`), `manage.py run_push_workers`, SQLite and PostgreSQL, the local Incus,
and a Go build of the seed's design (`bench/goref`) as the reference. Results are printed as
tables and written as JSON under `var/bench/`.
"""
