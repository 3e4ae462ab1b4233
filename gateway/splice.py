"""
Large response bodies moved from the backend's socket to the client's with
C{splice(2)}, without passing through the process.

Relayed the usual way, every byte of a body is copied twice: C{recv} from
the kernel into a Python C{bytes}, then C{send} back into the kernel.  For a
body of known length (C{Content-Length}) with at least L{SPLICE_MIN} bytes
still to come, L{BodySplice} has the kernel move them instead: C{splice}
from the backend's socket into a pipe, and from the pipe into the client's
socket (Linux; the pipe is what C{splice} requires between two sockets).
HAProxy does the same (C{option splice-response}).  1 MiB responses through
one core went from 789 to 1,248 requests/s on CPython (+58%, medians of four
paired runs with 256 KiB pipes; 1 MiB pipes, L{PIPE_SIZE}, did 10-20% more;
docs/performance.rst, "Large bodies spliced").

It takes over only the two transports' C{doRead} (the backend's) and
C{doWrite} (the client's), as instance attributes shadowing their methods,
so the reactor keeps watching the same selectables: the backend's
readability, the client's writability when the pipe cannot be emptied at
once, and both connections' closing, which reach the transports and their
protocols as usual.  Flow control is the pipe's: a full pipe stops the
reads from the backend until the client takes the bytes.  When the body is
complete, both transports get their methods back and the response ends as
a relayed one does (the connection back to its pool).  On an error, or
when the exchange is stopped (a client gone, a timeout), the splice is
undone and the ordinary paths handle the rest.

Only where nothing needs to see the body: a plain TCP client connection
(not TLS, not HTTP/2), a plain TCP backend connection, and the body going
to the gateway's L{gateway.forwarding.BodyRelay} itself (not through the
response cache, which reads it).  Only where the platform has it:
C{os.splice} (Python 3.10+ on Linux; not PyPy 3.9).  C{TXGATEWAY_SPLICE=off}
in the environment turns it off.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Mapping, Optional

from twisted.internet import tcp

from gateway.heap import tuning_enabled
from gateway.reactor import unsent_bytes

#: Body bytes still to come from which a response is spliced rather than
#: relayed: below this, the pipe's two system calls per response and the
#: set-up cost more than the copies they save.
SPLICE_MIN = 64 * 1024

#: The capacity asked for each response's pipe, in bytes: 1 MiB served
#: 10-20% more 1 MiB responses/s than 256 KiB (paired runs).  Linux lets
#: an unprivileged user's pipes hold 64 MiB in all (the sysctl
#: C{fs.pipe-user-pages-soft}, 16,384 pages; the reactor's own pipes count
#: too) before it refuses to grow them: about 63 bodies per user get 1 MiB
#: pipes at once, a few more the 64 KiB pipes Linux still gives, and once
#: new pipes are 8 KiB the rest are relayed (L{PIPE_MIN}) until pipes are
#: freed; raise the sysctl for more.  Each pipe holds at most this much of
#: a body for a slow client, in the kernel.
PIPE_SIZE = 1024 * 1024

#: The smallest pipe worth splicing through, in bytes: with a smaller one
#: (refused growth, see L{PIPE_SIZE}) the body is relayed instead.
PIPE_MIN = 64 * 1024

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

#: Whether this platform has splice(2) through C{os.splice}.
SUPPORTED = hasattr(os, "splice")

_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SUPPORTED else 0


def enabled(environ: Mapping[str, str]) -> bool:
    """
    Whether responses may be spliced: on a platform with C{os.splice},
    unless C{TXGATEWAY_SPLICE} is C{off}, C{0}, C{no} or C{false}.
    """
    return SUPPORTED and tuning_enabled(environ, "TXGATEWAY_SPLICE")


ENABLED = enabled(os.environ)


class _Tally:
    """Counts kept until a L{report_to} names the real counters."""

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


#: The counters of spliced responses and bytes (L{report_to}).
_responses = _Tally()
_bytes = _Tally()


def report_to(responses, sent) -> None:
    """
    Count spliced responses and body bytes with these counters from now on
    (the process's L{gateway.metrics.GatewayMetrics}; plain prometheus
    counters, which C{--workers} merges).  Process-wide: the last caller's
    counters get the counts (a gateway process has one
    L{gateway.metrics.GatewayMetrics}, kept across reloads).

    @param responses: an object with C{inc()}, for each spliced response.
    @param sent: an object with C{inc(amount)}, for the bytes spliced.
    """
    global _responses, _bytes
    _responses, _bytes = responses, sent


class BodySplice:
    """
    The rest of one response body, spliced from a backend connection to a
    client connection (see the module docstring).  Made by L{start}.

    @ivar left: body bytes still to read from the backend.
    @ivar in_pipe: bytes read from the backend, not yet sent to the client.
    """

    def __init__(self, connection, relay, upstream, downstream, pipe: tuple, capacity: int) -> None:
        self._connection = connection
        self._relay = relay
        self._up = upstream
        self._down = downstream
        self._r, self._w = pipe
        self._capacity = capacity
        self.left: int = connection._body_left
        self.in_pipe = 0
        self._up_fd = upstream.fileno()
        self._down_fd = downstream.fileno()
        self._active = True
        # Shadow the two methods (tcp.Connection has a __dict__).
        upstream.doRead = self._read
        downstream.doWrite = self._write

    @classmethod
    def start(cls, connection, relay) -> Optional["BodySplice"]:
        """
        Splice the rest of C{connection}'s response body to C{relay}'s
        client, if both sides allow it (see the module docstring); call
        when the relay's client has taken everything written to it so far
        (its producer is being resumed).  The backend transport is left
        reading.

        @param connection: the L{gateway.upstream.UpstreamProtocol} on the
            fast path of a body of known length.
        @param relay: the protocol the body is delivered to.
        @return: the splice, or None (nothing changed) if it cannot be
            done here.
        """
        from gateway.forwarding import BodyRelay

        if not ENABLED or type(relay) is not BodyRelay or connection._aborted:
            return None
        up = connection.transport
        request = relay.request
        channel = request.channel
        down = getattr(channel, "transport", None)
        if type(up) is not tcp.Client or type(down) is not tcp.Server:
            return None  # TLS, HTTP/2, a test's transport
        if getattr(request, "chunked", False) or not getattr(request, "startedWriting", False):
            return None
        for transport in (up, down):
            if (
                transport.disconnecting
                or getattr(transport, "TLS", False)  # (startTLS keeps the type)
                or getattr(transport, "_aborting", False)
                or unsent_bytes(transport)
                or transport.fileno() == -1
            ):
                return None
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # out of descriptors: relay as usual
        try:
            try:
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # (EPERM past the user's pipe budget)
            capacity = fcntl.fcntl(pipe[1], _F_GETPIPE_SZ)
        except OSError:
            capacity = 0
        if capacity < PIPE_MIN:
            for fd in pipe:
                os.close(fd)
            return None
        splice = cls(connection, relay, up, down, pipe, capacity)
        _responses.inc()
        up.startReading()
        return splice

    # -- the reactor's events, through the shadowed methods

    def _read(self):
        """The backend's socket is readable: move what fits into the pipe."""
        room = min(self.left, self._capacity - self.in_pipe)
        if room <= 0:
            # (reading resumed by the response's reader while the pipe is
            # full: it resumes again once the pipe drains)
            self._up.stopReading()
            return None
        try:
            moved = os.splice(self._up_fd, self._w, room, flags=_FLAGS)
        except BlockingIOError:
            if self.in_pipe:
                # The pipe is full before its byte count says so: it holds
                # a number of segments, not bytes, and small segments fill
                # it early.  The socket stays readable, and epoll would
                # report it again at once: stop reading until the pipe is
                # drained (a write to the client is pending, or there would
                # be nothing in the pipe; its end restarts the reads).
                self._up.stopReading()
            return None
        except OSError as e:
            if e.errno == errno.EINTR:
                return None
            return self._handback_upstream()
        if moved == 0:
            return self._handback_upstream()  # closed before the end
        self.left -= moved
        self.in_pipe += moved
        self._connection._received = True
        if self.left == 0 or self.in_pipe >= self._capacity:
            self._up.stopReading()
        self._drain()
        return None

    def _write(self):
        """The client's socket is writable again."""
        self._drain()
        return None

    def _drain(self) -> None:
        """Move the pipe's bytes to the client, as many as it takes now."""
        while self.in_pipe and self._active:
            try:
                moved = os.splice(self._r, self._down_fd, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                self._down.startWriting()
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self._client_failed()
                return
            self.in_pipe -= moved
            self._relay.sent += moved
            self._relay.request.sentLength += moved
            _bytes.inc(moved)
        if not self._active:
            return
        self._down.stopWriting()
        if self.left == 0:
            self._finish()
        elif not self._connection._response_paused():
            self._up.startReading()

    # -- endings

    def _undo(self) -> None:
        """Give both transports their own methods back and close the pipe."""
        if not self._active:
            return
        self._active = False
        for transport, name, mine in ((self._up, "doRead", self._read), (self._down, "doWrite", self._write)):
            # (abortConnection shadows them too: leave its replacements)
            if transport.__dict__.get(name) == mine:
                del transport.__dict__[name]
        for fd in (self._r, self._w):
            os.close(fd)
        self._connection._splice = None
        self._connection._body_left = self.left
        down = self._down
        if down.connected and (down.disconnecting or unsent_bytes(down)):
            down.startWriting()  # a close or a write that waited for the splice

    def _finish(self) -> None:
        """The whole body went through: end the response as a relayed one."""
        self._undo()
        self._connection._spliced_body_complete()

    def _handback_upstream(self):
        """
        The backend's read failed or ended early.  With the pipe empty:
        undo, and let the transport's own C{doRead} meet the same end,
        which fails the response the usual way.  With bytes still in the
        pipe, which the client cannot get now in order: undo and drop the
        backend connection, which fails the response too.
        """
        lost = self.in_pipe
        self._undo()
        if lost:
            self._connection.abort()
            return None
        return self._up.doRead()

    def _client_failed(self) -> None:
        """
        The client's socket refused the bytes (reset, closed): undo and
        drop the client connection; its loss stops the exchange and
        aborts the backend connection, whose body was not read.
        """
        self._undo()
        self._down.abortConnection()

    def cancel(self) -> None:
        """
        Undo without ending anything: the exchange is stopped or the
        backend connection lost (the caller handles that).
        """
        self._undo()


__all__ = ["BodySplice", "SPLICE_MIN", "PIPE_MIN", "PIPE_SIZE", "SUPPORTED", "enabled", "report_to"]
