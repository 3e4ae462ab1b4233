"""
A small HTTP backend for the demo, the tests and the benchmarks.

Run C{python -m gateway.demo_backend --port 9001 --name a}; it prints
C{listening on PORT} once it accepts connections (C{--port 0} picks a free
port). It answers every path with a JSON echo of the request, except:

  - C{/status/NNN}: answers with status NNN.
  - C{/slow?delay=S}: answers after S seconds.
  - C{/large?bytes=N}: streams N bytes (a fixed pattern) with Content-Length;
    with C{cut=M}, closes the connection after the first M of them; with
    C{chunk=C}, writes C bytes at a time (64 KiB by default).
  - C{/chunked?bytes=N}: the same, chunked (no Content-Length).
  - C{/cookies}: sets three cookies (three C{Set-Cookie} fields).
  - C{/hopbyhop}: sends hop-by-hop fields that a proxy must drop.
  - C{/hang}: never answers.
  - C{/drop}: closes the connection without answering.
  - C{/truncate}: promises 1000 bytes, sends 10 and closes.
  - C{/_stats}: JSON counts of requests served, in flight, and abandoned
    by the client (or the gateway) before the answer; under C{cacheable},
    per C{/cacheable/ID}: requests and 304s answered.
  - C{/cacheable/ID}: a response for caching tests, counted per ID. Query
    parameters: C{cc} (its C{Cache-Control}, default C{max-age=60}),
    C{etag} (sends C{ETag: "VALUE"} and answers a matching
    C{If-None-Match} with 304), C{lm} (sends C{Last-Modified} of that POSIX
    time and answers C{If-Modified-Since} with 304), C{cc304} (the
    C{Cache-Control} of those 304s, default C{cc}), C{ccnext} (the
    C{Cache-Control} of this ID's full responses after its first, default
    C{cc}), C{vary}, C{cookie=1}
    (adds C{Set-Cookie}), C{bytes=N} (an N-byte body instead of JSON),
    C{delay=S} (answers after S seconds). The JSON body carries C{n}, the
    count of this ID's requests so far, and the request headers.
  - C{/_fail/ID?status=NNN}: from now on C{/cacheable/ID} answers NNN
    (C{status=0} restores it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Optional

from twisted.internet.interfaces import IPullProducer
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int) -> bytes:
    """The first C{n} bytes of what C{/large?bytes=n} streams."""
    full, rest = divmod(n, len(PATTERN))
    return PATTERN * full + PATTERN[:rest]


@implementer(IPullProducer)
class _PatternProducer:
    def __init__(
        self, request: server.Request, remaining: int, cut: Optional[int] = None, chunk: int = len(PATTERN)
    ) -> None:
        self.request = request
        self.remaining = remaining
        #: body bytes after which the connection is closed (None: never)
        self.cut = cut
        #: bytes per write
        self.chunk = chunk
        self.offset = 0

    def resumeProducing(self) -> None:
        if self.cut is not None and self.cut <= 0:
            self.remaining = 0
            self.request.unregisterProducer()
            self.request.channel.transport.loseConnection()
            return
        if self.remaining <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            return
        size = min(self.chunk, self.remaining, len(PATTERN) - self.offset)
        if self.cut is not None:
            size = min(size, self.cut)
        chunk = PATTERN[self.offset : self.offset + size]
        self.offset = (self.offset + size) % len(PATTERN)
        self.remaining -= len(chunk)
        if self.cut is not None:
            self.cut -= len(chunk)
        self.request.write(chunk)

    def stopProducing(self) -> None:
        self.remaining = 0


class Echo(Resource):
    isLeaf = True

    def __init__(self, name: str, reactor) -> None:
        super().__init__()
        self.name = name
        self.reactor = reactor
        self.stats = {"requests": 0, "in_flight": 0, "abandoned": 0, "cacheable": {}}
        self.failing: dict = {}

    def _track(self, result, request):
        self.stats["in_flight"] -= 1
        if not request.finished:
            self.stats["abandoned"] += 1
        return None

    def render(self, request: server.Request):
        path = request.path
        if path == b"/_stats":
            request.setHeader(b"Content-Type", b"application/json")
            return json.dumps(self.stats).encode()
        if path.startswith(b"/_fail/"):
            ident = path[len(b"/_fail/"):].decode("latin-1")
            self.failing[ident] = int(request.args.get(b"status", [b"0"])[0])
            return b"ok\n"
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        request.notifyFinish().addBoth(self._track, request)
        request.setHeader(b"X-Backend", self.name.encode())
        if path.startswith(b"/status/"):
            code = int(path.split(b"/")[2])
            request.setResponseCode(code)
            if code in (204, 304):
                return b""
            return self.echo(request)
        if path == b"/slow":
            delay = float(request.args.get(b"delay", [b"1"])[0])
            call = self.reactor.callLater(delay, self._late, request)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return server.NOT_DONE_YET
        if path in (b"/large", b"/chunked"):
            n = int(request.args.get(b"bytes", [b"1048576"])[0])
            request.setHeader(b"Content-Type", b"application/octet-stream")
            if path == b"/large":
                request.setHeader(b"Content-Length", b"%d" % n)
            if request.method == b"HEAD":
                return b""
            cut = request.args.get(b"cut")
            chunk = int(request.args.get(b"chunk", [b"%d" % len(PATTERN)])[0])
            producer = _PatternProducer(request, n, int(cut[0]) if cut else None, max(1, chunk))
            request.registerProducer(producer, False)
            return server.NOT_DONE_YET
        if path == b"/cookies":
            for i in range(3):
                request.responseHeaders.addRawHeader(b"Set-Cookie", b"c%d=v%d; Path=/" % (i, i))
            return self.echo(request)
        if path == b"/hopbyhop":
            request.setHeader(b"Connection", b"X-Secret-Hop")
            request.setHeader(b"X-Secret-Hop", b"1")
            request.setHeader(b"Keep-Alive", b"timeout=5")
            request.setHeader(b"Proxy-Authenticate", b"Basic")
            request.setHeader(b"X-End-To-End", b"kept")
            return self.echo(request)
        if path.startswith(b"/cacheable/"):
            return self.cacheable(request, path[len(b"/cacheable/"):].decode("latin-1"))
        if path == b"/hang":
            return server.NOT_DONE_YET
        if path == b"/drop":
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if path == b"/truncate":
            request.setHeader(b"Content-Length", b"1000")
            request.write(b"0123456789")
            request.channel.transport.loseConnection()
            return server.NOT_DONE_YET
        return self.echo(request)

    def cacheable(self, request: server.Request, ident: str):
        counts = self.stats["cacheable"].setdefault(ident, {"requests": 0, "not_modified": 0})
        counts["requests"] += 1
        arg = lambda name, default=None: (  # noqa: E731
            request.args[name.encode()][0].decode("latin-1") if name.encode() in request.args else default
        )
        failing = self.failing.get(ident)
        if failing:
            request.setResponseCode(failing)
            request.setHeader(b"Cache-Control", b"no-store")
            return self.echo(request)
        cc = arg("cc", "max-age=60")
        if counts["requests"] > 1:
            cc = arg("ccnext", cc)
        etag = arg("etag")
        lm = arg("lm")
        if arg("vary"):
            request.setHeader(b"Vary", arg("vary").encode("latin-1"))
        if etag is not None:
            request.setHeader(b"ETag", b'"%s"' % etag.encode("latin-1"))
        if lm is not None:
            request.setHeader(b"Last-Modified", http.datetimeToString(int(lm)))
        not_modified = False
        inm = request.getHeader(b"if-none-match")
        ims = request.getHeader(b"if-modified-since")
        if inm is not None and etag is not None:
            tags = [t.strip().removeprefix(b"W/") for t in inm.split(b",")]
            not_modified = b"*" in tags or b'"%s"' % etag.encode("latin-1") in tags
        elif ims is not None and lm is not None:
            try:
                not_modified = int(lm) <= http.stringToDatetime(ims)
            except ValueError:
                pass
        if not_modified:
            counts["not_modified"] += 1
            request.setResponseCode(304)
            request.setHeader(b"Cache-Control", arg("cc304", cc).encode("latin-1"))
            return b""
        request.setHeader(b"Cache-Control", cc.encode("latin-1"))
        if arg("cookie"):
            request.addCookie(b"session", b"s%d" % counts["requests"], path=b"/")
        if arg("bytes") is not None:
            request.setHeader(b"Content-Type", b"application/octet-stream")
            body = pattern_bytes(int(arg("bytes")))
        else:
            request.setHeader(b"Content-Type", b"application/json")
            body = json.dumps(
                {
                    "backend": self.name,
                    "id": ident,
                    "n": counts["requests"],
                    "headers": [
                        [k.decode("latin-1"), v.decode("latin-1")]
                        for k, vs in request.requestHeaders.getAllRawHeaders()
                        for v in vs
                    ],
                }
            ).encode() + b"\n"
        delay = float(arg("delay", "0"))
        if delay <= 0:
            return body

        def late():
            request.write(body)
            request.finish()

        call = self.reactor.callLater(delay, late)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return server.NOT_DONE_YET

    def _late(self, request: server.Request) -> None:
        request.write(self.echo(request))
        request.finish()

    def echo(self, request: server.Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(
            {
                "backend": self.name,
                "method": request.method.decode(),
                "uri": request.uri.decode("latin-1"),
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode() + b"\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--name", default="backend")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    # Echo bodies as they came: a form body is not parsed into request.args.
    site = server.Site(Echo(args.name, reactor), parsePOSTFormSubmission=False)
    site.noisy = False
    site.log = lambda request: None
    port = reactor.listenTCP(args.port, site, backlog=1024, interface=args.interface)
    print(f"listening on {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
