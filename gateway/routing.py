"""
Routing: which route, and so which service, owns a request.

A route matches on the request's host, method, headers and path prefix; of
the routes that match, the one with the longest path prefix wins, then the
most specific (host, headers, methods), then the first in the config file.
Paths are normalised before matching (RFC 3986 §6.2.2.2 percent-encoding
normalisation of unreserved characters, §5.2.4 dot-segment removal), so that
C{/api/users/../../admin} cannot reach a route that C{/admin} would not.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

from gateway.config import Route

_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")

#: Looks up a request header by lower-case name: its first value, or None.
HeaderLookup = Callable[[bytes], Optional[bytes]]


def _normalise_escape(match: "re.Match[bytes]") -> bytes:
    code = int(match.group(1), 16)
    if code in _UNRESERVED:
        return bytes((code,))
    return b"%" + match.group(1).upper()


def remove_dot_segments(path: bytes) -> bytes:
    """
    Remove C{.} and C{..} segments from an absolute path, per RFC 3986
    §5.2.4; C{..} never climbs above the root.

    @param path: an absolute path, starting with C{/}.
    @return: the path without dot segments, still starting with C{/}.
    """
    if b"." not in path:
        return path
    output: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == b".":
            if last:
                output.append(b"")
        elif segment == b"..":
            if output:
                output.pop()
            if last:
                output.append(b"")
        else:
            output.append(segment)
    return b"/" + b"/".join(output)


def normalise_path(path: bytes) -> bytes:
    """
    Normalise a request path (without its query) for matching and
    forwarding.

    Percent-encoded unreserved characters are decoded and other escapes
    upper-cased (RFC 3986 §6.2.2.1-2), then dot segments are removed
    (§5.2.4). A path that does not start with C{/} (such as C{*} or an
    absolute URI's path part) is made to.

    @type path: L{bytes}
    @rtype: L{bytes}
    """
    if b"%" in path:
        path = _PERCENT.sub(_normalise_escape, path)
    if not path.startswith(b"/"):
        path = b"/" + path
    return remove_dot_segments(path)


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """
    Split a request target into its path and its query (with the C{?}).

    An absolute-form target (C{http://host/path?q}, RFC 9112 §3.2.2) is
    reduced to its path and query.

    @return: C{(path, query)}, C{query} being C{b""} or starting with C{?}.
    """
    if not target.startswith(b"/") and b"://" in target[:16]:
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        target = rest[slash:] if slash >= 0 else b"/"
    path, sep, query = target.partition(b"?")
    return path, (b"?" + query if sep else b"")


def host_of(host_header: Optional[bytes]) -> str:
    """
    The lower-case host name of a C{Host} header value, without its port.
    """
    if not host_header:
        return ""
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _host_matches(pattern: Optional[str], host: str) -> bool:
    if pattern is None:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def _specificity(route: Route) -> tuple[int, int, int, int]:
    match = route.match
    host = 0 if match.host is None else (1 if match.host.startswith("*.") else 2)
    return (len(match.path_prefix), host, len(match.headers), len(match.methods))


class Router:
    """
    Chooses the route of a request.

    @param routes: the configured routes, in config order.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        order = sorted(
            enumerate(routes), key=lambda pair: (_specificity(pair[1]), -pair[0]), reverse=True
        )
        self._routes = tuple(
            (
                route,
                route.match.path_prefix.encode("utf-8"),
                route.match.path_prefix.encode("utf-8") + b"/",
            )
            for _, route in order
        )

    def match(
        self, method: bytes, path: bytes, host: str, header: HeaderLookup
    ) -> Optional[Route]:
        """
        The route for a request, or None.

        @param method: the request method, upper-case.
        @param path: the normalised path (see L{normalise_path}).
        @param host: the request's host name, lower-case, without port.
        @param header: called with a lower-case header name (bytes), returns
            that header's first value or None.
        """
        method_str = None
        for route, prefix, prefix_slash in self._routes:
            if prefix != b"/" and path != prefix and not path.startswith(prefix_slash):
                continue
            match = route.match
            if match.host is not None and not _host_matches(match.host, host):
                continue
            if match.methods:
                if method_str is None:
                    method_str = method.decode("ascii", "replace")
                if method_str not in match.methods:
                    continue
            if match.headers and any(header(n) != v for n, v in match.headers):
                continue
            return route
        return None

