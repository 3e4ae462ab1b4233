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
FEATURE_MODULES: list[str] = ["gateway.observe"]


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
        fallback = defaults.get(name, extension.default)
        options[name] = section.take(
            name, lambda w, v, e=extension: e.parse(w, v, context), fallback
        )
    return MappingProxyType(options)


# --- the configuration objects -------------------------------------------------


@attrs.frozen
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
    @ivar response: seconds from sending the request to the response's
        status line and headers.
    """

    connect: float = 2.0
    response: float = 30.0


@attrs.frozen
class Service:
    """
    A named pool of backends that serve the same API.

    @ivar balancer: the balancing policy's name (see L{gateway.balancing}).
    @ivar max_connections_per_backend: the most requests in flight to one
        backend at once; further requests wait their turn.
    """

    name: str
    backends: tuple[Backend, ...]
    balancer: str = "round_robin"
    timeouts: Timeouts = Timeouts()
    max_connections_per_backend: int = 256
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
    """

    name: str
    match: RouteMatch
    service: str
    strip_prefix: bool = False
    preserve_host: bool = False
    #: Values of the keys registered in L{ROUTE_EXTENSIONS}, by name.
    options: Mapping[str, Any] = MappingProxyType({})


@attrs.frozen
class Admin:
    """@ivar listen: the admin listener's endpoint string, or None for none."""

    listen: Optional[str] = "tcp:9901:interface=127.0.0.1"


@attrs.frozen
class Limits:
    """
    @ivar max_request_body: the largest request body accepted, in bytes;
        larger ones get 413.
    """

    max_request_body: int = 10 * 1024 * 1024


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
        connect=section.take("connect", positive_duration, Timeouts.connect),
        response=section.take("response", positive_duration, Timeouts.response),
    )
    section.finish()
    return result


BALANCERS = ("round_robin",)


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
    service = Service(
        name=name,
        backends=backends,
        balancer=section.take("balancer", one_of(*BALANCERS), "round_robin"),
        timeouts=section.take("timeouts", _timeouts, Timeouts()),
        max_connections_per_backend=section.take(
            "max_connections_per_backend", integer(1, 100000), 256
        ),
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
        options=_take_extensions(section, ROUTE_EXTENSIONS, context, context.top),
    )
    section.finish()
    return route


def _endpoint(where: Where, value: Any) -> str:
    endpoint = string(where, value)
    if ":" not in endpoint:
        raise where.error(
            f"expected a Twisted endpoint string such as tcp:8080, got {endpoint!r}"
        )
    return endpoint


def _admin(where: Where, value: Any) -> Admin:
    section = Section(where, value)
    admin = Admin(listen=section.take("listen", _endpoint, Admin.listen))
    section.finish()
    return admin


def _limits(where: Where, value: Any) -> Limits:
    section = Section(where, value)
    limits = Limits(
        max_request_body=section.take("max_request_body", size, Limits.max_request_body)
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
