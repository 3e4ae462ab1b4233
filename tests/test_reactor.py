"""
Tests for L{gateway.reactor}: the epoll reactor that tries each write
before it polls for writability.

Each test runs its own L{GatewayEPollReactor} (not installed as the global
one) over real sockets on 127.0.0.1, until the test stops it; a watchdog
call stops it after a few seconds if something hangs.
"""

import hashlib
import select

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

if not hasattr(select, "epoll"):  # pragma: no cover - not Linux
    pytest.skip("no epoll on this platform", allow_module_level=True)

from gateway.reactor import EAGER_LIMIT, READ_INTO_MAX, GatewayEPollReactor  # noqa: E402

WATCHDOG = 10.0  # seconds


class _CountingPoller:
    """The reactor's epoll object, counting registrations for writability."""

    def __init__(self, poller):
        self._poller = poller
        self.write_registrations = 0

    def _count(self, flags):
        if flags & select.EPOLLOUT:
            self.write_registrations += 1

    def register(self, fd, flags):
        self._count(flags)
        return self._poller.register(fd, flags)

    def modify(self, fd, flags):
        self._count(flags)
        return self._poller.modify(fd, flags)

    def __getattr__(self, name):
        return getattr(self._poller, name)


def _reactor(**kwargs):
    reactor = GatewayEPollReactor(**kwargs)
    reactor._poller = poller = _CountingPoller(reactor._poller)
    return reactor, poller


def _run(reactor, start):
    """
    Run C{reactor} with C{start(reactor)} called once it runs, until
    something stops it; fail if the watchdog had to.
    """
    fired = []

    def watchdog():
        fired.append(True)
        reactor.stop()

    call = reactor.callLater(WATCHDOG, watchdog)
    reactor.callWhenRunning(start, reactor)
    reactor.run(installSignalHandlers=False)
    assert not fired, "the reactor was stopped by the watchdog"
    if call.active():
        call.cancel()


def _listen(reactor, protocol):
    """Listen on an ephemeral port of 127.0.0.1; fires with the port number."""
    d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(protocol))
    return d.addCallback(lambda port: port.getHost().port)


def _connect(reactor, port, protocol):
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(protocol))


def _pair(server, client):
    """For L{_run}: a listener of C{server}s and one C{client} connected to it."""

    def start(reactor):
        return _listen(reactor, server).addCallback(lambda port: _connect(reactor, port, client))

    return start


class _Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data.upper())


def test_small_writes_are_sent_without_polling_for_writability():
    """
    Request/response exchanges of small messages go through with no
    C{EPOLLOUT} registration at all: each write is sent at the start of
    the next poll (Twisted's own epoll reactor registers twice per
    exchange, once for each side's write).
    """
    reactor, poller = _reactor()
    received = []
    rounds = 50

    class Client(Protocol):
        def connectionMade(self):
            self.transport.write(b"ping 0")

        def dataReceived(self, data):
            received.append(data)
            if len(received) == rounds:
                self.transport.loseConnection()
                reactor.stop()
            else:
                self.transport.write(b"ping %d" % len(received))

    _run(reactor, _pair(_Echo, Client))
    assert received == [b"PING %d" % i for i in range(rounds)]
    # The client's connect registers for writability once (a connect in
    # progress is not finished by the first try); the writes never do.
    assert poller.write_registrations <= 1


def test_stream_to_slow_reader_waits_for_writability():
    """
    A write the socket cannot take at once (a peer that does not read yet)
    is registered with epoll and finished when the peer reads: every byte
    arrives, in order.
    """
    reactor, poller = _reactor()
    payload = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB
    got = []

    class Sender(Protocol):
        def connectionMade(self):
            self.transport.write(payload)
            self.transport.loseConnection()

    class Receiver(Protocol):
        def connectionMade(self):
            # Read nothing for a while: the sender's socket fills up.
            self.transport.pauseProducing()
            reactor.callLater(0.2, self.transport.resumeProducing)

        def dataReceived(self, data):
            got.append(data)

        def connectionLost(self, reason):
            reactor.stop()

    _run(reactor, _pair(Sender, Receiver))
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(payload).digest()
    assert poller.write_registrations >= 1
    assert len(payload) >= EAGER_LIMIT


class _Silent(Protocol):
    """A peer that reads nothing: its socket never wakes the reactor."""

    def connectionMade(self):
        self.transport.pauseProducing()


