"""
Request IDs: one per request, taken from the client's C{X-Request-ID} when
it is well-formed, generated otherwise, forwarded to the backend and
returned to the client, and logged with every event about the request.

A client-supplied ID is accepted only if it is 1 to 128 characters of
C{[A-Za-z0-9._:-]}: it goes into logs and headers, so it must not carry
spaces, quotes, control characters or unbounded length.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from twisted.web.http_headers import Headers

#: The header carrying the request ID, both ways.
REQUEST_ID_HEADER = b"X-Request-ID"

_VALID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def valid_request_id(value: bytes) -> bool:
    """
    Whether C{value} may be used as a request ID: 1 to 128 characters of
    C{[A-Za-z0-9._:-]}.

    @param value: the header value, as received.
    """
    return _VALID.fullmatch(value) is not None


#: Random bytes read from the system at once, for this many IDs: one
#: C{getrandom} system call per 256 requests instead of one per request.
_BATCH = 256
_pool = b""
_offset = 0


def _forget_pool() -> None:
    # A forked child must not hand out the IDs its parent will also use.
    global _pool, _offset
    _pool, _offset = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def new_request_id() -> str:
    """
    A fresh request ID: 32 lowercase hex digits from 128 random bits of
    C{os.urandom}, read 256 IDs' worth at a time (and never shared with a
    forked child).
    """
    global _pool, _offset
    offset = _offset
    if offset >= len(_pool):
        _pool, offset = os.urandom(16 * _BATCH), 0
    _offset = offset + 16
    return _pool[offset : offset + 16].hex()


def request_id(headers: Headers, header: bytes = REQUEST_ID_HEADER) -> bytes:
    """
    The request's ID: the client's when it sent exactly one valid value,
    a new one otherwise.

    @param headers: the request headers.
    @param header: the header name.
    @return: the ID, ASCII bytes, ready for the forwarded request and the
        response.
    """
    values: Optional[list[bytes]] = headers.getRawHeaders(header)
    if values is not None and len(values) == 1 and valid_request_id(values[0]):
        return values[0]
    return new_request_id().encode("ascii")
