"""
The access log: one structured event per request, and an optional file
of one line per request, in the combined log format or as JSON Lines.

L{AccessLog} is a request observer. For each finished request it emits one
C{twisted.logger} event in the namespace C{gateway.access} whose fields
(L{ACCESS_FIELDS}) are separate keys, not a formatted string: C{twist
--log-format=json gateway ...} writes them as one JSON object per line, and
a text log shows them through L{ACCESS_FORMAT}.

No request header is logged except C{User-Agent} and C{Referer} in the
combined file and those named in C{access_log.headers}, which may not
name one of L{SENSITIVE_HEADERS} (a header a route takes API keys from
is logged as C{REDACTED}; any other is logged as it came, so name none
that carries a secret); query parameters whose names look like
credentials (L{SENSITIVE_QUERY_PARAMETERS}, plus any configured) have
their values replaced by C{REDACTED}.
L{redact_headers} is the one place that decides which headers are secret,
for any code that must show headers.

L{AccessLogFile} writes the file's lines (L{combined_line} or
L{json_line}) from a thread of its own, in batches, so that a slow disk
never blocks the reactor; see its docstring for the buffering and
rotation rules.
"""

from __future__ import annotations

import os
import time
from json import JSONEncoder
from typing import Iterable, Optional
from urllib.parse import unquote_to_bytes

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.threadpool import ThreadPool

_log = Logger()
_ACCESS_NAMESPACE = "gateway.access"

#: The fields of every access-log event, in order. With
#: C{access_log.headers} configured, a last field C{request_headers} maps
#: each named request header (lower case) to its value, or None when the
#: request had none (L{access_fields}).
ACCESS_FIELDS = (
    "time", "request_id", "trace_id", "client_ip", "consumer", "method", "path", "route",
    "service", "backend", "status", "bytes_in", "bytes_out", "duration_ms",
    "upstream_duration_ms", "cache", "retries", "error",
)

#: How an access event reads in a text log. Every field is in the event
#: either way. The event's C{log_format} is this text already filled in
#: (L{access_text}), with no replacement fields left: twisted.logger then
#: has nothing to flatten, which halves what the JSON observer costs per
#: request.
ACCESS_FORMAT = '"{method} {path}" {status} {duration_ms}ms {request_id}'

REDACTED = "REDACTED"

#: Header names (lower case) whose values are secrets.
SENSITIVE_HEADERS = frozenset(
    [
        b"authorization", b"proxy-authorization", b"cookie", b"set-cookie", b"x-api-key",
        b"api-key", b"apikey", b"x-auth-token", b"x-access-token", b"x-csrf-token",
    ]
)

#: Query parameter names (lower case) whose values are secrets.
SENSITIVE_QUERY_PARAMETERS = frozenset(
    [
        "api_key", "apikey", "api-key", "key", "token", "access_token", "id_token",
        "refresh_token", "auth", "password", "passwd", "secret", "client_secret",
        "signature", "sig", "code", "jwt", "session", "x-api-key",
    ]
)


def redact_headers(pairs: Iterable, extra: Iterable[bytes] = ()) -> list:
    """
    C{(name, value)} header pairs with secret values replaced by C{REDACTED}.

    @param pairs: C{(bytes name, bytes value)} pairs, e.g. from
        C{Headers.getAllRawHeaders} flattened.
    @param extra: more secret header names, lower case.
    """
    secret = SENSITIVE_HEADERS.union(extra) if extra else SENSITIVE_HEADERS
    return [
        (name, REDACTED.encode("ascii") if name.lower() in secret else value) for name, value in pairs
    ]


def redact_query(query: bytes, sensitive: frozenset = SENSITIVE_QUERY_PARAMETERS) -> bytes:
    """
    The query string C{query} (with its C{?}, or empty) with the values of
    sensitive parameters replaced by C{REDACTED}. Parameter names are
    compared after percent-decoding, ignoring case.
    """
    if not query:
        return query
    parts = query[1:].split(b"&")
    changed = False
    for i, part in enumerate(parts):
        name, eq, _ = part.partition(b"=")
        if not eq:
            continue
        if unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace").lower() in sensitive:
            parts[i] = name + b"=" + REDACTED.encode("ascii")
            changed = True
    return b"?" + b"&".join(parts) if changed else query