def _flush_sets_off(on_more):
    """
    Run a reactor where a server connection's pull producer writes one
    small chunk and, when the flush has sent it and asks for more, calls
    C{on_more(reactor, order, other)}, which must lead to C{reactor.stop()}.
    C{other} is the server side of a second connection, whose client
    appends what it reads to C{order} and stops the reactor.

    The first client reads nothing and a call 5 s away gives the poll a
    timeout: nothing but the reactor's own bookkeeping can end the wait
    after the flush at once.

    @return: C{order}: it holds C{"later call"} if the poll waited.
    """
    reactor, _ = _reactor()
    order = []
    other = {}

    class Producer:
        calls = 0

        def __init__(self, transport):
            self.transport = transport

        def resumeProducing(self):
            self.calls += 1
            if self.calls == 1:
                self.transport.write(b"one small chunk")
            else:
                self.transport.unregisterProducer()
                on_more(reactor, order, other["transport"])

        def stopProducing(self):
            pass

    class Writer(Protocol):
        def connectionMade(self):
            self.transport.registerProducer(Producer(self.transport), False)

    class Receiver(Protocol):
        def dataReceived(self, data):
            order.append(data)
            reactor.stop()

    ports = {}

    class Holder(Protocol):
        def connectionMade(self):
            # The second connection is up: now the first one.
            other["transport"] = self.transport
            _connect(reactor, ports["writer"], _Silent)

    def start(reactor):
        reactor.callLater(WATCHDOG / 2, order.append, "later call")
        d = _listen(reactor, Writer)
        d.addCallback(lambda port: ports.setdefault("writer", port))
        d.addCallback(lambda _: _listen(reactor, Holder))
        d.addCallback(lambda port: _connect(reactor, port, Receiver))

    _run(reactor, start)
    return order


def test_call_scheduled_by_a_flushed_write_runs_at_once():
    """
    A call scheduled with C{callLater(0)} by what a flushed write set off
    (here a pull producer asked for more) runs on the next iteration: the
    poll after the flush does not block for the timeout reckoned before it.
    """

    def on_more(reactor, order, other):
        def scheduled():
            order.append("scheduled call")
            reactor.stop()

        reactor.callLater(0, scheduled)

    assert _flush_sets_off(on_more) == ["scheduled call"]


def test_write_noted_during_a_flush_is_sent_at_once():
    """
    A write to another connection made by what a flushed write set off is
    sent on the next iteration, not after the poll's timeout.
    """

    def on_more(reactor, order, other):
        other.write(b"relayed")

    assert _flush_sets_off(on_more) == [b"relayed"]


def test_stop_set_off_by_a_flush_is_not_delayed():
    """
    A reactor stopped by what a flushed write set off (here directly; in a
    gateway, the last drained connection closing) stops at once: the poll
    after the flush does not wait for the next timed call first.
    """

    def on_more(reactor, order, other):
        reactor.stop()

    assert _flush_sets_off(on_more) == []


def test_a_writer_that_stops_is_no_longer_watched():
    """
    A small write (noted) and then a large one (registered with epoll at
    once) in the same iteration, then C{stopWriting}: the reactor neither
    notes nor watches the writer any more.  (A registration left behind
    outlived the socket, and the next socket accepted with the same
    descriptor number failed in C{epoll_ctl} with ENOENT.)
    """
    reactor, _ = _reactor()
    found = {}

    class Sender(Protocol):
        def connectionMade(self):
            self.transport.write(b"small")
            self.transport.write(b"x" * (2 * EAGER_LIMIT))
            found["registered"] = self.transport.fileno() in reactor._writes
            self.transport.stopWriting()
            found["watched"] = self.transport.fileno() in reactor._writes
            found["listed"] = self.transport in reactor.getWriters()
            reactor.stop()

    _run(reactor, _pair(Sender, Protocol))
    assert found == {"registered": True, "watched": False, "listed": False}


def test_write_then_close_delivers_everything():
    """
    A connection written to and closed in the same iteration sends its data
    before it closes.
    """
    reactor, _ = _reactor()
    got = []

    class Sender(Protocol):
        def connectionMade(self):
            self.transport.write(b"last words")
            self.transport.loseConnection()

    class Receiver(Protocol):
        def dataReceived(self, data):
            got.append(data)

        def connectionLost(self, reason):
            reactor.stop()

    _run(reactor, _pair(Sender, Receiver))
    assert b"".join(got) == b"last words"


