"""
The gateway's reactor: Twisted's epoll reactor, less two C{epoll_ctl}
system calls and one trip through C{epoll_wait} per write.

A Twisted transport does not send when it is written to: it buffers the data
and asks the reactor to watch its socket for writability
(C{startWriting}, one C{epoll_ctl}); the next C{epoll_wait} reports the
socket writable, the transport sends everything it buffered meanwhile, and
asks the reactor to stop watching (C{stopWriting}, another C{epoll_ctl}).
A proxy writes twice per request (the request upstream, the response
downstream), so that is four system calls and two extra events per request
(docs/performance.rst has what removing them gained).

L{GatewayEPollReactor} keeps the buffering, which coalesces all the writes a
transport gets in one iteration into one C{send} (sending at once on every
write measured 7-8% slower), but not the watching: a transport that starts
writing is only noted, and at the start of the next C{doPoll}, before the
reactor waits, each noted transport is given its C{doWrite}.  A socket with
room takes everything and the transport stops writing by itself; only a
transport left with data to send (a full socket buffer, a connect still in
progress) is registered with epoll for writability, as before.  This is
what asyncio and libuv do: try the write first, poll only when it would
block.  A poll right after a flush does not wait: what the writes set off
(a connection closed, a Deferred fired, the reactor stopped) is picked up
by the main loop's next iteration, as after any event.

The gateway runs on it when twistd or twist is given no C{--reactor}
(L{install_unless_chosen}, called as the gateway's options are parsed);
C{--reactor=epoll} selects Twisted's own, and any other reactor works too.
C{twistd --reactor=gateway} selects this one for other twistd plugins.

It also dispatches events without Twisted's C{log.callWithLogger} around
each one, which pushed the selectable's C{logPrefix()} as the legacy log
context's C{system} for the duration of its C{doRead}/C{doWrite}: two
context-stack calls, a dict copy and two C{try} blocks per event, 7% of the
CPU of the typical chain on PyPy (vmprof), and +3% of requests/s on
CPython without them (docs/performance.rst).  What changes: an event
logged with the legacy C{twisted.python.log} API from inside a protocol
callback has C{system} "-" instead of, say, C{HTTPChannel,4,127.0.0.1}.
The gateway logs with C{twisted.logger}, whose events never had it.  An
exception raised while handling an event ("Unhandled Error": from
C{doRead}, C{doWrite}, or the disconnection that follows) is still logged
with the selectable's prefix as its C{system}: the connection and peer.

On PyPy it reads TCP sockets into one buffer of its own (C{recv_into})
and hands the protocol a copy of what arrived, instead of Twisted's
C{recv(bufferSize)}.  PyPy's C{recv} allocates a non-moving buffer of the
full C{bufferSize} (64 KiB) for every read, however few bytes arrive, and
frees it only at the next major collection: with two such buffers per
proxied request, minor collections came 1.6 times as often.  Reading into
one buffer served 4-17% more requests/s with the filters off in two sets
of paired runs, with p99 5.8-10 ms instead of 7.4-13.7 ms
(docs/performance.rst).  CPython's C{recv} allocates C{bufferSize} too,
but with C{malloc}, and shrinks it to what arrived at once; there, and
for a transport reading more than L{READ_INTO_MAX} at a time (a backend
connection streaming a C{Content-Length} body above
L{gateway.upstream.LARGE_READ}, where the copy would cost more than the
allocation: 8% fewer 1 MiB responses/s relayed on CPython), C{doRead} is
called as before.  Smaller and chunked bodies, and request bodies, are
read into the buffer like everything else.
"""

from __future__ import annotations

import errno
import platform
import select
import sys

from twisted.internet import epollreactor, error, main, tcp
from twisted.python import log


#: Writers with at least this many bytes buffered (a streamed body) are
#: registered with epoll at once, as Twisted does, rather than tried first:
#: epoll reports a TCP socket writable only once a third of its send buffer
#: is free, so waiting for that sends a stream in fewer, larger pieces (trying
#: first sent 1 MiB responses in pieces half the size, and 25% slower).
EAGER_LIMIT = 16 * 1024


