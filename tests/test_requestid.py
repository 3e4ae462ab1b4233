"""
Tests for L{gateway.requestid}.
"""

import os
import re

import pytest
from twisted.web.http_headers import Headers

from gateway.requestid import new_request_id, request_id, valid_request_id


@pytest.mark.parametrize("value", [
    b"a", b"0123456789abcdef0123456789abcdef", b"A-Z.a_z:0-9", b"x" * 128,
    b"req:2024-01-01T00.00", b"-", b"___",
])
def test_valid(value):
    assert valid_request_id(value)


@pytest.mark.parametrize("value", [
    b"", b"x" * 129, b"has space", b"quote\"", b"new\nline", b"trailing\n",
    b"tab\t", b"semi;colon", b"slash/", b"caf\xc3\xa9", b"nul\x00", b"a,b", b"{}",
])
def test_invalid(value):
    assert not valid_request_id(value)


def test_new_request_ids_are_valid_and_unique():
    ids = {new_request_id() for _ in range(10000)}
    assert len(ids) == 10000
    for value in list(ids)[:100]:
        assert re.fullmatch("[0-9a-f]{32}", value)
        assert valid_request_id(value.encode())


def test_forked_child_does_not_repeat_parent_ids():
    """
    IDs come from a pool of random bytes read ahead; a forked child starts
    a pool of its own instead of handing out the parent's next IDs.
    """
    new_request_id()  # the pool is filled and partly used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, "".join(new_request_id() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = f.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(new_request_id() for _ in range(8))
    assert len(child) == len(parent) == 8 * 32
    assert child != parent


def test_ids_span_pool_refills():
    ids = [new_request_id() for _ in range(3 * 256 + 5)]
    assert len(set(ids)) == len(ids)


def test_request_id_from_headers():
    assert request_id(Headers({b"X-Request-ID": [b"abc-123"]})) == b"abc-123"
    assert request_id(Headers({b"x-request-id": [b"abc-123"]})) == b"abc-123"
    for headers in [
        Headers(),
        Headers({b"X-Request-ID": [b"bad value"]}),
        Headers({b"X-Request-ID": [b"one", b"two"]}),
    ]:
        generated = request_id(headers)
        assert re.fullmatch(rb"[0-9a-f]{32}", generated)
    assert request_id(Headers({b"X-Correlation-ID": [b"c1"]}), b"X-Correlation-ID") == b"c1"