def test_noted_writers_are_listed_and_removed_once():
    """
    A writer noted but not yet flushed is among C{getWriters()}, and
    C{removeAll()} (the reactor's shutdown) returns it exactly once.
    """
    reactor, _ = _reactor()
    found = {}

    class Sender(Protocol):
        def connectionMade(self):
            self.transport.write(b"pending")
            found["writers"] = reactor.getWriters()
            found["removed"] = reactor.removeAll()
            found["transport"] = self.transport
            reactor.stop()

    _run(reactor, _pair(Sender, Protocol))
    transport = found["transport"]
    assert transport in found["writers"]
    assert found["removed"].count(transport) == 1
    assert reactor.getWriters() == []


class _LoggedEvents(list):
    """The log events emitted while it is observing the global publisher."""

    def __enter__(self):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.append)
        return self

    def __exit__(self, *exc):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.append)


def test_events_are_handled_without_the_legacy_log_context():
    """
    A protocol's C{dataReceived} runs with no C{system} pushed for it (the
    cost the module docstring gives), and an exception it raises is still
    logged with the connection's prefix, its connection dropped, the
    reactor unharmed.
    """
    from twisted.python import context, log

    reactor, _ = _reactor()
    seen = {}

    class Failing(Protocol):
        def dataReceived(self, data):
            seen["system"] = context.get(log.ILogContext)["system"]
            raise RuntimeError("handler failed")

        def connectionLost(self, reason):
            seen["lost"] = reason
            reactor.stop()

    class Writer(Protocol):
        def connectionMade(self):
            self.transport.write(b"x")

    with _LoggedEvents() as events:
        _run(reactor, _pair(Failing, Writer))
    assert seen["system"] == "-"
    assert seen["lost"].check(RuntimeError)
    failures = [e for e in events if e.get("isError")]
    assert [f["failure"].value.args for f in failures] == [("handler failed",)]
    assert failures[0]["system"].startswith("Failing,")  # the connection's prefix


def test_an_exception_from_a_disconnection_is_logged_with_the_prefix():
    """
    An exception that escapes the handling of an event (here from
    C{connectionLost}) is logged with the connection's C{logPrefix()} as
    its C{system}, as C{log.callWithLogger} logged it, and the reactor
    goes on.
    """
    reactor, _ = _reactor()

    class BadLoss(Protocol):
        def logPrefix(self):
            return "BadLoss"

        def connectionLost(self, reason):
            reactor.callLater(0, reactor.stop)
            raise ValueError("connectionLost failed")

    class Closer(Protocol):
        def connectionMade(self):
            self.transport.loseConnection()

    with _LoggedEvents() as events:
        _run(reactor, _pair(BadLoss, Closer))
    failures = [e for e in events if e.get("isError")]
    assert len(failures) == 1
    assert failures[0]["failure"].check(ValueError)
    assert failures[0]["system"].startswith("BadLoss,")  # the transport's prefix


# -- reads into the reactor's buffer ------------------------------------------


class _CountingSocket:
    """A transport's socket, counting the reads made on it."""

    def __init__(self, socket):
        self._socket = socket
        self.reads = {"recv": 0, "recv_into": 0}

    def recv(self, size, *args):
        self.reads["recv"] += 1
        return self._socket.recv(size, *args)

    def recv_into(self, buffer, size=0, *args):
        self.reads["recv_into"] += 1
        return self._socket.recv_into(buffer, size, *args)

    def __getattr__(self, name):
        return getattr(self._socket, name)


