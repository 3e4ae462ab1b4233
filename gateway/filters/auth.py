"""
Authentication per route (C{routes[].auth}, default at the top level) with
the consumers of the top-level C{consumers} list. The checks themselves
are L{gateway.auth}'s; this module reads their config and runs them on
each request.

    consumers:
      - name: mobile-app
        api_keys: ["sha256:9f86d0...", "dev-plain-key"]
    auth:
      methods: [api_key, jwt]          # tried in order; either suffices
      realm: txgateway                 # of the WWW-Authenticate challenge
      api_key: {header: X-API-Key, query: false}
      jwt:
        algorithms: [RS256, ES256]     # allow-list, never read from the token
        jwks_url: https://id.example.com/.well-known/jwks.json  # or keys: [...]
        issuer: https://id.example.com/
        audience: orders-api           # or a list
        leeway: 30s
        forward_claims: {sub: X-Consumer-ID}
      strip_credentials: true
      allowed_consumers: [mobile-app]  # absent: any authenticated caller

Outcomes: no acceptable credential -> 401 with C{WWW-Authenticate} (RFC
6750); authenticated but not in C{allowed_consumers} -> 403. The consumer
(the API key's owner, or the token's C{sub}) becomes C{context.consumer}.
The credentials are removed from the forwarded request (not from the
client's request, which later filters such as the cache still see) unless
C{strip_credentials} is false, and headers named in C{forward_claims} are
always replaced by the gateway's values, so clients cannot forge them.

Each distinct JWK Set URL is fetched by one L{JwksSource}, started and
stopped with the gateway (the filter's C{service}) and kept across reloads
while some route still uses it.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.auth import (
    SUPPORTED_ALGORITHMS,
    ApiKeyAuthenticator,
    AuthResult,
    Authenticator,
    Consumer,
    Forbidden,
    JwksSource,
    JwtVerifier,
    KeySet,
    StaticKeys,
    Unauthorized,
    authorize,
    hash_api_key,
    key_from_config,
)
from gateway.config import (
    Extension,
    ParseContext,
    Section,
    Where,
    boolean,
    duration,
    mapping_items,
    one_of,
    positive_duration,
    register,
    sequence,
    size,
    string,
    string_list,
)
from gateway.pipeline import Answer, register_filter

NAME = "auth"
CONSUMERS = "consumers"
ORDER = 40
METHODS = ("api_key", "jwt")

_log = Logger()


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@attrs.frozen
class JwksSettings:
    """Where and how often a JWK Set is fetched; one source per distinct value."""

    url: str
    refresh_interval: float = 300.0
    min_refetch_interval: float = 10.0
    timeout: float = 10.0
    max_size: int = 1 << 20


@attrs.frozen
class JwtSettings:
    """
    The C{jwt} method's settings (see L{JwtVerifier}).

    @ivar keys: configured PEM keys and HMAC secrets, or empty with C{jwks}.
    @ivar jwks: the JWK Set to fetch, or None with C{keys}.
    """

    algorithms: frozenset
    keys: tuple = ()
    jwks: Optional[JwksSettings] = None
    issuer: Optional[str] = None
    audience: Any = None
    leeway: float = 0.0
    require_exp: bool = True
    forward_claims: tuple = ()
    consumer_claim: str = "sub"


@attrs.frozen
class AuthSettings:
    """
    One route's authentication, as configured.

    @ivar methods: C{"api_key"} and/or C{"jwt"}, in the order tried.
    @ivar consumers: the top-level consumers (for API keys).
    @ivar allowed_consumers: consumer names allowed on the route, or None
        for any authenticated caller.
    """

    methods: tuple
    consumers: tuple = ()
    api_key_header: Optional[bytes] = b"X-API-Key"
    api_key_query: Optional[bytes] = None
    jwt: Optional[JwtSettings] = None
    strip_credentials: bool = True
    realm: str = "txgateway"
    allowed_consumers: Optional[frozenset] = None


def parse_consumers(where: Where, value: Any, context: ParseContext) -> tuple:
    """
    The top-level C{consumers} list.

    @raise ConfigError: a duplicate name, a malformed stored key (C{sha256:}
        needs 64 hex digits) or a key shared by two consumers.
    """
    consumers = []
    names: dict[str, Where] = {}
    owners: dict[str, str] = {}
    for item_where, item in sequence(where, value):
        section = Section(item_where, item)
        name_where = section.at("name")
        name = section.take("name", string)
        if name in names:
            raise name_where.error(f"duplicate consumer name {name!r}")
        names[name] = name_where
        keys_where = section.at("api_keys")
        keys = []
        for key_where, key in sequence(keys_where, section.take("api_keys", lambda w, v: v, [])):
            key = string(key_where, key)
            try:
                ApiKeyAuthenticator([Consumer(name, (key,))], header=None, query=None)
            except ValueError as e:
                raise key_where.error(str(e)) from None
            digest = key.lower() if key.startswith("sha256:") else hash_api_key(key)
            if digest in owners:
                raise key_where.error(f"this API key is also a key of consumer {owners[digest]!r}")
            owners[digest] = name
            keys.append(key)
        section.finish()
        consumers.append(Consumer(name, tuple(keys)))
    return tuple(consumers)


def _header_or_off(where: Where, value: Any) -> Optional[bytes]:
    if value is False:
        return None
    name = string(where, value).encode("ascii", "replace")
    try:
        ApiKeyAuthenticator((), header=name)
    except ValueError as e:
        raise where.error(str(e)) from None
    return name


def _query_or_off(where: Where, value: Any) -> Optional[bytes]:
    if value is False:
        return None
    return string(where, value).encode("utf-8")


def _realm(where: Where, value: Any) -> str:
    realm = string(where, value)
    try:
        Authenticator([_NoKeys()], realm=realm)
    except ValueError as e:
        raise where.error(str(e)) from None
    return realm


def _url(where: Where, value: Any) -> str:
    url = string(where, value)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise where.error(f"expected an http:// or https:// URL, got {url!r}")
    return url


def _keys(where: Where, value: Any) -> tuple:
    keys = []
    for key_where, key in sequence(where, value):
        text = string(key_where, key)
        try:
            key_from_config(text)
        except ValueError as e:
            raise key_where.error(str(e)) from None
        keys.append(text)
    if not keys:
        raise where.error("no JWT verification keys")
    return tuple(keys)


def _algorithms(where: Where, value: Any) -> frozenset:
    algorithms = string_list(where, value)
    for item_where, alg in sequence(where, value):
        if alg not in SUPPORTED_ALGORITHMS:
            raise item_where.error(
                f"unsupported JWT algorithm {alg!r} (supported: {', '.join(sorted(SUPPORTED_ALGORITHMS))})"
            )
    if not algorithms:
        raise where.error("no JWT algorithms allowed")
    return frozenset(algorithms)


def _audience(where: Where, value: Any):
    if isinstance(value, list):
        audiences = string_list(where, value)
        if not audiences:
            raise where.error("an empty audience list")
        return audiences
    return string(where, value)


def _forward_claims(where: Where, value: Any) -> tuple:
    pairs = []
    for item_where, claim, header in mapping_items(where, value):
        if not isinstance(claim, str) or not claim:
            raise item_where.error("a claim name must be a string")
        header_name = string(item_where, header)
        try:
            JwtVerifier(["HS256"], StaticKeys([b"k" * 32]), Clock(), forward_claims={claim: header_name})
        except ValueError as e:
            raise item_where.error(str(e)) from None
        pairs.append((claim, header_name))
    return tuple(pairs)


def _jwt(where: Where, value: Any) -> JwtSettings:
    section = Section(where, value)
    algorithms = section.take("algorithms", _algorithms)
    keys_where = section.at("keys")
    keys = section.take("keys", _keys, ())
    jwks_url = section.take("jwks_url", _url, None)
    if bool(keys) == bool(jwks_url):
        raise (keys_where if keys else where).error("give either keys or jwks_url")
    jwks = None
    if jwks_url:
        jwks = JwksSettings(
            url=jwks_url,
            refresh_interval=section.take("jwks_refresh_interval", positive_duration, 300.0),
            min_refetch_interval=section.take("jwks_min_refetch_interval", duration, 10.0),
            timeout=section.take("jwks_timeout", positive_duration, 10.0),
            max_size=section.take("jwks_max_size", size, 1 << 20),
        )
    settings = JwtSettings(
        algorithms=algorithms,
        keys=keys,
        jwks=jwks,
        issuer=section.take("issuer", string, None),
        audience=section.take("audience", _audience, None),
        leeway=section.take("leeway", duration, 0.0),
        require_exp=section.take("require_exp", boolean, True),
        forward_claims=section.take("forward_claims", _forward_claims, ()),
        consumer_claim=section.take("consumer_claim", string, "sub"),
    )
    section.finish()
    return settings


def _methods(where: Where, value: Any) -> tuple:
    methods = []
    for item_where, method in sequence(where, value):
        method = one_of(*METHODS)(item_where, method)
        if method in methods:
            raise item_where.error(f"method {method} is listed twice")
        methods.append(method)
    if not methods:
        raise where.error("no authentication method")
    return tuple(methods)


def _api_key(where: Where, value: Any) -> tuple:
    section = Section(where, value)
    header = section.take("header", _header_or_off, b"X-API-Key")
    query = section.take("query", _query_or_off, None)
    section.finish()
    if header is None and query is None:
        raise where.error("an API key needs a header or a query argument")
    return header, query


def parse(where: Where, value: Any, context: ParseContext) -> Optional[AuthSettings]:
    """
    A route's C{auth} (or the top-level default), or C{false} for none.

    @raise ConfigError: an unknown method, a method without its settings,
        bad JWT settings, or API keys without any consumer.
    """
    if value is False:
        return None
    section = Section(where, value)
    methods_where = section.at("methods")
    methods = section.take("methods", _methods)
    consumers = context.top.get(CONSUMERS) or ()
    header, query = section.take("api_key", _api_key, (b"X-API-Key", None))
    if "api_key" in methods and not any(c.api_keys for c in consumers):
        raise methods_where.error("api_key authentication needs top-level consumers with api_keys")
    jwt_where = section.at("jwt")
    jwt_settings = section.take("jwt", _jwt, None)
    if "jwt" in methods and jwt_settings is None:
        raise jwt_where.error("the jwt method needs a 'jwt' section")
    realm = section.take("realm", _realm, "txgateway")
    allowed = section.take("allowed_consumers", string_list, None)
    settings = AuthSettings(
        methods=methods,
        consumers=consumers if "api_key" in methods else (),
        api_key_header=header,
        api_key_query=query,
        jwt=jwt_settings if "jwt" in methods else None,
        strip_credentials=section.take("strip_credentials", boolean, True),
        realm=realm,
        allowed_consumers=None if allowed is None else frozenset(allowed),
    )
    section.finish()
    try:
        build_authenticator(settings, Clock(), lambda jwks: _NoKeys())
    except ValueError as e:
        raise where.error(str(e)) from None
    return settings


register("top", Extension(CONSUMERS, parse_consumers, default=()))
register("route", Extension(NAME, parse, default=None, top_default=True))


# --------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------


class _NoKeys:
    """A key source for validating settings: no keys, no fetching."""

    def current(self) -> KeySet:
        return KeySet(by_kid=True)

    def refetch(self, kid: str) -> None:
        return None


def build_authenticator(settings: AuthSettings, clock, jwks_source) -> Authenticator:
    """
    The L{Authenticator} for C{settings}.

    @param clock: the time source of token checks.
    @param jwks_source: called with a L{JwksSettings}, returns its source.
    @raise ValueError: settings L{Authenticator} refuses.
    """
    methods = []
    for method in settings.methods:
        if method == "api_key":
            methods.append(
                ApiKeyAuthenticator(
                    settings.consumers, header=settings.api_key_header, query=settings.api_key_query
                )
            )
        else:
            jwt = settings.jwt
            keys = StaticKeys(jwt.keys) if jwt.keys else jwks_source(jwt.jwks)
            methods.append(
                JwtVerifier(
                    algorithms=jwt.algorithms,
                    keys=keys,
                    clock=clock,
                    issuer=jwt.issuer,
                    audience=jwt.audience,
                    leeway=jwt.leeway,
                    require_exp=jwt.require_exp,
                    forward_claims=jwt.forward_claims,
                    consumer_claim=jwt.consumer_claim,
                )
            )
    return Authenticator(methods, realm=settings.realm, strip_credentials=settings.strip_credentials)


@attrs.frozen
class RouteAuth:
    """
    What a request of a route needs: the authenticator, and what to remove
    from the forwarded request once it is authenticated.

    @ivar remove_headers: lower-case header names.
    @ivar remove_query: query argument names (bytes, decoded).
    """

    settings: AuthSettings
    authenticator: Authenticator
    remove_headers: frozenset
    remove_query: frozenset

    @property
    def reads_query(self) -> bool:
        """Whether a credential may be in the query string."""
        return "api_key" in self.settings.methods and self.settings.api_key_query is not None

    @classmethod
    def build(cls, settings: AuthSettings, authenticator: Authenticator) -> "RouteAuth":
        # What Authenticator.strip removes, applied to the forwarded request
        # instead of the client's.
        headers = {name.lower() for name in authenticator.forwarded_headers}
        query = set()
        if settings.strip_credentials:
            for method in authenticator.methods:
                headers.update(name.lower() for name in method.credential_headers)
                query.update(method.credential_query_args)
        return cls(settings, authenticator, frozenset(headers), frozenset(query))


def without_query_args(query: bytes, names: frozenset) -> bytes:
    """
    C{query} (with its C{?}, or empty) without the arguments called one of
    C{names}; the others keep their order and encoding.
    """
    if not query or not names:
        return query
    kept = []
    for part in query[1:].split(b"&"):
        name = part.split(b"=", 1)[0]
        if unquote_to_bytes(name.replace(b"+", b" ")) in names:
            continue
        kept.append(part)
    return b"?" + b"&".join(kept) if kept else b""


class _JwksService(Service):
    """Starts and stops the filter's JWK Set sources with the gateway."""

    def __init__(self, auth_filter: "AuthFilter") -> None:
        self._filter = auth_filter

    def startService(self) -> None:
        super().startService()
        for source in self._filter.sources.values():
            source.start()

    def stopService(self) -> None:
        super().stopService()
        for source in self._filter.sources.values():
            source.stop()


