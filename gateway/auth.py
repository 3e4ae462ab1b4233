"""
Who is calling: API keys and JSON Web Tokens.

The pieces, from the bottom up:

  - L{ApiKeyAuthenticator}: looks a presented API key up among the
    consumers' keys (stored as C{sha256:<hex>} or, for development, plain).
  - L{JwtVerifier}: checks a bearer token's signature, algorithm, C{exp},
    C{nbf}, C{iat}, C{iss} and C{aud} with PyJWT, against keys from
    L{StaticKeys} or a L{JwksSource}, with time read from an injected clock.
  - L{JwksSource}: a JWK Set fetched with treq on a L{LoopingCall}, keeping
    the last good set when a fetch fails and refetching early (rate-limited)
    when a token names a key id it does not know.
  - L{Authenticator}: tries the configured methods in order (either
    suffices) and turns refusals into L{Unauthorized}, whose
    C{www_authenticate} is the header value of RFC 6750 section 3.
  - L{authorize}: raises L{Forbidden} when a route admits only some
    consumers.

Everything is synchronous on the fast path (API keys, a JWT whose key is
already known); only a token naming an unknown C{kid} makes
L{Authenticator.authenticate} return a L{Deferred}.

Refusal messages (the C{error_description}) name the check that failed, never
the key material or the expected values.

Sources: RFC 6750 (bearer tokens, C{WWW-Authenticate}), RFC 7515/7517/7519
(JWS, JWK, JWT), RFC 7518 section 3.2 (HMAC key sizes), RFC 8725 (JWT best
current practice: algorithm allow-lists, no C{none}, key/algorithm binding).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from types import MappingProxyType
from typing import (
    Any,
    Collection,
    Iterable,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Union,
)

import attrs
import jwt
import treq
from treq.client import HTTPClient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

_log = Logger()

#: The algorithms a L{JwtVerifier} may be configured with. C{none} is never
#: one of them.
SUPPORTED_ALGORITHMS = frozenset(
    {
        "HS256", "HS384", "HS512",
        "RS256", "RS384", "RS512",
        "PS256", "PS384", "PS512",
        "ES256", "ES384", "ES512", "ES256K",
        "EdDSA",
    }
)

_RSA_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
_EC_ALGORITHMS = {
    "secp256r1": frozenset({"ES256"}),
    "secp384r1": frozenset({"ES384"}),
    "secp521r1": frozenset({"ES512"}),
    "secp256k1": frozenset({"ES256K"}),
}
_EDDSA = frozenset({"EdDSA"})
# RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_RSA_BITS = 2048

# RFC 6750 section 3: error and error_description values (and, in practice,
# the quoted realm) are restricted to %x20-21 / %x23-5B / %x5D-7E.
_NOT_QDTEXT = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
# RFC 9110 section 5.6.2: a header field name is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}\Z")

AUTHORIZATION = b"Authorization"


# --------------------------------------------------------------------------
# Errors and results
# --------------------------------------------------------------------------


class InvalidCredentials(Exception):
    """
    A credential was presented and refused by one method.

    @ivar description: why, short and safe to show to the client (it becomes
        the C{error_description} of the challenge).
    @type description: L{str}
    """

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


class Unauthorized(Exception):
    """
    The request is not authenticated: answer 401 with a C{WWW-Authenticate}
    header whose value is C{www_authenticate}.

    @ivar www_authenticate: the header value, for example
        C{b'Bearer realm="txgateway", error="invalid_token",
        error_description="token expired"'}.
    @type www_authenticate: L{bytes}
    @ivar reason: why, for logs (C{"no credentials"} or the description).
    @type reason: L{str}
    """

    def __init__(self, www_authenticate: bytes, reason: str) -> None:
        super().__init__(www_authenticate, reason)
        self.www_authenticate = www_authenticate
        self.reason = reason


class Forbidden(Exception):
    """
    The request is authenticated but not allowed here: answer 403.

    @ivar reason: why, for logs.
    @type reason: L{str}
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class AuthResult:
    """
    Who the request comes from.

    @ivar method: how it proved it: C{"api_key"} or C{"jwt"}.
    @ivar consumer: the consumer's name: the name of the consumer owning the
        API key, or the token's C{sub} (or the verifier's C{consumer_claim});
        L{None} when the token has no such string claim.
    @ivar claims: the token's verified claims (empty for API keys),
        read-only.
    @ivar upstream_headers: C{(name, value)} pairs to set on the forwarded
        request (the JWT verifier's C{forward_claims}).
    """

    method: str
    consumer: Optional[str]
    claims: Mapping[str, Any] = attrs.field(
        factory=dict, converter=lambda m: MappingProxyType(dict(m))
    )
    upstream_headers: tuple[tuple[bytes, bytes], ...] = ()


def www_authenticate(
    realm: str = "txgateway",
    error: Optional[str] = None,
    description: Optional[str] = None,
) -> bytes:
    """
    Build a C{WWW-Authenticate} value for the Bearer scheme (RFC 6750 s. 3).

    Without C{error} (credentials simply missing) the value carries the realm
    only, as RFC 6750 section 3.1 asks.

    @param realm: the protection space.
    @param error: C{"invalid_request"}, C{"invalid_token"} or
        C{"insufficient_scope"}, or L{None}.
    @param description: human-readable C{error_description}; characters the
        RFC does not allow (quotes, backslashes, controls, non-ASCII) are
        replaced by C{?}. Ignored without C{error}.
    @return: the ASCII header value.
    """
    parts = ['Bearer realm="%s"' % (_NOT_QDTEXT.sub("?", realm),)]
    if error is not None:
        parts.append('error="%s"' % (_NOT_QDTEXT.sub("?", error),))
        if description:
            parts.append(
                'error_description="%s"' % (_NOT_QDTEXT.sub("?", description),)
            )
    return ", ".join(parts).encode("ascii")


def authorize(
    result: AuthResult, allowed_consumers: Optional[Collection[str]]
) -> None:
    """
    Check that the authenticated consumer may use a route.

    @param result: the identity from L{Authenticator.authenticate}.
    @param allowed_consumers: the route's allowed consumer names, or L{None}
        when any authenticated consumer may use it.
    @raise Forbidden: the consumer is not among C{allowed_consumers} (a
        token without a consumer claim never is).
    """
    if allowed_consumers is None:
        return
    if result.consumer is None or result.consumer not in allowed_consumers:
        raise Forbidden(
            "consumer %r is not allowed on this route" % (result.consumer,)
        )


def _header_name(value: Union[str, bytes]) -> bytes:
    name = value.encode("ascii") if isinstance(value, str) else bytes(value)
    if not _TOKEN.match(name):
        raise ValueError("not a valid header name: %r" % (value,))
    return name


def _single(values: Optional[Sequence[bytes]], what: str) -> Optional[bytes]:
    """
    The one value of a header or query argument, L{None} when absent.

    @raise InvalidCredentials: it was given more than once.
    """
    if not values:
        return None
    if len(values) != 1:
        raise InvalidCredentials("more than one %s" % (what,))
    return values[0]


# --------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------


@attrs.frozen
class Consumer:
    """
    A caller known to the gateway.

    @ivar name: unique name, the identity of requests using its keys.
    @ivar api_keys: its keys, each C{"sha256:<64 hex digits>"} (the SHA-256
        of the key's bytes, see L{hash_api_key}) or the plain key (for
        development).
    """

    name: str
    api_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple)


