"""
The gateway's configuration: one YAML file read into frozen objects.

L{load_config} reads and validates a whole file; any error is raised as one
L{ConfigError} naming the file, the line and the reason, for example::

    etc/gateway.yaml:14: routes[2].service: no service named 'userz'

Unknown keys are errors: a misspelt option must never be silently ignored.
Durations are a number of seconds or a string such as C{"250ms"}, C{"2s"},
C{"1m"}, C{"1h"}; sizes are a number of bytes or a string such as C{"512KiB"},
C{"10MiB"}, C{"1GiB"}.
"""

from __future__ import annotations

import importlib
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """
    A configuration file was refused.

    @ivar path: the file's path, as given.
    @ivar line: the 1-based line of the offending value, or 0 if unknown.
    @ivar reason: what is wrong, starting with the dotted place in the
        document (C{routes[2].service: ...}).
    """

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(path, line, reason)
        self.path = path
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


# --- reading YAML with line numbers ------------------------------------------


class _Mapping(dict):
    """A YAML mapping that remembers the line of itself and of each key."""

    line: int = 0
    lines: dict


class _List(list):
    """A YAML sequence that remembers the line of itself and of each item."""

    line: int = 0
    lines: list


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry their line numbers."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    result = _Mapping()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise _LoadError(key_node.start_mark.line + 1, "keys must be scalars")
        if key in result:
            raise _LoadError(key_node.start_mark.line + 1, f"duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = value_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _List:
    result = _List(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


class _LoadError(Exception):
    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason


# --- walking the document ----------------------------------------------------


@attrs.frozen
class Where:
    """
    A place in the configuration document: the file, the dotted path of the
    value (C{services.users.backends[1].url}) and its line.
    """

    file: str
    path: str
    line: int

    def error(self, reason: str) -> ConfigError:
        """Build the L{ConfigError} for C{reason} at this place."""
        prefix = f"{self.path}: " if self.path else ""
        return ConfigError(self.file, self.line, prefix + reason)

    def child(self, name: Any, line: int) -> "Where":
        if isinstance(name, int):
            return Where(self.file, f"{self.path}[{name}]", line)
        return Where(self.file, f"{self.path}.{name}" if self.path else str(name), line)


_REQUIRED: Any = object()


class Section:
    """
    A YAML mapping being read into a config object.

    Each L{take} removes a key; L{finish} then refuses whatever keys are
    left, so that misspelt options are errors.
    """

    def __init__(self, where: Where, data: Any) -> None:
        if not isinstance(data, dict):
            raise where.error(f"expected a mapping, got {_kind(data)}")
        self.where = where
        self._data = dict(data)
        self._lines = getattr(data, "lines", {})

    def at(self, key: str) -> Where:
        """The place of C{key} in this section (the section's own if absent)."""
        return self.where.child(key, self._lines.get(key, self.where.line))

    def has(self, key: str) -> bool:
        return key in self._data

    def take(
        self,
        key: str,
        parse: Callable[[Where, Any], T],
        default: Any = _REQUIRED,
    ) -> T:
        """
        Remove C{key} and return C{parse(where, value)}.

        @param default: returned when the key is absent or null; without
            it the key is required.
        @raise ConfigError: the key is required and absent, or C{parse}
            refused the value.
        """
        if key not in self._data or self._data[key] is None:
            self._data.pop(key, None)
            if default is _REQUIRED:
                raise self.where.error(f"missing required key '{key}'")
            return default
        value = self._data.pop(key)
        return parse(self.at(key), value)

    def finish(self) -> None:
        """
        @raise ConfigError: a key was not taken, naming the first of them.
        """
        for key in self._data:
            where = self.at(key)
            raise where.error("unknown key")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping", _Mapping: "a mapping", list: "a list", _List: "a list",
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    }.get(type(value), type(value).__name__)


def sequence(where: Where, value: Any) -> list[tuple[Where, Any]]:
    """Each item of a YAML list with its place. @raise ConfigError: not a list."""
    if not isinstance(value, list):
        raise where.error(f"expected a list, got {_kind(value)}")
    lines = getattr(value, "lines", None) or [where.line] * len(value)
    return [(where.child(i, lines[i]), item) for i, item in enumerate(value)]


def mapping_items(where: Where, value: Any) -> list[tuple[Where, Any, Any]]:
    """Each C{(place, key, value)} of a YAML mapping. @raise ConfigError: not a mapping."""
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping, got {_kind(value)}")
    lines = getattr(value, "lines", {})
    return [(where.child(k, lines.get(k, where.line)), k, v) for k, v in value.items()]


# --- scalar parsers: each is parse(where, value) -> result ---------------------


def string(where: Where, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(f"expected a non-empty string, got {_kind(value)}")
    return value


def boolean(where: Where, value: Any) -> bool:
    if not isinstance(value, bool):
        raise where.error(f"expected true or false, got {_kind(value)}")
    return value


def integer(minimum: Optional[int] = None, maximum: Optional[int] = None):
    """A parser for an integer within C{[minimum, maximum]}."""

    def parse(where: Where, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(f"expected an integer, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise where.error(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise where.error(f"must be at most {maximum}, got {value}")
        return value

    return parse


def number(minimum: Optional[float] = None, maximum: Optional[float] = None):
    """A parser for a real number within C{[minimum, maximum]}."""

    def parse(where: Where, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(f"expected a number, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise where.error(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise where.error(f"must be at most {maximum}, got {value}")
        return float(value)

    return parse


def one_of(*choices: str):
    """A parser for one of the given strings."""

    def parse(where: Where, value: Any) -> str:
        if value not in choices:
            raise where.error(
                f"expected one of {', '.join(choices)}, got {value!r}"
            )
        return value

    return parse


def header_name(where: Where, value: Any) -> str:
    """A header field name: a token (RFC 9110 section 5.6.2). @raise ConfigError: it is not."""
    name = string(where, value)
    if not _TOKEN.fullmatch(name):
        raise where.error(f"not a header name: {name!r}")
    return name


def string_list(where: Where, value: Any) -> tuple[str, ...]:
    return tuple(string(w, item) for w, item in sequence(where, value))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(where: Where, value: Any) -> float:
    """
    A duration in seconds: a non-negative number, or a string with a unit
    (C{ms}, C{s}, C{m}, C{h}).
    """
    if isinstance(value, bool):
        raise where.error("expected a duration such as 2s or 250ms, got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise where.error(f"expected a duration such as 2s or 250ms, got {value!r}")
    if seconds < 0:
        raise where.error("a duration cannot be negative")
    return seconds


def positive_duration(where: Where, value: Any) -> float:
    seconds = duration(where, value)
    if seconds <= 0:
        raise where.error("must be longer than zero")
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
    "GB": 1000**3, "GiB": 1024**3,
}


def size(where: Where, value: Any) -> int:
    """A size in bytes: an integer, or a string such as C{10MiB}."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    raise where.error(f"expected a size such as 1048576 or 10MiB, got {value!r}")


def default_of(cls: type, name: str) -> Any:
    """
    The default of attrs field C{name} of C{cls}. (On a slotted attrs class,
    C{cls.name} is the slot's descriptor, not the default.)
    """
    return attrs.fields_dict(cls)[name].default


# --- sections contributed by feature modules -----------------------------------


@attrs.frozen
class Extension:
    """
    A config key contributed by a feature module (rate limiting, auth, ...).

    @ivar name: the key, e.g. C{rate_limit}.
    @ivar parse: C{parse(where, value, context)} -> the frozen object kept in
        C{options[name]}; raises L{ConfigError} through C{where.error}.
        C{context} is a L{ParseContext}.
    @ivar default: the value kept when the key is absent.
    @ivar top_default: (route and service keys) the same key at the top
        level of the file gives the default for routes or services that
        do not set it.
    """

    name: str
    parse: Callable[[Where, Any, "ParseContext"], Any]
    default: Any = None
    top_default: bool = False


@attrs.frozen
class ParseContext:
    """
    What a section parser may consult.

    @ivar top: top-level extension values parsed so far (name -> value).
    @ivar services: the services, when parsing routes.
    """

    top: Mapping[str, Any]
    services: Mapping[str, Any] = MappingProxyType({})


#: Keys allowed at the top level, in each service and in each route, by
#: feature modules. Register with L{register}.
TOP_EXTENSIONS: dict[str, Extension] = {}
SERVICE_EXTENSIONS: dict[str, Extension] = {}
ROUTE_EXTENSIONS: dict[str, Extension] = {}

#: Feature modules imported before parsing, so that they register their keys.
FEATURE_MODULES: list[str] = [
    "gateway.redisconf",
    "gateway.filters.security_headers",
    "gateway.filters.ip_rules",
    "gateway.filters.cors",
    "gateway.filters.auth",
    "gateway.filters.rate_limit",
    "gateway.cachefilter",
    "gateway.filters.rewrite",
    "gateway.reload",  # config_poll_interval
    "gateway.drain",  # drain_timeout
    "gateway.tls",  # tls (listener), services.*.tls (HTTPS backends)
    "gateway.workers",  # workers
    "gateway.observe",
]


def register(level: str, extension: Extension) -> Extension:
    """
    Allow the key C{extension.name} at C{level} (C{"top"}, C{"service"} or
    C{"route"}).

    @raise ValueError: the key is already taken at that level.
    """
    table = {"top": TOP_EXTENSIONS, "service": SERVICE_EXTENSIONS, "route": ROUTE_EXTENSIONS}[level]
    if extension.name in table and table[extension.name] != extension:
        raise ValueError(f"config key {extension.name!r} is already registered at {level} level")
    table[extension.name] = extension
    return extension


def _take_extensions(
    section: Section, table: Mapping[str, Extension], context: ParseContext, defaults: Mapping[str, Any]
) -> Mapping[str, Any]:
    options = {}
    for name, extension in table.items():
        # a top-level value is the default only for keys that ask for it
        fallback = defaults.get(name, extension.default) if extension.top_default else extension.default
        options[name] = section.take(
            name, lambda w, v, e=extension: e.parse(w, v, context), fallback
        )
    return MappingProxyType(options)


# --- the configuration objects -------------------------------------------------


@attrs.frozen(cache_hash=True)
class Backend:
    """
    One upstream server of a service.

    @ivar url: the URL as configured, normalised (C{http://127.0.0.1:9001}).
    @ivar weight: relative share of traffic for weighted balancers, >= 1.
    @ivar scheme: C{b"http"} or C{b"https"}.
    @ivar host: the host name or address, as bytes.
    @ivar port: the TCP port.
    @ivar base_path: a path prefix prepended to every forwarded path
        (C{b""} for none), without a trailing slash.
    @ivar host_header: the C{Host} header value for this backend.
    """

    url: str
    weight: int = 1
    scheme: bytes = attrs.field(default=b"http", eq=False, repr=False)
    host: bytes = attrs.field(default=b"", eq=False, repr=False)
    port: int = attrs.field(default=80, eq=False, repr=False)
    base_path: bytes = attrs.field(default=b"", eq=False, repr=False)
    host_header: bytes = attrs.field(default=b"", eq=False, repr=False)

    @classmethod
    def from_url(cls, url: str, weight: int = 1) -> "Backend":
        """
        Build a backend from its URL.

        @raise ValueError: the URL is not C{http://} or C{https://} with a
            host, or carries a query, fragment or user info.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("backend URLs must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("the URL has no host")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("a backend URL may not carry a query, fragment or user info")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad port: {e}") from None
        default_port = 443 if parts.scheme == "https" else 80
        port = port or default_port
        host = parts.hostname
        netloc_host = f"[{host}]" if ":" in host else host
        host_header = netloc_host if port == default_port else f"{netloc_host}:{port}"
        base_path = parts.path.rstrip("/")
        normalised = f"{parts.scheme}://{host_header}{base_path}"
        return cls(
            url=normalised,
            weight=weight,
            scheme=parts.scheme.encode("ascii"),
            host=host.encode("idna"),
            port=port,
            base_path=base_path.encode("utf-8"),
            host_header=host_header.encode("idna"),
        )


@attrs.frozen
class Timeouts:
    """
    @ivar connect: seconds to establish a TCP connection to a backend.
    @ivar response: seconds from the start of forwarding to the response's
        status line and headers, across all attempts (the request's
        overall upstream timeout; a route's C{timeout} overrides it).
    @ivar per_try: seconds one attempt may take to get its response
        headers, or None for no separate limit (the remaining overall
        time); a route's C{retries.per_try_timeout} overrides it.
    """

    connect: float = 2.0
    response: float = 30.0
    per_try: Optional[float] = None


@attrs.frozen
class StatusRanges:
    """
    A set of HTTP statuses as inclusive ranges, e.g. C{((200, 399),)}.
    Supports C{status in ranges}.
    """

    ranges: tuple[tuple[int, int], ...] = ((200, 399),)

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and any(lo <= status <= hi for lo, hi in self.ranges)


@attrs.frozen
class HealthCheckConfig:
    """
    A service's active health check (C{services.NAME.health_check}); has
    the attributes L{gateway.health.ActiveHealthChecker} reads.

    @ivar path: the path probed with C{GET} on each backend.
    @ivar interval: seconds between rounds of probes.
    @ivar timeout: seconds before a probe counts as failed.
    @ivar healthy_threshold: passed probes in a row that bring a backend back.
    @ivar unhealthy_threshold: failed probes in a row that take it out.
    @ivar expected_status: the statuses that pass (default 200-399).
    """

    path: str
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_status: StatusRanges = StatusRanges()


@attrs.frozen
class PassiveHealth:
    """
    Outlier detection (C{services.NAME.passive_health}); see
    L{gateway.health.OutlierDetector}.

    @ivar consecutive_failures: failed requests in a row (connect failure,
        reset, timeout or 5xx) that eject a backend.
    @ivar ejection_time: seconds of the first ejection; the n-th in a row
        lasts n times as long, up to C{max_ejection_time}.
    @ivar max_ejection_percent: the most backends ejected at once, as a
        percentage (at least one of two or more is always allowed).
    @ivar max_ejection_time: the longest ejection in seconds, or None for
        C{max(300, ejection_time)}.
    """

    consecutive_failures: int = 5
    ejection_time: float = 30.0
    max_ejection_percent: int = 10
    max_ejection_time: Optional[float] = None


@attrs.frozen
class CircuitBreakerConfig:
    """
    Per-backend circuit breakers (C{services.NAME.circuit_breaker}); see
    L{gateway.breaker.CircuitBreaker}.

    @ivar failure_threshold: failures in a row that open a breaker, or None
        when disabled (C{0} in the file).
    @ivar failure_ratio: the failure fraction over C{window} that opens
        it, or None when disabled.
    @ivar window: the rolling window in seconds.
    @ivar min_requests: the fewest requests in the window before the ratio
        counts.
    @ivar cooldown: seconds open before one trial request is let through.
    """

    failure_threshold: Optional[int] = 5
    failure_ratio: Optional[float] = None
    window: float = 10.0
    min_requests: int = 20
    cooldown: float = 30.0


@attrs.frozen
class RetryBudgetConfig:
    """
    A service's retry budget (C{services.NAME.retry_budget}); see
    L{gateway.retry.RetryBudget}.

    @ivar percent: retries in progress at most this share of the
        service's requests in progress.
    @ivar min_concurrency: retries always allowed at once.
    """

    percent: float = 20.0
    min_concurrency: int = 3


@attrs.frozen
class Retries:
    """
    A route's retry policy (C{routes[].retries}).

    Connect failures are retried for any method; resets, timeouts and
    502/503/504 answers only for idempotent methods unless
    C{non_idempotent}. Each retry goes to a backend not yet tried.

    @ivar max_retries: retries after the first attempt (0 disables).
    @ivar non_idempotent: also retry non-idempotent methods (POST, PATCH)
        after a reset, timeout or 502/503/504.
    @ivar per_try_timeout: seconds one attempt may take, or None for the
        service's C{timeouts.per_try}.
    @ivar backoff_base: seconds, the ceiling of the first retry's jittered
        wait; each further retry doubles it.
    @ivar backoff_max: seconds, the largest ceiling.
    """

    max_retries: int = 2
    non_idempotent: bool = False
    per_try_timeout: Optional[float] = None
    backoff_base: float = 0.025
    backoff_max: float = 0.25


@attrs.frozen
class Service:
    """
    A named pool of backends that serve the same API.

    @ivar balancer: the balancing policy's name (see L{gateway.balancing}).
    @ivar hash_on: what C{consistent_hash} hashes (C{client_ip}, C{path},
        C{header:NAME}, C{cookie:NAME}); None for other policies.
    @ivar max_connections_per_backend: the most requests in flight to one
        backend at once; further requests wait their turn.
    @ivar health_check: the active health check, or None for none.
    @ivar passive_health: outlier detection, or None for none.
    @ivar circuit_breaker: per-backend circuit breakers, or None for none.
    @ivar retry_budget: the share of requests that may be retries.
    """

    name: str
    backends: tuple[Backend, ...]
    balancer: str = "round_robin"
    timeouts: Timeouts = Timeouts()
    max_connections_per_backend: int = 256
    hash_on: Optional[str] = None
    health_check: Optional[HealthCheckConfig] = None
    passive_health: Optional[PassiveHealth] = None
    circuit_breaker: Optional[CircuitBreakerConfig] = None
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    #: Values of the keys registered in L{SERVICE_EXTENSIONS}, by name.
    options: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class RouteMatch:
    """
    What a request must carry to take a route.

    @ivar path_prefix: matched at a segment boundary after normalisation.
    @ivar host: an exact host name or C{*.example.com}; None for any.
    @ivar methods: upper-case method names; empty for any.
    @ivar headers: C{(lower-case name, value)} pairs matched exactly.
    """

    path_prefix: str = "/"
    host: Optional[str] = None
    methods: frozenset = frozenset()
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class Route:
    """
    A rule that sends matching requests to a service.

    @ivar strip_prefix: remove C{match.path_prefix} from the forwarded path.
    @ivar preserve_host: forward the client's C{Host} instead of the
        backend's.
    @ivar retries: the retry policy.
    @ivar timeout: the overall upstream timeout in seconds, overriding the
        service's C{timeouts.response}; None to use that.
    """

    name: str
    match: RouteMatch
    service: str
    strip_prefix: bool = False
    preserve_host: bool = False
    retries: Retries = Retries()
    timeout: Optional[float] = None
    #: Values of the keys registered in L{ROUTE_EXTENSIONS}, by name.
    options: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class Admin:
    """@ivar listen: the admin listener's endpoint string, or None for none."""

    listen: Optional[str] = "tcp:9901:interface=127.0.0.1"


@attrs.frozen
class Limits:
    """
    What one client may send, enforced by the main listener's channel
    (L{gateway.proxy.GatewayChannel}) before any filter runs.

    @ivar max_request_body: the largest request body accepted, in bytes;
        larger ones get 413.
    @ivar max_header_count: the most header fields in one request; more
        get 431.
    @ivar max_header_bytes: the most bytes of request line plus header
        fields (without line ends) in one request; more get 431, or 414
        when the request line alone is longer.
    @ivar client_idle_timeout: seconds a client connection may stay silent
        (between requests, or while sending one) before it is closed; 0
        for never.
    @ivar client_header_timeout: seconds from the first byte of a request
        to the end of its headers; slower clients (slowloris) get 408 and
        are disconnected; 0 for no limit.
    """

    max_request_body: int = 10 * 1024 * 1024
    max_header_count: int = 100
    max_header_bytes: int = 16 * 1024
    client_idle_timeout: float = 60.0
    client_header_timeout: float = 30.0


@attrs.frozen
class Config:
    """
    One validated configuration: the snapshot a request is served from.

    @ivar source: the file it was read from.
    @ivar services: service name -> L{Service}, read-only.
    @ivar routes: in config order; the router orders them for matching.
    """

    listen: str
    admin: Admin
    services: Mapping[str, Service]
    routes: tuple[Route, ...]
    limits: Limits = Limits()
    source: str = "<string>"
    #: Values of the keys registered in L{TOP_EXTENSIONS}, by name.
    options: Mapping[str, Any] = MappingProxyType({})


# --- parsing -------------------------------------------------------------------

_METHOD = re.compile(r"^[A-Z]+$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")


def _backend(where: Where, value: Any) -> Backend:
    section = Section(where, value)
    url = section.take("url", string)
    weight = section.take("weight", integer(1, 1000), 1)
    section.finish()
    try:
        return Backend.from_url(url, weight)
    except ValueError as e:
        raise section.at("url").error(f"bad URL {url!r}: {e}") from None


def _timeouts(where: Where, value: Any) -> Timeouts:
    section = Section(where, value)
    result = Timeouts(
        connect=section.take("connect", positive_duration, default_of(Timeouts, "connect")),
        response=section.take("response", positive_duration, default_of(Timeouts, "response")),
        per_try=section.take("per_try", positive_duration, None),
    )
    if result.per_try is not None and result.per_try > result.response:
        raise section.at("per_try").error(
            f"cannot be longer than response ({result.response:g}s), the overall timeout"
        )
    section.finish()
    return result


#: The balancing policies (L{gateway.balancing.BALANCERS} has their classes).
BALANCERS = (
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "consistent_hash",
    "random",
    "least_request",
)

_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?$")


def _status_ranges(where: Where, value: Any) -> StatusRanges:
    """
    Statuses as C{200}, C{"200-399"} or a list of either
    (C{[200, "300-302"]}).
    """
    items = sequence(where, value) if isinstance(value, list) else [(where, value)]
    if not items:
        raise where.error("expected at least one status")
    ranges = []
    for w, item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and (match := _STATUS_RANGE.match(item)):
            lo = int(match.group(1))
            hi = int(match.group(2) or lo)
        else:
            raise w.error(f"expected a status such as 200 or a range such as 200-399, got {item!r}")
        if not 100 <= lo <= hi <= 599:
            raise w.error(f"not a range of HTTP statuses (100-599): {item!r}")
        ranges.append((lo, hi))
    return StatusRanges(tuple(ranges))


def _health_check(where: Where, value: Any) -> HealthCheckConfig:
    section = Section(where, value)
    path = section.take("path", string)
    if not path.startswith("/"):
        raise section.at("path").error("a health check path must start with '/'")
    check = HealthCheckConfig(
        path=path,
        interval=section.take("interval", positive_duration, 10.0),
        timeout=section.take("timeout", positive_duration, 2.0),
        healthy_threshold=section.take("healthy_threshold", integer(1, 100), 2),
        unhealthy_threshold=section.take("unhealthy_threshold", integer(1, 100), 3),
        expected_status=section.take("expected_status", _status_ranges, StatusRanges()),
    )
    section.finish()
    return check


def _passive_health(where: Where, value: Any) -> PassiveHealth:
    section = Section(where, value)
    passive = PassiveHealth(
        consecutive_failures=section.take("consecutive_failures", integer(1, 1000), 5),
        ejection_time=section.take("ejection_time", positive_duration, 30.0),
        max_ejection_percent=section.take("max_ejection_percent", integer(0, 100), 10),
        max_ejection_time=section.take("max_ejection_time", positive_duration, None),
    )
    if passive.max_ejection_time is not None and passive.max_ejection_time < passive.ejection_time:
        raise section.at("max_ejection_time").error(
            f"cannot be shorter than ejection_time ({passive.ejection_time:g}s)"
        )
    section.finish()
    return passive


def _circuit_breaker(where: Where, value: Any) -> CircuitBreakerConfig:
    section = Section(where, value)
    threshold = section.take("failure_threshold", integer(0, 10000), 5)
    ratio = section.take("failure_ratio", number(0, 1), None)
    if ratio == 0:
        raise section.at("failure_ratio").error("must be above 0 (leave it out to disable)")
    if section.has("min_requests") and ratio is None:
        raise section.at("min_requests").error("only applies with failure_ratio")
    if section.has("window") and ratio is None:
        raise section.at("window").error("only applies with failure_ratio")
    breaker = CircuitBreakerConfig(
        failure_threshold=threshold or None,
        failure_ratio=ratio,
        window=section.take("window", positive_duration, 10.0),
        min_requests=section.take("min_requests", integer(1, 1000000), 20),
        cooldown=section.take("cooldown", duration, 30.0),
    )
    if breaker.failure_threshold is None and breaker.failure_ratio is None:
        raise where.error(
            "failure_threshold is 0 and there is no failure_ratio: the breaker could never open"
        )
    section.finish()
    return breaker


def _retry_budget(where: Where, value: Any) -> RetryBudgetConfig:
    section = Section(where, value)
    budget = RetryBudgetConfig(
        percent=section.take("percent", number(0, 100), 20.0),
        min_concurrency=section.take("min_concurrency", integer(0, 10000), 3),
    )
    section.finish()
    return budget


def _hash_on(where: Where, value: Any) -> str:
    from gateway.balancing import parse_hash_on

    spec = string(where, value)
    try:
        parse_hash_on(spec)
    except ValueError as e:
        raise where.error(str(e)) from None
    return spec


def _service(where: Where, name: str, value: Any, context: ParseContext) -> Service:
    section = Section(where, value)
    backends_where = section.at("backends")
    backends = section.take("backends", lambda w, v: tuple(_backend(iw, i) for iw, i in sequence(w, v)))
    if not backends:
        raise backends_where.error("a service needs at least one backend")
    seen = set()
    for backend in backends:
        if backend.url in seen:
            raise backends_where.error(f"backend {backend.url} is listed twice")
        seen.add(backend.url)
    balancer_where = section.at("balancer")
    balancer = section.take("balancer", one_of(*BALANCERS), "round_robin")
    hash_where = section.at("hash_on")
    hash_on = section.take("hash_on", _hash_on, None)
    if balancer == "consistent_hash" and hash_on is None:
        raise balancer_where.error(
            "consistent_hash needs hash_on (client_ip, path, header:NAME or cookie:NAME)"
        )
    if balancer != "consistent_hash" and hash_on is not None:
        raise hash_where.error(f"only applies to the consistent_hash balancer, not {balancer}")
    service = Service(
        name=name,
        backends=backends,
        balancer=balancer,
        hash_on=hash_on,
        timeouts=section.take("timeouts", _timeouts, Timeouts()),
        max_connections_per_backend=section.take(
            "max_connections_per_backend", integer(1, 100000), 256
        ),
        health_check=section.take("health_check", _health_check, None),
        passive_health=section.take("passive_health", _passive_health, None),
        circuit_breaker=section.take("circuit_breaker", _circuit_breaker, None),
        retry_budget=section.take("retry_budget", _retry_budget, RetryBudgetConfig()),
        options=_take_extensions(section, SERVICE_EXTENSIONS, context, context.top),
    )
    section.finish()
    return service


def _methods(where: Where, value: Any) -> frozenset:
    methods = set()
    for w, item in sequence(where, value):
        if not isinstance(item, str) or not _METHOD.match(item.upper()):
            raise w.error(f"not an HTTP method: {item!r}")
        methods.add(item.upper())
    return frozenset(methods)


def _headers(where: Where, value: Any) -> tuple[tuple[bytes, bytes], ...]:
    result = []
    for w, name, header_value in mapping_items(where, value):
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise w.error(f"not a header name: {name!r}")
        if not isinstance(header_value, (str, int)) or isinstance(header_value, bool):
            raise w.error("a header value must be a string")
        result.append((name.lower().encode("ascii"), str(header_value).encode("latin-1")))
    return tuple(result)


def _path_prefix(where: Where, value: Any) -> str:
    from gateway.routing import normalise_path

    prefix = string(where, value)
    if not prefix.startswith("/"):
        raise where.error("a path prefix must start with '/'")
    normalised = normalise_path(prefix.encode("utf-8")).decode("utf-8")
    if normalised != "/":
        normalised = normalised.rstrip("/")
    return normalised


def _host(where: Where, value: Any) -> str:
    host = string(where, value).lower()
    if not _HOST.match(host):
        raise where.error(f"not a host name or *.domain pattern: {value!r}")
    return host


def _match(where: Where, value: Any) -> RouteMatch:
    section = Section(where, value)
    match = RouteMatch(
        path_prefix=section.take("path_prefix", _path_prefix, "/"),
        host=section.take("host", _host, None),
        methods=section.take("methods", _methods, frozenset()),
        headers=section.take("headers", _headers, ()),
    )
    section.finish()
    return match


def _retries(where: Where, value: Any) -> Retries:
    """C{retries: N} (a count), or a mapping of the L{Retries} fields."""
    if isinstance(value, int) and not isinstance(value, bool):
        return Retries(max_retries=integer(0, 10)(where, value))
    section = Section(where, value)
    retries = Retries(
        max_retries=section.take("max_retries", integer(0, 10), 2),
        non_idempotent=section.take("non_idempotent", boolean, False),
        per_try_timeout=section.take("per_try_timeout", positive_duration, None),
        backoff_base=section.take("backoff_base", duration, 0.025),
        backoff_max=section.take("backoff_max", duration, 0.25),
    )
    if retries.backoff_max < retries.backoff_base:
        raise section.at("backoff_max").error(
            f"cannot be shorter than backoff_base ({retries.backoff_base:g}s)"
        )
    section.finish()
    return retries


def _route(where: Where, value: Any, context: ParseContext) -> Route:
    services = context.services
    section = Section(where, value)
    name = section.take("name", string)
    service_where = section.at("service")
    service = section.take("service", string)
    if service not in services:
        raise service_where.error(f"no service named {service!r}")
    route = Route(
        name=name,
        match=section.take("match", _match, RouteMatch()),
        service=service,
        strip_prefix=section.take("strip_prefix", boolean, False),
        preserve_host=section.take("preserve_host", boolean, False),
        retries=section.take("retries", _retries, Retries()),
        timeout=section.take("timeout", positive_duration, None),
        options=_take_extensions(section, ROUTE_EXTENSIONS, context, context.top),
    )
    section.finish()
    return route


def _endpoint(where: Where, value: Any) -> str:
    """
    A Twisted server endpoint string (C{tcp:8080:interface=127.0.0.1},
    C{ssl:...}, C{systemd:domain=INET:index=0}); a bare port number means
    C{tcp:PORT}. It is parsed here, so a typo is refused at load time.
    """
    from twisted.internet.endpoints import serverFromString

    if isinstance(value, int) and not isinstance(value, bool):
        value = f"tcp:{value}"
    endpoint = string(where, value)
    if endpoint.startswith("systemd:"):
        return endpoint  # its sockets exist only under socket activation
    try:
        serverFromString(None, endpoint)
    except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
        raise where.error(
            f"expected a Twisted endpoint string such as tcp:8080, got {endpoint!r} ({e})"
        ) from None
    return endpoint


def _admin(where: Where, value: Any) -> Admin:
    section = Section(where, value)
    admin = Admin(listen=section.take("listen", _endpoint, default_of(Admin, "listen")))
    section.finish()
    return admin


def _header_bytes(where: Where, value: Any) -> int:
    limit = size(where, value)
    if not 1024 <= limit <= 1024 * 1024:
        raise where.error("must be between 1KiB and 1MiB")
    return limit


def _limits(where: Where, value: Any) -> Limits:
    section = Section(where, value)
    limits = Limits(
        max_request_body=section.take("max_request_body", size, default_of(Limits, "max_request_body")),
        max_header_count=section.take(
            "max_header_count", integer(1, 10000), default_of(Limits, "max_header_count")
        ),
        max_header_bytes=section.take(
            "max_header_bytes", _header_bytes, default_of(Limits, "max_header_bytes")
        ),
        client_idle_timeout=section.take(
            "client_idle_timeout", duration, default_of(Limits, "client_idle_timeout")
        ),
        client_header_timeout=section.take(
            "client_header_timeout", duration, default_of(Limits, "client_header_timeout")
        ),
    )
    section.finish()
    return limits


def parse_config(text: str, source: str = "<string>") -> Config:
    """
    Validate the YAML document C{text} into a L{Config}.

    @param source: the file name used in error messages.
    @raise ConfigError: the document is not valid YAML or not a valid
        configuration.
    """
    try:
        data = yaml.load(text, Loader=_Loader)
    except _LoadError as e:
        raise ConfigError(source, e.line, e.reason) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError(source, line, f"invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, 0, f"invalid YAML: {e}") from None
    root = Where(source, "", getattr(data, "line", 1))
    if data is None:
        raise root.error("the file is empty")
    section = Section(root, data)
    for module in FEATURE_MODULES:
        importlib.import_module(module)

    # Top-level feature keys first: services and routes may refer to them
    # (consumers, redis, defaults for route filters).
    top: dict[str, Any] = {}
    context = ParseContext(top=top)
    for name, extension in TOP_EXTENSIONS.items():
        top[name] = section.take(
            name, lambda w, v, e=extension: e.parse(w, v, context), extension.default
        )
    for name, extension in {**SERVICE_EXTENSIONS, **ROUTE_EXTENSIONS}.items():
        if extension.top_default and name not in TOP_EXTENSIONS and section.has(name):
            top[name] = section.take(name, lambda w, v, e=extension: e.parse(w, v, context))

    services_where = section.at("services")
    services: dict[str, Service] = {}
    for w, name, value in mapping_items(services_where, section.take("services", lambda w, v: v)):
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.-]+$", name):
            raise w.error("a service name may hold only letters, digits, '_', '.', '-'")
        services[name] = _service(w, name, value, context)
    context = ParseContext(top=top, services=services)

    routes_where = section.at("routes")
    routes: list[Route] = []
    names: set[str] = set()
    for w, value in sequence(routes_where, section.take("routes", lambda w, v: v)):
        route = _route(w, value, context)
        if route.name in names:
            raise w.child("name", getattr(value, "lines", {}).get("name", w.line)).error(
                f"duplicate route name {route.name!r}"
            )
        names.add(route.name)
        routes.append(route)

    config = Config(
        listen=section.take("listen", _endpoint, "tcp:8080"),
        admin=section.take("admin", _admin, Admin()),
        services=MappingProxyType(services),
        routes=tuple(routes),
        limits=section.take("limits", _limits, Limits()),
        source=source,
        options=MappingProxyType(top),
    )
    section.finish()
    return config


def load_config(path: str) -> Config:
    """
    Read and validate the file at C{path}.

    This reads the file synchronously: call it at start-up, or from a
    thread, never on the request path.

    @raise ConfigError: the file cannot be read, or is not valid.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, 0, f"cannot read the file: {e}") from None
    return parse_config(text, path)
