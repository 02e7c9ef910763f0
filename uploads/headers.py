"""What an upload request says in its headers and query, read into values: the body's length
and framing, its announced digest, the idempotency key, how long to wait, where it came from;
and whether a failed body read was a timeout. The API's views call these; they know nothing of
uploads beyond HTTP."""

import base64
import binascii
import re

from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.request import Request


def content_length(request: Request) -> int | None:
    raw = request.META.get("CONTENT_LENGTH")
    if raw in (None, ""):
        return None
    try:
        length = int(raw)
    except ValueError:
        raise ParseError("Content-Length is not a number.") from None
    if length < 0:
        raise ParseError("Content-Length is negative.")
    return length


def is_chunked(request: Request) -> bool:
    return "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()


def expected_sha256(request: Request) -> str | None:
    """The digest a client announced: RFC 9530 `Repr-Digest: sha-256=:<base64>:` or
    `X-Content-SHA256: <hex>`. Other algorithms in Repr-Digest are ignored, as the RFC allows."""
    hex_digest = request.META.get("HTTP_X_CONTENT_SHA256")
    repr_digest = request.META.get("HTTP_REPR_DIGEST")
    if repr_digest:
        for member in repr_digest.split(","):
            algorithm, _, value = member.strip().partition("=")
            if algorithm.strip().lower() != "sha-256":
                continue
            value = value.strip()
            try:
                if not (value.startswith(":") and value.endswith(":")):
                    raise ValueError
                raw = base64.b64decode(value[1:-1], validate=True)
            except (ValueError, binascii.Error):
                raise ValidationError(
                    {"Repr-Digest": ["sha-256 must be a byte sequence, e.g. sha-256=:<base64>:"]}
                ) from None
            from_repr = raw.hex()
            if hex_digest and hex_digest.strip().lower() != from_repr:
                raise ValidationError({"sha256": ["Repr-Digest and X-Content-SHA256 disagree."]})
            return from_repr
    return hex_digest


def timed_out(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, TimeoutError):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


# IETF draft-ietf-httpapi-idempotency-key-header: a string, sent quoted (a structured field)
# or bare; here 1-255 printable ASCII characters.
IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")


def idempotency_key(request: Request) -> str:
    raw = request.META.get("HTTP_IDEMPOTENCY_KEY")
    if raw is None:
        return ""
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not IDEMPOTENCY_KEY.match(key):
        raise ValidationError(
            {"Idempotency-Key": ["An idempotency key is 1-255 printable ASCII characters."]}
        )
    return key


MAX_WAIT_SECONDS = 60


def wait_seconds(request: Request) -> int | None:
    raw = request.query_params.get("wait")
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_WAIT_SECONDS:
        raise ValidationError(
            {"wait": [f"A whole number of seconds from 1 to {MAX_WAIT_SECONDS}."]}
        )
    return int(raw)


def source(request: Request) -> str | None:
    address: str | None = request.META.get("REMOTE_ADDR") or None
    return address