def hash_api_key(key: Union[str, bytes]) -> str:
    """
    The stored form of an API key: C{"sha256:"} and the hex SHA-256 digest
    of its UTF-8 bytes.
    """
    if isinstance(key, str):
        key = key.encode("utf-8")
    return "sha256:" + hashlib.sha256(key).hexdigest()


def _stored_digest(stored: str) -> bytes:
    if stored.startswith("sha256:"):
        hexdigest = stored[len("sha256:"):]
        if not _SHA256_HEX.match(hexdigest):
            raise ValueError("sha256: API key must be 64 hex digits")
        return bytes.fromhex(hexdigest)
    if not stored:
        raise ValueError("empty API key")
    return hashlib.sha256(stored.encode("utf-8")).digest()


#: How many valid API keys an L{ApiKeyAuthenticator} remembers (see there).
#: With more keys than this in use, the dict is emptied and refilled, and
#: keys are hashed again now and then.
KNOWN_KEYS_MAX = 4096


@attrs.define
class ApiKeyAuthenticator:
    """
    The C{api_key} method: a key in a header or a query argument.

    Keys are compared by their SHA-256 digests. The presented key's digest is
    looked up in a dict keyed by the stored digests and the match confirmed
    with L{hmac.compare_digest}: the lookup's timing depends only on the
    digest of what the caller sent, which the caller cannot steer towards a
    stored digest, so it reveals nothing about stored keys, and the cost
    stays constant however many consumers there are.

    A key found valid is remembered, with its result, in a dict keyed by
    the key itself (at most L{KNOWN_KEYS_MAX} keys; when full it is
    emptied), so that a client sending the same key request after request
    is hashed once.  The keys themselves stay in the process's memory then,
    even when the configuration holds only their digests (as each request's
    key does while the request is handled).  Only valid keys are
    remembered, so the dict's lookup tells a caller nothing it is not told
    anyway: a key it presents is either valid, and accepted, or it is
    hashed and refused as before.  On PyPy this matters more than the
    hashing's CPU: each hash object has a finalizer, and PyPy's collector
    walks every such object that reached its old generation at the end of
    each major collection's marking, in one step that set the p99
    (docs/performance.rst).  A configuration load that changes the
    consumers or their keys builds a new authenticator
    (L{gateway.filters.auth}), so a key removed from the configuration is
    forgotten with the old one.

    @ivar consumers: the known consumers.
    @ivar header: the header carrying the key (case-insensitive), or L{None}.
    @ivar query: the query argument carrying the key (exact bytes), or
        L{None}. The header wins when both are present.
    @raise ValueError: at construction, on a malformed stored key or a key
        shared by two consumers.
    """

    consumers: Sequence[Consumer] = attrs.field(converter=tuple)
    header: Optional[bytes] = attrs.field(
        default=b"X-API-Key",
        converter=lambda v: None if v is None else _header_name(v),
    )
    query: Optional[bytes] = attrs.field(
        default=b"api_key",
        converter=lambda v: v.encode("utf-8") if isinstance(v, str) else v,
    )
    _by_digest: dict[bytes, tuple[bytes, str]] = attrs.field(
        init=False, factory=dict, repr=False
    )
    _known: dict[bytes, AuthResult] = attrs.field(
        init=False, factory=dict, repr=False
    )

    def __attrs_post_init__(self) -> None:
        for consumer in self.consumers:
            for stored in consumer.api_keys:
                digest = _stored_digest(stored)
                if digest in self._by_digest:
                    raise ValueError(
                        "API key of consumer %r is also a key of consumer %r"
                        % (consumer.name, self._by_digest[digest][1])
                    )
                self._by_digest[digest] = (digest, consumer.name)

    @property
    def credential_headers(self) -> tuple[bytes, ...]:
        """The header names that carry this method's credentials."""
        return () if self.header is None else (self.header,)

    @property
    def credential_query_args(self) -> tuple[bytes, ...]:
        """The query argument names that carry this method's credentials."""
        return () if self.query is None else (self.query,)

    @property
    def forwarded_headers(self) -> tuple[bytes, ...]:
        """Header names this method sets on forwarded requests: none."""
        return ()

    def authenticate(
        self, headers: Headers, query_args: Mapping[bytes, Sequence[bytes]]
    ) -> Optional[AuthResult]:
        """
        Identify the caller by its API key.

        @param headers: the request headers.
        @param query_args: the parsed query string (C{request.args}).
        @return: the consumer's identity, or L{None} when no key was sent.
        @raise InvalidCredentials: the key is unknown, empty or repeated.
        """
        presented = None
        if self.header is not None:
            presented = _single(headers.getRawHeaders(self.header), "API key")
        if presented is None and self.query is not None:
            presented = _single(query_args.get(self.query), "API key")
        if presented is None:
            return None
        known = self._known.get(presented)
        if known is not None:
            return known
        if not presented:
            raise InvalidCredentials("empty API key")
        digest = hashlib.sha256(presented).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            raise InvalidCredentials("unknown API key")
        result = AuthResult(method="api_key", consumer=found[1])
        if len(self._known) >= KNOWN_KEYS_MAX:
            self._known.clear()
        self._known[presented] = result
        return result


