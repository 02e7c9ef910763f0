"""The audit trail: who did what to which upload or grant, from where, and how it ended -- a row
for the admin and a JSON line on the `uploads.audit` logger."""

import json
import logging
import uuid
from typing import Any

from uploads.models import AuditEvent

audit_logger = logging.getLogger("uploads.audit")


def audit(
    *,
    action: str,
    outcome: str,
    user: Any = None,
    source: str | None = None,
    task_id: uuid.UUID | str | None = None,
    **detail: Any,
) -> AuditEvent:
    """Record who did what, from where, and how it ended: a row and a structured log line."""
    user = user if getattr(user, "is_authenticated", False) else None
    event = AuditEvent.objects.create(
        user=user,
        username=user.get_username() if user else "",
        action=action,
        outcome=outcome,
        source=source,
        task_id=task_id,
        detail=detail,
    )
    audit_logger.info(
        "audit %s",
        json.dumps(
            {
                "action": action,
                "outcome": outcome,
                "user": event.username or None,
                "source": source,
                "task": str(task_id) if task_id else None,
                **detail,
            },
            default=str,
            sort_keys=True,
        ),
    )
    return event