def _stream_through(reactor, size, buffer_size=None, shadow=False, reset=False):
    """
    Send C{size} random bytes over one connection of C{reactor} and close
    it.

    @param buffer_size: the receiving transport's C{bufferSize}, if not
        Twisted's default.
    @param shadow: whether to put a function of the test's in place of the
        receiving transport's C{doRead} (as a splice does), which counts
        its calls and calls the transport's own.
    @param reset: whether the sender resets the connection (C{SO_LINGER}
        0) instead of closing it, before the receiver reads anything.
    @return: C{(received, reads, lost, shadowed)}: the chunks the receiver
        got, its socket's read counts, why its connection was lost, and
        how often the shadow ran.
    """
    import os
    import socket
    import struct

    payload = os.urandom(size)
    found = {"chunks": [], "shadowed": 0}

    class Sender(Protocol):
        def connectionMade(self):
            self.transport.write(payload)
            if reset:
                self.transport.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.transport.abortConnection()
            else:
                self.transport.loseConnection()

        def connectionLost(self, reason):
            # The reset is in the receiver's socket now: let it read.
            found["sent"] = True
            if "receiver" in found:
                found["receiver"].resumeProducing()

    class Receiver(Protocol):
        def connectionMade(self):
            transport = self.transport
            found["socket"] = transport.socket = _CountingSocket(transport.socket)
            if buffer_size is not None:
                transport.bufferSize = buffer_size
            if reset and "sent" not in found:
                # Read nothing until the reset has arrived.
                transport.pauseProducing()
                found["receiver"] = transport
            if shadow:
                real = transport.doRead

                def shadowed():
                    found["shadowed"] += 1
                    return real()

                transport.doRead = shadowed

        def dataReceived(self, data):
            found["chunks"].append(data)

        def connectionLost(self, reason):
            found["lost"] = reason
            reactor.stop()

    _run(reactor, _pair(Sender, Receiver))
    if not reset:
        assert b"".join(found["chunks"]) == payload
    return found["chunks"], found["socket"].reads, found["lost"], found["shadowed"]


def test_reads_into_the_reactors_buffer():
    """
    With C{read_into}, a TCP transport is read into the reactor's buffer:
    every byte arrives, each chunk a C{bytes} of its own (not a view of the
    buffer, which the next read overwrites), and the peer's close ends the
    connection cleanly.
    """
    from twisted.internet.error import ConnectionDone

    reactor, _ = _reactor(read_into=True)
    chunks, reads, lost, _ = _stream_through(reactor, 4 * 1024 * 1024)
    assert reads["recv"] == 0
    assert reads["recv_into"] >= len(chunks) + 1  # and the read of the close
    assert all(type(chunk) is bytes for chunk in chunks)
    assert max(map(len, chunks)) <= READ_INTO_MAX
    assert lost.check(ConnectionDone)


def test_reads_into_the_buffer_respect_buffer_size():
    """A transport's smaller C{bufferSize} bounds each read, as with
    C{recv}."""
    reactor, _ = _reactor(read_into=True)
    chunks, reads, _, _ = _stream_through(reactor, 256 * 1024, buffer_size=1000)
    assert reads["recv"] == 0
    assert max(map(len, chunks)) <= 1000
    assert len(chunks) >= 256 * 1024 // 1000


def test_reset_while_reading_into_the_buffer_loses_the_connection():
    """A connection reset by the peer is lost, not done, as with
    Twisted's C{doRead}."""
    from twisted.internet.error import ConnectionLost

    reactor, _ = _reactor(read_into=True)
    _, reads, lost, _ = _stream_through(reactor, 64 * 1024, reset=True)
    assert reads["recv_into"] >= 1
    assert lost.check(ConnectionLost)


def test_reads_larger_than_the_buffer_use_doread():
    """A transport reading more than L{READ_INTO_MAX} at once reads with
    its own C{recv}."""
    reactor, _ = _reactor(read_into=True)
    _, reads, _, _ = _stream_through(reactor, 4 * 1024 * 1024, buffer_size=4 * READ_INTO_MAX)
    assert reads["recv_into"] == 0
    assert reads["recv"] >= 1


def test_shadowed_doread_is_called():
    """A C{doRead} put on the transport itself (a splice's) is called
    instead of a read into the reactor's buffer."""
    reactor, _ = _reactor(read_into=True)
    _, reads, _, shadowed = _stream_through(reactor, 1024 * 1024, shadow=True)
    assert shadowed >= 1
    assert reads["recv_into"] == 0


def test_without_read_into_doread_reads():
    reactor, _ = _reactor(read_into=False)
    _, reads, _, _ = _stream_through(reactor, 1024 * 1024)
    assert reads["recv_into"] == 0
    assert reads["recv"] >= 1


def test_read_into_by_default_on_pypy_only():
    import platform

    reactor = GatewayEPollReactor()
    assert (reactor._read_buffer is not None) == (platform.python_implementation() == "PyPy")