# --------------------------------------------------------------------------
# Verification keys
# --------------------------------------------------------------------------


@attrs.frozen
class VerificationKey:
    """
    A key that verifies signatures, bound to the algorithms it may verify.

    The binding is what defeats algorithm confusion (RFC 8725 section 2.1):
    an RSA public key is never offered to HMAC, whatever the token's C{alg}
    says.

    @ivar key: a C{cryptography} public key, or the HMAC secret as L{bytes}.
    @ivar algorithms: the JWS algorithms this key may verify.
    @ivar kid: the key id from the JWK Set, or L{None}.
    """

    key: Any
    algorithms: frozenset
    kid: Optional[str] = None


def _public_key_algorithms(key: Any) -> frozenset:
    """
    The algorithms a public key may verify.

    @raise ValueError: unsupported key type or curve, or an RSA key shorter
        than 2048 bits.
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(
                "RSA key of %d bits is shorter than %d"
                % (key.key_size, _MIN_RSA_BITS)
            )
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        try:
            return _EC_ALGORITHMS[key.curve.name]
        except KeyError:
            raise ValueError("unsupported curve %s" % (key.curve.name,))
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return _EDDSA
    raise ValueError("unsupported key type %s" % (type(key).__name__,))


def _public(key: Any) -> Any:
    return key.public_key() if hasattr(key, "public_key") else key


def key_from_config(value: Union[str, bytes]) -> VerificationKey:
    """
    Read one configured key: a PEM public key, certificate or private key
    (its public half is kept), or an HMAC secret.

    Anything that looks like key material (C{-----BEGIN}, C{ssh-...}) must
    parse as such: it is never taken as an HMAC secret, which is exactly the
    algorithm-confusion mistake.

    @param value: the PEM text or the secret (a L{str} is encoded as UTF-8).
    @raise ValueError: unparsable PEM, unsupported key, or an HMAC secret
        shorter than 32 bytes (RFC 7518 section 3.2). A secret of 32 to 47
        bytes verifies HS256 only, 48 to 63 bytes HS256 and HS384.
    """
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    stripped = data.strip()
    if b"-----BEGIN" in stripped:
        try:
            if b"-----BEGIN CERTIFICATE-----" in stripped:
                key = x509.load_pem_x509_certificate(stripped).public_key()
            elif b"PRIVATE KEY-----" in stripped:
                key = serialization.load_pem_private_key(
                    stripped, password=None
                ).public_key()
            else:
                key = serialization.load_pem_public_key(stripped)
        except (ValueError, TypeError) as e:
            raise ValueError("unreadable PEM key: %s" % (e,)) from None
        return VerificationKey(key=key, algorithms=_public_key_algorithms(key))
    if stripped.startswith((b"ssh-", b"ecdsa-sha2-")):
        raise ValueError("SSH keys are not supported; use PEM")
    algorithms = frozenset(
        alg for alg, size in _HMAC_MIN_BYTES.items() if len(data) >= size
    )
    if not algorithms:
        raise ValueError(
            "HMAC secret of %d bytes is shorter than 32 bytes" % (len(data),)
        )
    return VerificationKey(key=data, algorithms=algorithms)


def key_from_jwk(jwk: Mapping[str, Any]) -> VerificationKey:
    """
    Read one key of a JWK Set (RFC 7517).

    RSA, EC and OKP keys are accepted; symmetric (C{oct}) keys are not, since
    a JWK Set is published. A key whose C{use} is not C{sig}, whose
    C{key_ops} lacks C{verify}, or whose C{alg} does not fit its type is
    refused.

    @raise ValueError: the key is refused or malformed.
    """
    if not isinstance(jwk, Mapping):
        raise ValueError("a JWK must be an object")
    kty = jwk.get("kty")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("key use is not sig")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and "verify" not in key_ops:
        raise ValueError("key_ops does not include verify")
    reader = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}.get(
        kty
    )
    if reader is None:
        raise ValueError("unsupported key type %r" % (kty,))
    try:
        key = _public(reader.from_jwk(dict(jwk)))
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
        raise ValueError("malformed %s JWK: %s" % (kty, e)) from None
    algorithms = _public_key_algorithms(key)
    alg = jwk.get("alg")
    if alg is not None:
        if alg not in algorithms:
            raise ValueError("alg %r does not fit a %s key" % (alg, kty))
        algorithms = frozenset({alg})
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid must be a string")
    return VerificationKey(key=key, algorithms=algorithms, kid=kid)


@attrs.frozen
class KeySet:
    """
    An immutable set of verification keys, swapped whole on a refresh.

    @ivar keys: the keys.
    @ivar by_kid: whether tokens' C{kid} selects among the keys (a JWK Set)
        or is ignored (configured keys, which have no ids).
    """

    keys: tuple[VerificationKey, ...] = ()
    by_kid: bool = False
    _index: Mapping[str, tuple[VerificationKey, ...]] = attrs.field(
        init=False, repr=False
    )

    @_index.default
    def _build_index(self) -> Mapping[str, tuple[VerificationKey, ...]]:
        index: dict[str, list[VerificationKey]] = {}
        for key in self.keys:
            if key.kid is not None:
                index.setdefault(key.kid, []).append(key)
        return {kid: tuple(keys) for kid, keys in index.items()}

    def candidates(
        self, kid: Optional[str], alg: str
    ) -> Optional[tuple[VerificationKey, ...]]:
        """
        The keys that may verify a token.

        @param kid: the token's key id, or L{None}.
        @param alg: the token's algorithm, already checked against the
            allow-list.
        @return: the keys bound to C{alg} (with id C{kid} when the set is
            selected by kid and the token names one); L{None} when the token
            names a kid this set does not have.
        """
        if self.by_kid and kid is not None:
            named = self._index.get(kid)
            if named is None:
                return None
            return tuple(k for k in named if alg in k.algorithms)
        return tuple(k for k in self.keys if alg in k.algorithms)


class KeySource(Protocol):
    """What L{JwtVerifier} needs from its keys: L{StaticKeys}, L{JwksSource}."""

    def current(self) -> KeySet:
        ...

    def refetch(self, kid: str) -> Optional[Deferred]:
        ...


@attrs.define
class StaticKeys:
    """
    Keys given in the configuration (C{jwt.keys}): PEM keys or HMAC secrets.

    Tokens' C{kid} is ignored: each key bound to the token's algorithm is
    tried.

    @ivar keys: the key texts, see L{key_from_config}.
    @raise ValueError: at construction, on a refused key or no key at all.
    """

    keys: Sequence[Union[str, bytes]]
    _set: KeySet = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.keys:
            raise ValueError("no JWT verification keys")
        self._set = KeySet(tuple(key_from_config(k) for k in self.keys))

    def current(self) -> KeySet:
        """The keys."""
        return self._set

    def refetch(self, kid: str) -> None:
        """Static keys never change: L{None}."""
        return None


# --------------------------------------------------------------------------
# JWK Set fetching
# --------------------------------------------------------------------------


class JwksError(Exception):
    """A JWK Set fetch failed: HTTP status, size, JSON, or no usable key."""


def parse_jwks(body: bytes) -> KeySet:
    """
    Read a JWK Set document, skipping (and logging) keys it cannot use.

    @param body: the JSON document.
    @return: the usable keys, selected by kid.
    @raise JwksError: not a JWK Set, or no usable key in it.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise JwksError("JWK Set is not JSON: %s" % (e,)) from None
    if not isinstance(document, dict) or not isinstance(
        document.get("keys"), list
    ):
        raise JwksError("document has no keys list")
    keys = []
    for index, jwk in enumerate(document["keys"]):
        try:
            keys.append(key_from_jwk(jwk))
        except ValueError as e:
            _log.info("JWKS key {index} skipped: {reason}", index=index, reason=str(e))
    if not keys:
        raise JwksError("no usable key in the JWK Set")
    return KeySet(tuple(keys), by_kid=True)