#: The largest C{bufferSize} read into the reactor's own buffer: Twisted's
#: default, 64 KiB.
READ_INTO_MAX = 64 * 1024

#: Whether L{GatewayEPollReactor} reads into its own buffer by default.
READ_INTO = platform.python_implementation() == "PyPy"

#: The C{doRead} of Twisted's TCP transports (client and server alike):
#: the one a read into the reactor's buffer stands in for.
_TCP_DO_READ = tcp.Connection.doRead

#: As Twisted's C{posixbase._NO_FILEDESC}: why a selectable whose
#: C{fileno()} is -1 is disconnected.
_NO_FILEDESC = error.ConnectionFdescWentAway("File descriptor lost")


def _prefix(selectable) -> str:
    """A selectable's C{logPrefix()}, as C{log.callWithLogger} reads it."""
    try:
        return selectable.logPrefix()
    except KeyboardInterrupt:
        raise
    except BaseException:
        return "(buggy logPrefix method)"


def unsent_bytes(writer) -> int:
    """
    The bytes a L{twisted.internet.abstract.FileDescriptor} holds unsent;
    0 for another kind of writer.
    """
    try:
        return writer._tempDataLen + len(writer.dataBuffer) - writer.offset
    except AttributeError:
        return 0


class GatewayEPollReactor(epollreactor.EPollReactor):
    """
    An L{epollreactor.EPollReactor} that tries a writer's C{doWrite} at the
    start of the next poll before it registers the writer with epoll.

    @ivar _noted: writers noted since the last flush, not yet registered
        with epoll.
    @type _noted: L{set} of L{twisted.internet.interfaces.IWriteDescriptor}
    @ivar _flushing: the writer whose C{doWrite} the flush is running.
    @ivar _flushed: whether that writer stopped writing meanwhile (it sent
        everything it had).
    @ivar _read_buffer: the buffer TCP sockets are read into, or L{None}
        when they are read by their own C{doRead}.
    """

    def __init__(self, read_into: bool = READ_INTO) -> None:
        """
        @param read_into: whether to read TCP sockets into one buffer of
            the reactor's own (see the module docstring); by default on
            PyPy only.
        """
        self._noted: set = set()
        self._flushing = None
        self._flushed = False
        self._read_buffer = memoryview(bytearray(READ_INTO_MAX)) if read_into else None
        super().__init__()

    def addWriter(self, writer) -> None:
        if writer is self._flushing:
            # Writing more from inside its own doWrite (a producer resumed):
            # the flush sees that it still has data and registers it.
            self._flushed = False
        elif writer.fileno() not in self._writes:
            # Every write calls startWriting, so a noted writer whose buffer
            # grows past the limit comes back here before any flush.
            if unsent_bytes(writer) >= EAGER_LIMIT:
                # A stream: registered at once, as Twisted does (and no
                # longer noted, if an earlier small write noted it).
                self._noted.discard(writer)
                super().addWriter(writer)
            else:
                self._noted.add(writer)

    def removeWriter(self, writer) -> None:
        if writer is self._flushing:
            self._flushed = True
        self._noted.discard(writer)
        # Always: a registration left behind outlives the socket, and epoll
        # refuses the next socket given the same descriptor number.
        super().removeWriter(writer)

    def getWriters(self) -> list:
        return super().getWriters() + list(self._noted)

    def removeAll(self) -> list:
        noted, self._noted = self._noted, set()
        removed = super().removeAll()
        return removed + [writer for writer in noted if writer not in removed]

    def _flush(self) -> None:
        """
        Give each noted writer its C{doWrite}, as a writable event would,
        and register with epoll those that still have data to send.
        """
        noted, self._noted = self._noted, set()
        for writer in noted:
            fd = writer.fileno()
            if fd == -1:
                continue  # closed since it was noted
            self._flushing, self._flushed = writer, False
            try:
                self._dispatch(writer, fd, self._POLL_OUT)
            finally:
                self._flushing = None
            if not self._flushed and writer.fileno() != -1:
                super().addWriter(writer)

    def doPoll(self, timeout) -> None:
        if self._noted:
            self._flush()
            # The timeout was reckoned before the flush, and what the writes
            # set off (a connection lost, a Deferred fired, a call scheduled,
            # the reactor stopped, another write) is handled by the main
            # loop's next iteration, as it would be after an event: so this
            # poll must not wait.
            timeout = 0
        elif timeout is None:
            timeout = -1  # wait until an event
        try:
            # As Twisted's: at most one event per descriptor watched.
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                self._dispatch(selectable, fd, event)

    def _dispatch(self, selectable, fd: int, event: int) -> None:
        """
        Handle one event as Twisted's C{doPoll} does, without the legacy
        log context (see the module docstring).  An exception from the
        disconnection is logged here, as C{log.callWithLogger} did.
        """
        try:
            self._doReadOrWrite(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(system=_prefix(selectable))

    def _doReadOrWrite(self, selectable, fd: int, event: int) -> None:
        """
        Twisted's C{_PollLikeMixin._doReadOrWrite} (Twisted 25.5 and 26.10
        alike), except that an exception from C{doRead}/C{doWrite} is
        logged with the selectable's prefix as its C{system}, which the
        legacy log context used to give it.
        """
        why = None
        inRead = False
        if event & self._POLL_DISCONNECTED and not (event & self._POLL_IN):
            # Disconnected, and nothing left to read: a clean end if it was
            # being read (perhaps a half-close), otherwise an error.
            if fd in self._reads:
                inRead = True
                why = main.CONNECTION_DONE
            else:
                why = main.CONNECTION_LOST
        else:
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    if event & self._POLL_IN:
                        if self._read_buffer is None:
                            why = selectable.doRead()
                        else:
                            why = self._read(selectable)
                        inRead = True
                    if not why and event & self._POLL_OUT:
                        why = selectable.doWrite()
                        inRead = False
            except BaseException:
                # From application code: logged, and the selectable dropped.
                why = sys.exc_info()[1]
                log.err(system=_prefix(selectable))
        if why:
            self._disconnectSelectable(selectable, why, inRead)

    def _read(self, selectable):
        """
        What C{selectable.doRead()} does, reading into the reactor's buffer
        when C{selectable} is a TCP transport reading at most
        L{READ_INTO_MAX} bytes with Twisted's C{doRead} (not one that a
        splice, say, put in its place).

        @return: as C{doRead}: L{None}, or why the connection is lost.
        """
        doRead = selectable.doRead
        size = getattr(selectable, "bufferSize", 0)
        if (
            getattr(doRead, "__func__", None) is not _TCP_DO_READ
            or doRead.__self__ is not selectable
            or not 0 < size <= READ_INTO_MAX
        ):
            return doRead()
        buffer = self._read_buffer
        try:
            received = selectable.socket.recv_into(buffer, size)
        except OSError as se:
            # As Twisted's doRead.
            if se.args[0] == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return selectable._dataReceived(buffer[:received].tobytes())

    doIteration = doPoll


def install() -> GatewayEPollReactor:
    """
    Install L{GatewayEPollReactor} as the global reactor.

    @raise twisted.internet.error.ReactorAlreadyInstalledError: if a reactor
        is installed already.
    """
    reactor = GatewayEPollReactor()
    main.installReactor(reactor)
    return reactor


def install_unless_chosen() -> bool:
    """
    Install L{GatewayEPollReactor} as the global reactor, unless a reactor
    is installed already (twistd's or twist's C{--reactor}, or anything
    that imported C{twisted.internet.reactor}) or the platform has no epoll.

    @return: whether it was installed.
    """
    if "twisted.internet.reactor" in sys.modules or not hasattr(select, "epoll"):
        return False
    install()
    return True


__all__ = ["GatewayEPollReactor", "install", "install_unless_chosen"]
