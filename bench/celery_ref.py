"""Celery + Redis as a queue reference: a no-op task that only counts itself.

The worker runs as `python -m celery -A bench.celery_ref worker --pool prefork --concurrency P`
with BENCH_CELERY_BROKER (a redis:// URL) and BENCH_CELERY_PREFIX (a prefix for every Redis key,
queues included, so that runs never touch each other's keys). Tasks are acknowledged after they
ran (`acks_late`); everything else is Celery's default (prefetch multiplier 4, JSON).

Each task runs one Redis script that adds 1 to a counter and keeps the earliest and the latest
time a task ran, so the rate is computed from the tasks' own clocks, as it is for uploadsvc's
rows. `python -m bench.celery_ref enqueue --count N | count | clear` prepares and reads a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_CELERY_PREFIX", "uploadsvc-bench:")
QUEUE = "noop"
COUNT, FIRST, LAST = (f"{PREFIX}done:{name}" for name in ("count", "first", "last"))

app = Celery("uploadsvc_bench", broker=BROKER)
app.conf.update(
    task_acks_late=True,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_COUNT_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
local now = tonumber(ARGV[1])
local first = tonumber(redis.call('GET', KEYS[2]) or '')
if first == nil or now < first then redis.call('SET', KEYS[2], ARGV[1]) end
local last = tonumber(redis.call('GET', KEYS[3]) or '')
if last == nil or now > last then redis.call('SET', KEYS[3], ARGV[1]) end
return n
"""
_counter: Any = None


def _count(now: float) -> None:
    global _counter
    if _counter is None:  # one connection per worker process, made after the fork
        _counter = redis.Redis.from_url(BROKER).register_script(_COUNT_SCRIPT)
    _counter(keys=[COUNT, FIRST, LAST], args=[repr(now)])


@app.task(name="bench.noop")
def noop() -> None:
    _count(time.time())


def _client() -> redis.Redis:
    return redis.Redis.from_url(BROKER)


def enqueue(count: int) -> dict[str, Any]:
    clear()
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            noop.apply_async(producer=producer)
    return {"enqueued": count}


def counts() -> dict[str, Any]:
    client = _client()
    done, first, last = client.mget([COUNT, FIRST, LAST])
    return {
        "done": int(done or 0),
        "first": float(first) if first else None,
        "last": float(last) if last else None,
        "waiting": int(client.llen(f"{PREFIX}{QUEUE}")),
    }


def clear() -> dict[str, Any]:
    """Delete every key of this prefix (queue, unacked messages, bindings, counters)."""
    client = _client()
    keys = list(client.scan_iter(match=f"{PREFIX}*", count=1000))
    if keys:
        client.delete(*keys)
    return {"deleted": len(keys)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.celery_ref")
    sub = parser.add_subparsers(dest="command", required=True)
    fill = sub.add_parser("enqueue")
    fill.add_argument("--count", type=int, required=True)
    sub.add_parser("count")
    sub.add_parser("clear")
    args = parser.parse_args(argv)
    if args.command == "enqueue":
        out = enqueue(args.count)
    elif args.command == "count":
        out = counts()
    else:
        out = clear()
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