def access_text(fields: dict) -> str:
    """
    L{ACCESS_FORMAT} filled in from C{fields} (L{access_fields}), with
    C{{} and C{}} doubled, so that it is itself a C{log_format} with no
    replacement fields: formatting it gives the text back.
    """
    text = ACCESS_FORMAT.format_map(fields)
    if "{" in text or "}" in text:
        text = text.replace("{", "{{").replace("}", "}}")
    return text


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


#: The second last formatted by L{_iso_time}, and its text: requests come
#: many per second, and strftime is most of the cost.
_last_second = [None, ""]


def _iso_time(seconds: float) -> str:
    """C{2024-05-01T12:00:00.123Z} (UTC, milliseconds)."""
    whole = int(seconds)
    last = _last_second
    if last[0] != whole:
        last[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        last[0] = whole
    return last[1] + ".%03dZ" % int((seconds - whole) * 1000)


def access_fields(context, sensitive: frozenset = SENSITIVE_QUERY_PARAMETERS) -> dict:
    """
    The access-log fields of a finished request (L{ACCESS_FIELDS}).

    Times are milliseconds, rounded to microseconds; C{path} carries the
    query string with sensitive values redacted; values that do not apply
    (no route, no backend, no cache) are None. C{request_headers} follows
    when the request's C{notes} hold the logged headers
    (C{{"user-agent": "curl/8.0", "referer": None}}: a header's values
    joined by C{", "}, RFC 9110 section 5.3), as the C{observe} filter
    records them when C{access_log.headers} is configured.
    """
    route = context.route
    backend = context.backend
    trace = context.notes.get("trace")
    upstream = None
    if context.upstream_ended >= context.upstream_started > 0:
        upstream = round((context.upstream_ended - context.upstream_started) * 1000, 3)
    fields = {
        "time": _iso_time(context.started),
        "request_id": context.request_id,
        "trace_id": trace.trace_id if trace is not None else None,
        "client_ip": context.client_ip,
        "consumer": context.consumer,
        "method": _text(context.method),
        "path": _text(context.path + redact_query(context.query, sensitive)),
        "route": route.name if route is not None else None,
        "service": context.service,
        "backend": backend.url if backend is not None else None,
        "status": context.status,
        "bytes_in": context.bytes_in,
        "bytes_out": context.bytes_out,
        "duration_ms": round((context.ended - context.started) * 1000, 3),
        "upstream_duration_ms": upstream,
        "cache": context.cache,
        "retries": context.retries,
        "error": context.error,
    }
    headers = context.notes.get("request_headers")
    if headers is not None:
        fields["request_headers"] = headers
    return fields


def _unexpected(value) -> str:
    """A value JSON has no type for, in a JSON line: bytes decoded, others C{repr}."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


_encode = JSONEncoder(separators=(",", ":"), default=_unexpected).encode


def json_line(context, sensitive: frozenset = SENSITIVE_QUERY_PARAMETERS) -> bytes:
    """
    The request's access-log fields (L{access_fields}) as one compact JSON
    object on one line, with a newline: a JSON Lines record
    (U{https://jsonlines.org}). Non-ASCII text and line separators are
    written as C{\\u} escapes (RFC 8259, section 7), so the line is ASCII
    and holds no newline of its values. A value JSON has no type for
    (none of L{access_fields}'s) is written as a string, not refused.
    """
    return (_encode(access_fields(context, sensitive)) + "\n").encode("ascii")


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _quoted(value: bytes) -> bytes:
    """A combined-log field: C{"} and non-printable bytes escaped as C{\\xHH}."""
    out = bytearray()
    for byte in value:
        if byte < 0x20 or byte >= 0x7F or byte in (0x22, 0x5C):
            out += b"\\x%02x" % byte
        else:
            out.append(byte)
    return bytes(out)


def combined_line(context, sensitive: frozenset = SENSITIVE_QUERY_PARAMETERS) -> bytes:
    """
    The request in the combined log format, with a newline::

        127.0.0.1 - alice [01/May/2024:12:00:00 +0000] "GET /x?a=1 HTTP/1.1" 200 512 "-" "curl/8.0"

    The user field is the consumer (C{-} for none). The protocol, referer
    and user agent come from C{context.notes["client"]}, which the
    observability filter sets (also for requests no route matched, and
    for refused ones); without it they show C{HTTP/1.1}, C{-} and C{-}.
    """
    t = time.gmtime(int(context.started))
    stamp = b"%02d/%s/%04d:%02d:%02d:%02d +0000" % (
        t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec
    )
    proto, referer, agent = context.notes.get("client") or (b"HTTP/1.1", None, None)
    consumer = context.consumer.encode("utf-8", "replace") if context.consumer else b"-"
    request_line = context.method + b" " + context.path + redact_query(context.query, sensitive) + b" " + proto
    return b'%s - %s [%s] "%s" %d %s "%s" "%s"\n' % (
        context.client_ip.encode("ascii", "replace") or b"-",
        _quoted(consumer).replace(b" ", b"_"),
        stamp,
        _quoted(request_line),
        context.status,
        b"%d" % context.bytes_out if context.bytes_out else b"-",
        _quoted(referer) if referer else b"-",
        _quoted(agent) if agent else b"-",
    )


#: The line functions of the access-log file, by C{file_format}.
FILE_FORMATS = {"combined": combined_line, "json": json_line}


class AccessLogFile(TimerService):
    """
    Appends access-log lines to a file without blocking the reactor.

    L{write} only appends to an in-memory buffer. Every C{flush_interval}
    seconds the buffer is handed, as one batch, to a thread of this
    object's own, which opens the file in append mode, writes the batch
    and closes it; so does L{write} as soon as C{batch_size} bytes wait
    and no batch is being written, so that under load lines wait
    milliseconds, not a whole interval (a JIT's collector then frees them
    young instead of promoting a second of lines to its old generation).
    Opening per batch means log rotation needs no signal:
    once the file is renamed, the next batch creates a new one. At most one
    batch is written at a time; while the disk is slow, lines accumulate up
    to C{max_buffer} bytes and further lines are dropped and counted in
    L{dropped} (and reported in the log), so memory stays bounded. On
    stop, what is buffered is written before the thread ends; lines
    written after that are counted in L{dropped}.

    @param path: the file to append to.
    @param reactor: provides C{IReactorTime} and C{IReactorThreads}.
    @param flush_interval: seconds between batches.
    @param max_buffer: the most bytes held in memory, waiting or being written.
    @param batch_size: bytes waiting that start a batch before the interval
        ends; 0 for none (a batch every C{flush_interval} only).
    """

    def __init__(
        self,
        path: str,
        reactor,
        flush_interval: float = 1.0,
        max_buffer: int = 8 << 20,
        batch_size: int = 64 << 10,
    ) -> None:
        super().__init__(flush_interval, self.flush)
        self.clock = reactor
        self.setName("access-log-file")
        self.path = path
        self._reactor = reactor
        self._max_buffer = max_buffer
        self._lines: list = []
        self._buffered = 0
        self._waiting = 0
        self._batch_size = batch_size
        self._writing: Optional[Deferred] = None
        self._pool: Optional[ThreadPool] = None
        self._closed = False
        self.dropped = 0
        self._dropped_reported = 0
        self.written = 0

    def write(self, line: bytes) -> None:
        """Queue one line (with its newline) for the file."""
        if self._buffered + len(line) > self._max_buffer or self._closed:
            self.dropped += 1
            return
        self._lines.append(line)
        self._buffered += len(line)
        self._waiting += len(line)
        # (Not once stopping: stopService writes what is left itself.)
        if 0 < self._batch_size <= self._waiting and self._writing is None and self.running:
            self.flush()

    def startService(self) -> None:
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="txgateway-access-log")
        self._pool.start()
        super().startService()

    def flush(self) -> Deferred:
        """
        Hand the buffered lines to the writer thread, unless a batch is
        still being written.

        @return: fires when this batch is written (or at once if none).
        """
        if self.dropped != self._dropped_reported:
            _log.warn(
                "access log file {path} is behind: {dropped} lines dropped so far",
                path=self.path,
                dropped=self.dropped,
            )
            self._dropped_reported = self.dropped
        if self._writing is not None or not self._lines or self._pool is None:
            return succeed(None)
        batch = b"".join(self._lines)
        count = len(self._lines)
        self._lines = []
        self._waiting = 0
        d = self._writing = deferToThreadPool(self._reactor, self._pool, _append, self.path, batch)

        def written(_):
            self.written += count

        def failed(failure):
            # The batch is lost: counted with the dropped lines, but not
            # reported again as the disk falling behind.
            self.dropped += count
            self._dropped_reported += count
            _log.failure(
                "could not write the access log file {path}: {count} lines lost",
                failure,
                path=self.path,
                count=count,
            )

        def done(_):
            self._writing = None
            self._buffered -= len(batch)

        d.addCallbacks(written, failed)
        d.addBoth(done)
        return d

    def stopService(self) -> Deferred:
        """
        Write every line buffered, including those written meanwhile, then
        end the thread; lines written after that are counted as dropped.
        """
        super().stopService()
        d = self._writing if self._writing is not None else succeed(None)

        def write_the_rest(_):
            if self._lines and self._pool is not None:
                return self.flush().addCallback(write_the_rest)
            return None

        d.addCallback(write_the_rest)

        def stop_thread(_):
            self._closed = True
            if self._pool is not None:
                self._pool.stop()
                self._pool = None

        d.addBoth(stop_thread)
        return d


def _append(path: str, data: bytes) -> None:
    """
    Append C{data} to the file at C{path} with one C{write(2)} in append
    mode (more only if the kernel writes less), so that the batches of
    several processes appending to one file (C{--workers}) land whole, one
    after another.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


class AccessLog:
    """
    A request observer that emits the access-log event of each request
    and, when configured, writes its line to the access-log file.

    @param file: the L{AccessLogFile}, or None for none.
    @param file_format: the file's lines: C{"combined"} (L{combined_line})
        or C{"json"} (L{json_line}).
    @param sensitive: query parameter names whose values are redacted.
    @param enabled: emit the structured event (the file is written
        either way).
    @param observer: where the events go (by default the global log
        publisher, i.e. wherever C{twist}/C{twistd} send the log).

    Each event is what C{Logger(namespace="gateway.access").info(...)}
    would emit, built directly: the L{ACCESS_FIELDS} plus C{log_level}
    (info), C{log_namespace}, C{log_source} (None), C{log_time} and a
    C{log_format} already filled in (L{access_text}). It has no
    C{log_logger}, which the JSON observer would otherwise serialise as an
    unpersistable object on every request.
    """

    def __init__(
        self,
        file: Optional[AccessLogFile] = None,
        sensitive: frozenset = SENSITIVE_QUERY_PARAMETERS,
        enabled: bool = True,
        observer: ILogObserver = globalLogPublisher,
        file_format: str = "combined",
    ) -> None:
        if file_format not in FILE_FORMATS:
            raise ValueError(f"file_format: {file_format!r} is not one of {sorted(FILE_FORMATS)}")
        self.file = file
        self.file_format = file_format
        self._line = FILE_FORMATS[file_format]
        self.sensitive = sensitive
        self.enabled = enabled
        self._observer = observer

    def __call__(self, context) -> None:
        if self.enabled:
            event = access_fields(context, self.sensitive)
            event["log_format"] = access_text(event)
            event["log_level"] = LogLevel.info
            event["log_namespace"] = _ACCESS_NAMESPACE
            event["log_source"] = None
            event["log_time"] = time.time()
            self._observer(event)
        if self.file is not None:
            self.file.write(self._line(context, self.sensitive))

