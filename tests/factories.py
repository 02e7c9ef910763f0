"""Rows for tests: a queued task with a real spool file behind it."""

import hashlib
from typing import Any

from uploads import services
from uploads.spool import SpoolWriter


def spooled(content: bytes = b"payload\n") -> Any:
    with SpoolWriter() as writer:
        writer.write(content)
        return writer.commit()


def make_task(owner: Any, content: bytes = b"payload\n", **fields: Any) -> Any:
    params: dict[str, Any] = {"instance": "web1", "path": "/srv/app/file.txt"}
    params.update(fields)
    task = services.upload_create(owner=owner, spooled=spooled(content), **params)
    assert task.sha256 == hashlib.sha256(content).hexdigest()
    return task


def make_batch(
    owner: Any, instances: list[str], content: bytes = b"payload\n", **fields: Any
) -> Any:
    """A fan-out of one spooled body to these instances, as the API makes it."""
    params: dict[str, Any] = {"path": "/srv/app/file.txt"}
    params.update(fields)
    return services.upload_fanout(
        owner=owner,
        spooled=spooled(content),
        instances=instances,
        requested=",".join(instances),
        **params,
    )
