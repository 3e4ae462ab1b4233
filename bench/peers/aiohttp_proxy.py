"""
Peer: a bare aiohttp reverse proxy on uvloop.

One C{ClientSession} with a C{TCPConnector} (keep-alive pool to the origin),
request bodies streamed up, response bodies streamed back chunk by chunk,
hop-by-hop headers (RFC 9110 section 7.6.1) dropped both ways, no access log,
no decompression.

    python bench/peers/aiohttp_proxy.py --port 8080 --origin http://127.0.0.1:8081
"""

import argparse
import asyncio

import aiohttp
import uvloop
import yarl
from aiohttp import web

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)


def _filter(headers):
    """
    Copy C{headers} without hop-by-hop ones (and those named in
    C{Connection}); repeated headers keep their order.
    """
    named = {
        t.strip().lower()
        for v in headers.getall("Connection", ())
        for t in v.split(",")
    }
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP | named]


def make_app(origin):
    async def on_startup(app):
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=75),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )

    async def on_cleanup(app):
        await app["session"].close()

    async def handle(request):
        session = request.app["session"]
        body = request.content if request.body_exists else None
        async with session.request(
            request.method,
            # raw_path keeps the query string and the client's encoding.
            yarl.URL(origin + request.raw_path, encoded=True),
            headers=_filter(request.headers),
            data=body,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason,
                headers=_filter(upstream.headers),
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 16):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve(port, origin):
    runner = web.AppRunner(make_app(origin), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main():
    parser = argparse.ArgumentParser(description="aiohttp + uvloop reverse-proxy peer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--origin", required=True, help="http://host:port")
    args = parser.parse_args()
    try:
        uvloop.run(serve(args.port, args.origin.rstrip("/")))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