class AuthFilter:
    """
    Authenticates requests of routes with C{auth}, authorizes them against
    C{allowed_consumers}, and prepares what is forwarded.

    @param gateway: its reactor is the clock of token checks and JWKS
        fetches.
    @param http_client: what JWK Sets are fetched with (C{get} as treq's);
        None for a treq client on the reactor.
    @ivar sources: the JWK Set sources, by their settings.
    @ivar service: starts and stops the sources.
    """

    name = NAME

    def __init__(self, gateway, http_client=None) -> None:
        self._reactor = gateway.reactor
        self._http_client = http_client
        self.sources: dict[JwksSettings, JwksSource] = {}
        self._routes: dict[AuthSettings, RouteAuth] = {}
        self.service = _JwksService(self)
        self.reconfigure(gateway.snapshot)

    def _source(self, jwks: JwksSettings) -> JwksSource:
        source = self.sources.get(jwks)
        if source is None:
            options = dict(
                refresh_interval=jwks.refresh_interval,
                min_refetch_interval=jwks.min_refetch_interval,
                timeout=jwks.timeout,
                max_size=jwks.max_size,
            )
            if self._http_client is None:
                source = JwksSource.create(jwks.url, self._reactor, **options)
            else:
                source = JwksSource(jwks.url, self._reactor, self._http_client, **options)
            self.sources[jwks] = source
        return source

    def reconfigure(self, snapshot) -> None:
        """
        Build what the routes of C{snapshot} need, keeping the
        authenticators and JWK Set sources of unchanged settings; start new
        sources if the gateway runs, stop those no route uses any more.
        """
        wanted = {route.options.get(NAME) for route in snapshot.config.routes} - {None}
        old_sources = dict(self.sources)
        self.sources = {}
        routes = {}
        for settings in wanted:
            if settings.jwt is not None and settings.jwt.jwks is not None:
                jwks = settings.jwt.jwks
                if jwks in old_sources:
                    self.sources[jwks] = old_sources[jwks]
            route_auth = self._routes.get(settings)
            if route_auth is None:
                route_auth = RouteAuth.build(
                    settings, build_authenticator(settings, self._reactor, self._source)
                )
            routes[settings] = route_auth
        self._routes = routes
        for jwks, source in old_sources.items():
            if jwks not in self.sources:
                source.stop()
        if self.service.running:
            for source in self.sources.values():
                source.start()

    def on_request(self, request, context):
        settings = context.route.options.get(NAME)
        if settings is None:
            return None
        route_auth = self._routes[settings]
        # The query string only, never a form-encoded body's fields, which
        # no key is looked for in nor stripped from (the gateway's requests
        # do not parse bodies into request.args; other sites' may).
        query_args = parse_qs(context.query[1:], keep_blank_values=True) if route_auth.reads_query else {}
        try:
            result = route_auth.authenticator.authenticate(request.requestHeaders, query_args)
        except Unauthorized as e:
            return self._unauthorized(e, context)
        if isinstance(result, Deferred):
            return result.addCallbacks(
                self._authenticated,
                self._refused,
                callbackArgs=(route_auth, context),
                errbackArgs=(context,),
            )
        return self._authenticated(result, route_auth, context)

    def _authenticated(self, result: AuthResult, route_auth: RouteAuth, context) -> Optional[Answer]:
        context.consumer = result.consumer
        try:
            authorize(result, route_auth.settings.allowed_consumers)
        except Forbidden as e:
            context.error = "consumer not allowed"
            _log.info(
                "consumer {consumer} refused on route {route}: {reason}",
                consumer=result.consumer,
                route=context.route.name,
                reason=e.reason,
                request_id=context.request_id,
            )
            return Answer.error_(403, "forbidden")
        context.upstream_remove.update(route_auth.remove_headers)
        context.upstream_headers.extend(result.upstream_headers)
        context.query = without_query_args(context.query, route_auth.remove_query)
        return None

    def _refused(self, failure: Failure, context) -> Answer:
        failure.trap(Unauthorized)
        return self._unauthorized(failure.value, context)

    def _unauthorized(self, error: Unauthorized, context) -> Answer:
        context.error = "unauthorized"
        _log.info(
            "unauthenticated request on route {route}: {reason}",
            route=context.route.name,
            reason=error.reason,
            request_id=context.request_id,
        )
        message = (
            "authentication required"
            if error.reason == "no credentials"
            else f"invalid credentials: {error.reason}"
        )
        return Answer.error_(401, message, ((b"WWW-Authenticate", error.www_authenticate),))


register_filter(ORDER, NAME, AuthFilter)