class _HTTPClient(Protocol):
    def get(self, url: Any, **kwargs: Any) -> Deferred:
        ...


@attrs.define
class JwksSource:
    """
    A JWK Set fetched from C{url} every C{refresh_interval} seconds.

    L{current} is always the last set fetched successfully (empty until the
    first success): a failed fetch (connection error, timeout, non-200
    status, body over C{max_size}, not a JWK Set, no usable key) is logged
    and changes nothing. L{refetch} fetches early for a token naming an
    unknown C{kid}, at most once per C{min_refetch_interval} seconds counted
    from the start of the previous fetch of any kind, so a flood of tokens
    with made-up kids cannot hammer the identity provider. Fetches never
    overlap: a refetch asked for while one runs joins it.

    Redirects are not followed.

    @ivar url: the JWK Set URL.
    @ivar clock: the time source for the schedule, timeouts and rate limit.
    @ivar http_client: a L{treq.client.HTTPClient} (or anything with its
        C{get}); give it an agent with a non-persistent pool, or the pool's
        idle connections outlive L{stop}.
    @ivar refresh_interval: seconds between scheduled fetches.
    @ivar min_refetch_interval: seconds between the start of one fetch and
        an early refetch.
    @ivar timeout: seconds a fetch may take, body included, before it is
        cancelled.
    @ivar max_size: bytes of body accepted.
    @raise ValueError: at construction, on a non-positive interval, timeout
        or size.
    """

    url: str = attrs.field(
        converter=lambda u: u.decode("ascii") if isinstance(u, bytes) else u
    )
    clock: IReactorTime
    http_client: _HTTPClient
    refresh_interval: float = 300.0
    min_refetch_interval: float = 10.0
    timeout: float = 10.0
    max_size: int = 1 << 20
    _keys: KeySet = attrs.field(init=False, factory=lambda: KeySet(by_kid=True))
    _loop: Optional[LoopingCall] = attrs.field(init=False, default=None)
    _inflight: Optional[Deferred] = attrs.field(init=False, default=None)
    _waiters: list = attrs.field(init=False, factory=list)
    _last_fetch: Optional[float] = attrs.field(init=False, default=None)
    #: Seconds (clock time) of the last successful fetch, or L{None}.
    last_success: Optional[float] = attrs.field(init=False, default=None)
    #: Counts of fetches started, succeeded and failed, for metrics.
    fetches: int = attrs.field(init=False, default=0)
    failures: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        for name in ("refresh_interval", "timeout", "max_size"):
            if getattr(self, name) <= 0:
                raise ValueError("JWKS %s must be positive" % (name,))
        if self.min_refetch_interval < 0:
            raise ValueError("JWKS min_refetch_interval must not be negative")

    @classmethod
    def create(cls, url: str, reactor: Any, **kwargs: Any) -> "JwksSource":
        """
        A source using C{reactor} for both time and a treq client with its
        own non-persistent connection pool.

        @param reactor: provides L{IReactorTime} and L{IReactorTCP}.
        @param kwargs: the other attributes.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, pool=pool))
        return cls(url, reactor, client, **kwargs)

    def start(self) -> None:
        """Fetch now, then every C{refresh_interval} seconds, until L{stop}."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.refresh_interval, now=True).addErrback(
            lambda f: _log.failure("JWKS refresh loop died", f)
        )

    def stop(self) -> None:
        """Stop the schedule and cancel a fetch in flight."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._inflight is not None:
            self._inflight.cancel()

    @property
    def running(self) -> bool:
        """Whether L{start} was called and L{stop} not since."""
        return self._loop is not None

    def current(self) -> KeySet:
        """The last good key set (empty before the first success)."""
        return self._keys

    def refetch(self, kid: str) -> Optional[Deferred]:
        """
        Fetch early because a token names C{kid}, which L{current} lacks.

        @return: a L{Deferred} firing with the key set once the fetch (a new
            one, or the one in flight) ends, never failing; or L{None} when
            the rate limit or a stopped source forbids fetching.
        """
        if self._loop is None:
            return None
        if self._inflight is None and self._last_fetch is not None:
            if self.clock.seconds() - self._last_fetch < self.min_refetch_interval:
                return None
        _log.info("JWKS refetch for unknown kid {kid}", kid=kid)
        return self.refresh()

    def refresh(self) -> Deferred:
        """
        Fetch now, or join the fetch in flight.

        @return: a L{Deferred} firing with L{current} after the fetch,
            successful or not; it never fails.
        """
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if self._inflight is None:
            self._last_fetch = self.clock.seconds()
            self.fetches += 1
            d = maybeDeferred(self._fetch)
            self._inflight = d
            d.addCallbacks(self._fetched, self._failed)
            d.addBoth(self._done)
        return waiter

    def _tick(self) -> Deferred:
        return self.refresh()

    def _fetch(self) -> Deferred:
        chunks: list[bytes] = []
        received = [0]

        def collect(data: bytes) -> None:
            received[0] += len(data)
            if received[0] > self.max_size:
                raise JwksError("JWK Set larger than %d bytes" % (self.max_size,))
            chunks.append(data)

        def got_response(response: Any) -> Deferred:
            return treq.collect(response, collect).addCallback(
                lambda _: (response.code, b"".join(chunks))
            )

        def got_body(result: tuple[int, bytes]) -> KeySet:
            code, body = result
            if code != 200:
                raise JwksError("HTTP status %d" % (code,))
            return parse_jwks(body)

        d = self.http_client.get(
            self.url,
            headers={b"Accept": [b"application/json, application/jwk-set+json"]},
            allow_redirects=False,
            unbuffered=True,
        )
        d.addCallback(got_response)
        d.addCallback(got_body)
        d.addTimeout(self.timeout, self.clock)
        return d

    def _fetched(self, keys: KeySet) -> None:
        self._keys = keys
        self.last_success = self.clock.seconds()
        _log.info(
            "JWKS fetched from {url}: {count} keys", url=self.url, count=len(keys.keys)
        )

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        _log.warn(
            "JWKS fetch from {url} failed, keeping the last good key set: {error}",
            url=self.url,
            error=failure.getErrorMessage() or failure.type.__name__,
        )

    def _done(self, _: object) -> None:
        self._inflight = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._keys)


# --------------------------------------------------------------------------
# JWT
# --------------------------------------------------------------------------


def _is_time(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _unverified_header(token: str) -> dict:
    """
    The JOSE header of a compact JWS, to choose the algorithm and key.

    PyJWT parses the whole token again, strictly, when verifying, and it is
    told to accept only the algorithm read here, so a leniency in this
    parse cannot make a token pass: it only saves parsing twice with
    PyJWT's slower validating decoder.

    @raise InvalidCredentials: not three segments, or a header that is not
        a base64url JSON object, or a C{kid} that is not a string.
    """
    head, _, rest = token.partition(".")
    if rest.count(".") != 1:
        raise InvalidCredentials("malformed token")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, TypeError, binascii.Error):
        raise InvalidCredentials("malformed token") from None
    if not isinstance(header, dict):
        raise InvalidCredentials("malformed token")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise InvalidCredentials("malformed token")
    return header


def _claim_header_value(value: Any) -> Optional[bytes]:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int)):
        text = str(value)
    elif isinstance(value, float) and math.isfinite(value):
        text = repr(value)
    else:
        return None
    raw = text.encode("utf-8")
    if _CONTROL.search(raw):
        return None
    return raw


#: How many verified tokens a L{JwtVerifier} remembers (see there): at most
#: about 8 MiB of tokens at the longest accepted length, plus their claims;
#: when full, the oldest is forgotten.
VERIFIED_TOKENS_MAX = 1024

#: The compact form of a JWS, strictly (RFC 7515 section 7.1: base64url
#: without padding): only tokens written so are remembered, since PyJWT's
#: decoding also accepts variants of one token (padding after the
#: signature) that would each take a place of their own.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")


@attrs.define
class JwtVerifier:
    """
    The C{jwt} method: a bearer token (RFC 6750 section 2.1) that is a signed
    JWT.

    A token passes when: its C{alg} is in C{algorithms} (never C{none}); a
    key bound to that algorithm (and to its C{kid}, for a JWK Set) verifies
    its signature; C{iss} equals C{issuer} and C{aud} names C{audience} when
    these are configured (C{aud} is not checked otherwise); and, against
    C{clock.seconds()} with C{leeway}, it has not expired (C{exp}, required
    unless C{require_exp} is false), is already valid (C{nbf}) and was not
    issued in the future (C{iat}).

    A token that passed is remembered, with its claims and the key set that
    verified it (at most L{VERIFIED_TOKENS_MAX} tokens, the oldest
    forgotten first; only tokens in the strict compact form), so that a
    client sending the same token request after request has its signature
    verified once: the time claims are checked again on every request, and
    a remembered token is verified again once the key set has changed (a
    JWK Set fetched again, even unchanged).  As
    with API keys (L{ApiKeyAuthenticator}), only tokens that passed are
    remembered, so the lookup tells a caller nothing its answer does not,
    and on PyPy this removes the finalizers of the hash and key objects
    each verification made, which made the last marking step of every major
    collection 63-76 ms with HS256 (docs/performance.rst).

    @ivar algorithms: the allow-list, a subset of L{SUPPORTED_ALGORITHMS}.
    @ivar keys: L{StaticKeys} or a L{JwksSource}.
    @ivar clock: the time source.
    @ivar issuer: the required C{iss}, or L{None}.
    @ivar audience: the required C{aud} (one name, or several of which the
        token must name one), or L{None}.
    @ivar leeway: seconds of clock skew tolerated on C{exp}, C{nbf}, C{iat}.
    @ivar require_exp: refuse tokens without C{exp}.
    @ivar forward_claims: claim name -> header name set on the forwarded
        request from the claim's value (strings, numbers and booleans only).
    @ivar consumer_claim: the claim naming the consumer in L{AuthResult}.
    @ivar max_token_length: longer tokens are refused unparsed (characters).
    @raise ValueError: at construction, on an empty or unsupported
        algorithm list or a bad header name.
    """

    algorithms: frozenset = attrs.field(converter=frozenset)
    keys: KeySource
    clock: IReactorTime
    issuer: Optional[str] = None
    audience: Optional[Union[str, Sequence[str]]] = None
    leeway: float = 0.0
    require_exp: bool = True
    forward_claims: tuple[tuple[str, bytes], ...] = attrs.field(
        default=(),
        converter=lambda m: tuple(
            (claim, _header_name(header))
            for claim, header in (m.items() if isinstance(m, Mapping) else m)
        ),
    )
    consumer_claim: str = "sub"
    max_token_length: int = 8192
    _jwt: jwt.PyJWT = attrs.field(init=False, repr=False)
    _verified: dict = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.algorithms:
            raise ValueError("no JWT algorithms allowed")
        unsupported = self.algorithms - SUPPORTED_ALGORITHMS
        if unsupported:
            raise ValueError(
                "unsupported JWT algorithms: %s" % (", ".join(sorted(unsupported)),)
            )
        if self.leeway < 0:
            raise ValueError("leeway must not be negative")
        if self.audience is not None and not isinstance(self.audience, str):
            self.audience = tuple(self.audience)
        # Time claims are checked in _check_times against the injected clock;
        # PyJWT would read the wall clock.
        self._jwt = jwt.PyJWT(
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": self.audience is not None,
                "verify_iss": self.issuer is not None,
                "enforce_minimum_key_length": True,
            }
        )

    @property
    def credential_headers(self) -> tuple[bytes, ...]:
        """The header names that carry this method's credentials."""
        return (AUTHORIZATION,)

    @property
    def credential_query_args(self) -> tuple[bytes, ...]:
        """The query argument names that carry credentials: none."""
        return ()

    @property
    def forwarded_headers(self) -> tuple[bytes, ...]:
        """The header names set from claims on forwarded requests."""
        return tuple(header for _, header in self.forward_claims)

    def authenticate(
        self, headers: Headers, query_args: Mapping[bytes, Sequence[bytes]]
    ) -> Union[None, AuthResult, Deferred]:
        """
        Identify the caller by the bearer token of its C{Authorization}.

        @return: L{None} when there is no C{Authorization: Bearer} header
            (another scheme is not this method's business); otherwise as
            L{verify}, with the claims made into an L{AuthResult}.
        @raise InvalidCredentials: as L{verify}, or an empty or repeated
            credential.
        """
        value = _single(headers.getRawHeaders(AUTHORIZATION), "Authorization header")
        if value is None:
            return None
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        token = token.strip(b" ")
        if not token:
            raise InvalidCredentials("empty bearer token")
        claims = self.verify(token)
        if isinstance(claims, Deferred):
            return claims.addCallback(self._result)
        return self._result(claims)

    def verify(self, token: Union[str, bytes]) -> Union[dict, Deferred]:
        """
        Verify a token.

        @param token: the compact JWS serialization.
        @return: the claims, synchronously when the keys are at hand or
            the token is remembered; a
            L{Deferred} firing with them (or failing with
            L{InvalidCredentials}) when the token names a C{kid} the JWK Set
            lacks and an early refetch was started or joined.
        @raise InvalidCredentials: the token is refused; the description
            names the check.
        """
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise InvalidCredentials("malformed token") from None
        if len(token) > self.max_token_length:
            raise InvalidCredentials("token too long")
        verified = self._verified.get(token)
        if verified is not None:
            keys, claims = verified
            if keys is self.keys.current():
                try:
                    self._check_times(claims)
                except InvalidCredentials:
                    del self._verified[token]
                    raise
                return dict(claims)
            del self._verified[token]
        header = _unverified_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidCredentials("algorithm not allowed")
        kid = header.get("kid")
        keys = self.keys.current()
        candidates = keys.candidates(kid, alg)
        if candidates is not None:
            return self._remember(token, keys, self._check(token, alg, candidates))

        waiting = self.keys.refetch(kid)
        if waiting is None:
            raise InvalidCredentials("unknown key id")

        def refetched(keys: KeySet) -> dict:
            candidates = keys.candidates(kid, alg)
            if candidates is None:
                raise InvalidCredentials("unknown key id")
            return self._remember(token, keys, self._check(token, alg, candidates))

        return waiting.addCallback(refetched)

    def _remember(self, token: str, keys: KeySet, claims: dict) -> dict:
        """Remember C{token}, which C{keys} verified, and return C{claims}."""
        if _COMPACT_JWS.match(token):
            verified = self._verified
            if len(verified) >= VERIFIED_TOKENS_MAX:
                del verified[next(iter(verified))]  # the oldest
            verified[token] = (keys, dict(claims))
        return claims

    def _check(
        self, token: str, alg: str, candidates: Iterable[VerificationKey]
    ) -> dict:
        tried = False
        for candidate in candidates:
            tried = True
            try:
                claims = self._jwt.decode(
                    token,
                    key=candidate.key,
                    algorithms=[alg],
                    audience=self.audience,
                    issuer=self.issuer,
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError:
                raise InvalidCredentials("invalid audience") from None
            except jwt.InvalidIssuerError:
                raise InvalidCredentials("invalid issuer") from None
            except jwt.MissingRequiredClaimError as e:
                raise InvalidCredentials("missing claim %s" % (e.claim,)) from None
            except jwt.PyJWTError:
                raise InvalidCredentials("malformed token") from None
            self._check_times(claims)
            return claims
        if not tried:
            raise InvalidCredentials("no key for this algorithm")
        raise InvalidCredentials("signature verification failed")

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self.clock.seconds()
        leeway = self.leeway
        exp = claims.get("exp")
        if exp is None:
            if self.require_exp:
                raise InvalidCredentials("missing claim exp")
        elif not _is_time(exp):
            raise InvalidCredentials("invalid claim exp")
        elif now >= exp + leeway:
            raise InvalidCredentials("token expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_time(nbf):
                raise InvalidCredentials("invalid claim nbf")
            if nbf > now + leeway:
                raise InvalidCredentials("token not yet valid")
        iat = claims.get("iat")
        if iat is not None:
            if not _is_time(iat):
                raise InvalidCredentials("invalid claim iat")
            if iat > now + leeway:
                raise InvalidCredentials("token issued in the future")

    def _result(self, claims: dict) -> AuthResult:
        consumer = claims.get(self.consumer_claim)
        upstream = []
        for claim, header in self.forward_claims:
            if claim in claims:
                value = _claim_header_value(claims[claim])
                if value is not None:
                    upstream.append((header, value))
        return AuthResult(
            method="jwt",
            consumer=consumer if isinstance(consumer, str) else None,
            claims=claims,
            upstream_headers=tuple(upstream),
        )


# --------------------------------------------------------------------------
# The combination
# --------------------------------------------------------------------------


class AuthMethod(Protocol):
    """What L{Authenticator} needs of a method."""

    credential_headers: tuple[bytes, ...]
    credential_query_args: tuple[bytes, ...]
    forwarded_headers: tuple[bytes, ...]

    def authenticate(
        self, headers: Headers, query_args: Mapping[bytes, Sequence[bytes]]
    ) -> Union[None, AuthResult, Deferred]:
        ...


@attrs.define
class Authenticator:
    """
    The configured methods, tried in order; the first to accept wins.

    A method whose credential is absent is skipped; one whose credential is
    refused does not stop the others (C{methods: [api_key, jwt]}: either
    suffices). When none accepts, the refusal is L{Unauthorized}: with
    C{error="invalid_token"} and the first refusal's description when some
    credential was presented, with the realm only when none was.

    @ivar methods: L{ApiKeyAuthenticator} and L{JwtVerifier} instances.
    @ivar realm: the challenge's realm.
    @ivar strip_credentials: whether L{strip} removes the credentials.
    @raise ValueError: at construction, with no method or a realm that
        cannot be quoted.
    """

    methods: Sequence[AuthMethod] = attrs.field(converter=tuple)
    realm: str = "txgateway"
    strip_credentials: bool = True

    def __attrs_post_init__(self) -> None:
        if not self.methods:
            raise ValueError("no authentication method")
        if _NOT_QDTEXT.search(self.realm):
            raise ValueError("realm has characters that cannot be quoted")

    def authenticate(
        self, headers: Headers, query_args: Mapping[bytes, Sequence[bytes]]
    ) -> Union[AuthResult, Deferred]:
        """
        Identify the caller.

        @param headers: the request headers (C{request.requestHeaders}).
        @param query_args: the parsed query string (C{request.args}).
        @return: the identity, or a L{Deferred} firing with it or failing
            with L{Unauthorized} (only while a JWK Set is refetched).
        @raise Unauthorized: no method accepted.
        """
        return self._try(0, headers, query_args, [])

    def _try(
        self,
        index: int,
        headers: Headers,
        query_args: Mapping[bytes, Sequence[bytes]],
        refusals: list,
    ) -> Union[AuthResult, Deferred]:
        while index < len(self.methods):
            method = self.methods[index]
            index += 1
            try:
                result = method.authenticate(headers, query_args)
            except InvalidCredentials as e:
                refusals.append(e.description)
                continue
            if result is None:
                continue
            if isinstance(result, Deferred):
                following = index

                def refused(failure: Failure) -> Union[AuthResult, Deferred]:
                    failure.trap(InvalidCredentials)
                    refusals.append(failure.value.description)
                    return self._try(following, headers, query_args, refusals)

                return result.addErrback(refused)
            return result
        raise self._unauthorized(refusals)

    def _unauthorized(self, refusals: Sequence[str]) -> Unauthorized:
        if not refusals:
            return Unauthorized(www_authenticate(self.realm), "no credentials")
        return Unauthorized(
            www_authenticate(self.realm, "invalid_token", refusals[0]),
            refusals[0],
        )

    @property
    def forwarded_headers(self) -> tuple[bytes, ...]:
        """Header names the gateway sets from the identity."""
        return tuple(h for m in self.methods for h in m.forwarded_headers)

    def strip(self, headers: Headers, query_args: dict) -> None:
        """
        Prepare a request for forwarding, in place: always remove the headers
        the gateway sets from the identity (a client must not forge them);
        with C{strip_credentials}, also remove the credential headers
        (C{Authorization} whatever its scheme, the API key header) and query
        arguments.

        Call it after L{authenticate}, then set
        L{AuthResult.upstream_headers}; rebuild the forwarded query string
        from C{query_args} when this removed an argument.

        @return: L{None}
        """
        for name in self.forwarded_headers:
            headers.removeHeader(name)
        if not self.strip_credentials:
            return
        for method in self.methods:
            for name in method.credential_headers:
                headers.removeHeader(name)
            for name in method.credential_query_args:
                query_args.pop(name, None)
