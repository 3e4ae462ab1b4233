"""
gateway.splice, piece by piece on real sockets and a real pipe (the end to
end tests, through a real gateway, are in tests/test_core_e2e.py).
"""

import fcntl
import os
import select
import socket
from types import SimpleNamespace

import pytest

from gateway import splice

@pytest.mark.parametrize(
    "value, on",
    [("", True), ("on", True), ("1", True), ("off", False), ("0", False), (" No ", False), ("false", False)],
)
def test_enabled_from_the_environment(value, on):
    # (never where Python has no os.splice: PyPy 3.9, Python 3.9, not Linux)
    assert splice.enabled({"TXGATEWAY_SPLICE": value}) is (on and splice.SUPPORTED)
    assert splice.enabled({}) is splice.SUPPORTED


class _Transport:
    """The parts of a tcp.Connection a BodySplice uses, on a real socket."""

    def __init__(self, sock):
        self.sock = sock
        self.calls = []
        self.connected = True
        self.disconnecting = False
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.calls.append("own doRead")

    def doWrite(self):
        self.calls.append("own doWrite")

    def startReading(self):
        self.calls.append("startReading")

    def stopReading(self):
        self.calls.append("stopReading")

    def startWriting(self):
        self.calls.append("startWriting")

    def stopWriting(self):
        self.calls.append("stopWriting")


def _tcp_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


@pytest.mark.needs_splice
def test_a_pipe_full_of_segments_stops_the_reads_until_it_drains():
    """
    A pipe holds a number of segments, not of bytes: here one page, so one
    small segment fills it while its byte count is far below its capacity.
    The next read, with more bytes waiting in the socket, must stop reading
    (epoll would report the socket readable again at once), and the drain
    that empties the pipe restarts it.
    """
    backend, up_sock = _tcp_pair()
    down_sock, client = _tcp_pair()
    try:
        # The client reads nothing yet: fill the client socket's buffers.
        down_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        try:
            while True:
                down_sock.send(b"x" * 65536)
        except BlockingIOError:
            pass
        up, down = _Transport(up_sock), _Transport(down_sock)
        relay = SimpleNamespace(sent=0, request=SimpleNamespace(sentLength=0))
        connection = SimpleNamespace(_body_left=10_000, _received=False, _splice=None, _response_paused=lambda: False)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ: one page, one segment
        spliced = splice.BodySplice(connection, relay, up, down, (r, w), 1 << 20)
        connection._splice = spliced
        assert up.doRead == spliced._read and down.doWrite == spliced._write

        def arrive(data):
            backend.send(data)
            select.select([up_sock], [], [], 5)

        arrive(b"y" * 100)
        up.doRead()  # one segment into the pipe; the client cannot take it
        assert spliced.in_pipe == 100 and spliced.left == 9_900
        assert down.calls == ["startWriting"] and up.calls == []
        arrive(b"z" * 100)
        up.doRead()  # the pipe is full of segments: stop reading
        assert up.calls == ["stopReading"] and spliced.in_pipe == 100
        assert up_sock.recv(1000, socket.MSG_PEEK) == b"z" * 100  # still waiting

        # The client reads: the drain empties the pipe and restarts the reads.
        for _ in range(1000):
            if select.select([client], [], [], 5)[0]:
                client.recv(1 << 20)
            down.doWrite()  # as the reactor does once the socket is writable
            if spliced.in_pipe == 0:
                break
        assert spliced.in_pipe == 0
        assert up.calls[-1] == "startReading" and down.calls[-1] == "stopWriting"
        assert relay.sent == relay.request.sentLength == 100

        spliced.cancel()
        assert "doRead" not in up.__dict__ and "doWrite" not in down.__dict__
        assert up.doRead() is None and up.calls[-1] == "own doRead"
        assert connection._splice is None and connection._body_left == 9_900
        with pytest.raises(OSError):
            os.fstat(r)  # the pipe is closed
    finally:
        for s in (backend, up_sock, down_sock, client):
            s.close()
