"""
Tests for L{gateway.auth}: API keys, JWT verification (every algorithm, the
classic attacks, time from a L{Clock}), JWK Set fetching against a real local
HTTP server, and the combination into 401/403 outcomes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from gateway.auth import (
    ApiKeyAuthenticator,
    AuthResult,
    Authenticator,
    Consumer,
    Forbidden,
    InvalidCredentials,
    JwksSource,
    JwtVerifier,
    StaticKeys,
    Unauthorized,
    authorize,
    hash_api_key,
    key_from_config,
    key_from_jwk,
    parse_jwks,
    www_authenticate,
)

NOW = 1_000.0  # clock time of most tests: far in the wall clock's past
SECRET64 = b"k" * 64


# -- keys and tokens ---------------------------------------------------------


@pytest.fixture(scope="module")
def keys():
    """Private keys of every kind, generated once for the module."""
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p256b": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ed448": ed448.Ed448PrivateKey.generate(),
    }


def pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def token(alg, key, claims=None, headers=None, **extra) -> str:
    payload = {"sub": "alice", "exp": NOW + 600}
    payload.update(claims or {})
    payload.update(extra)
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_signed_hs256(secret: bytes, header: dict, claims: dict) -> str:
    """A HS256 token built by hand, with any secret (PyJWT refuses PEMs)."""
    signing_input = (
        b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def clock_at(seconds=NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def verifier(algorithms, key_texts, clock=None, **kwargs) -> JwtVerifier:
    return JwtVerifier(
        algorithms=algorithms,
        keys=StaticKeys(key_texts),
        clock=clock or clock_at(),
        **kwargs,
    )


def refused(description, call, *args):
    with pytest.raises(InvalidCredentials) as info:
        call(*args)
    assert info.value.description == description


# (algorithm, signing key name, verification key as configured)
ASYMMETRIC = [
    ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"),
    ("PS256", "rsa"), ("PS384", "rsa"), ("PS512", "rsa"),
    ("ES256", "p256"), ("ES384", "p384"), ("ES512", "p521"),
    ("EdDSA", "ed25519"), ("EdDSA", "ed448"),
]


# -- JWT: algorithms ---------------------------------------------------------


@pytest.mark.parametrize("alg,name", ASYMMETRIC)
def test_asymmetric_algorithms_verify_synchronously(keys, alg, name):
    v = verifier([alg], [pem(keys[name])])
    claims = v.verify(token(alg, keys[name]))
    assert not isinstance(claims, Deferred)
    assert claims["sub"] == "alice"


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_algorithms_verify(alg):
    v = verifier([alg], [SECRET64.decode()])
    assert v.verify(token(alg, SECRET64))["sub"] == "alice"


@pytest.mark.parametrize("alg,name", ASYMMETRIC)
def test_token_signed_by_another_key_is_refused(keys, alg, name):
    other_key = {
        "rsa": lambda: keys["rsa2"],
        "p256": lambda: keys["p256b"],
        "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "p521": lambda: ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
        "ed448": ed448.Ed448PrivateKey.generate,
    }[name]()
    v = verifier([alg], [pem(keys[name])])
    refused("signature verification failed", v.verify, token(alg, other_key))


def test_hmac_wrong_secret_refused():
    v = verifier(["HS256"], [SECRET64])
    refused("signature verification failed", v.verify, token("HS256", b"x" * 64))


def test_tampered_payload_and_signature_refused(keys):
    v = verifier(["ES256"], [pem(keys["p256"])])
    good = token("ES256", keys["p256"])
    head, payload, signature = good.split(".")
    forged_payload = b64(json.dumps({"sub": "mallory", "exp": NOW + 600}).encode())
    refused("signature verification failed", v.verify,
            ".".join([head, forged_payload, signature]))
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    refused("signature verification failed", v.verify,
            ".".join([head, payload, flipped]))
    assert v.verify(good)["sub"] == "alice"


def test_alg_none_refused():
    v = verifier(["HS256"], [SECRET64])
    unsigned = jwt.encode({"sub": "alice", "exp": NOW + 600}, None, algorithm="none")
    refused("algorithm not allowed", v.verify, unsigned)
    for spelling in ["None", "NONE", "nOnE"]:
        forged = b64(json.dumps({"alg": spelling}).encode()) + "." + \
            b64(json.dumps({"sub": "alice"}).encode()) + "."
        refused("algorithm not allowed", v.verify, forged)


def test_alg_none_cannot_be_configured():
    with pytest.raises(ValueError):
        verifier(["none"], [SECRET64])
    with pytest.raises(ValueError):
        verifier(["HS257"], [SECRET64])
    with pytest.raises(ValueError):
        verifier([], [SECRET64])


def test_algorithm_confusion_rsa_public_key_as_hmac_secret(keys):
    """
    The classic attack: the RSA public key (which the attacker knows) used
    as an HS256 secret. Even with HS256 on the allow-list, the RSA key is
    never offered to HMAC.
    """
    public_pem = pem(keys["rsa"])
    claims = {"sub": "mallory", "exp": NOW + 600}
    for secret in [public_pem, public_pem.strip()]:
        forged = hand_signed_hs256(secret, {"alg": "HS256", "typ": "JWT"}, claims)
        v = verifier(["RS256", "HS256"], [public_pem])
        refused("no key for this algorithm", v.verify, forged)
        v = verifier(["RS256"], [public_pem])
        refused("algorithm not allowed", v.verify, forged)


def test_algorithm_confusion_with_jwks_key(keys):
    jwk = RSAAlgorithm.to_jwk(keys["rsa"].public_key(), as_dict=True)
    jwk["kid"] = "a"
    v = JwtVerifier(["RS256", "HS256"], FakeSource(parse_jwks(jwks(jwk))), clock_at())
    forged = hand_signed_hs256(pem(keys["rsa"]), {"alg": "HS256", "kid": "a"},
                               {"sub": "mallory", "exp": NOW + 600})
    refused("no key for this algorithm", v.verify, forged)


def test_pem_looking_secret_must_parse():
    with pytest.raises(ValueError):
        key_from_config("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n" + "x" * 40)
    with pytest.raises(ValueError):
        key_from_config("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ" + "x" * 40)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_short_hmac_secret_refused_and_bound_by_length():
    with pytest.raises(ValueError):
        key_from_config(b"s" * 31)
    assert key_from_config(b"s" * 32).algorithms == {"HS256"}
    assert key_from_config(b"s" * 48).algorithms == {"HS256", "HS384"}
    v = verifier(["HS256", "HS512"], [b"s" * 32])
    assert v.verify(token("HS256", b"s" * 32))["sub"] == "alice"
    refused("no key for this algorithm", v.verify, token("HS512", b"s" * 32))


def test_small_rsa_key_refused():
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError):
        key_from_config(pem(small))


def test_allow_list_refuses_other_algorithms(keys):
    v = verifier(["ES256"], [pem(keys["p256"]), pem(keys["rsa"])])
    refused("algorithm not allowed", v.verify, token("RS256", keys["rsa"]))
    assert v.verify(token("ES256", keys["p256"]))["sub"] == "alice"


def test_certificate_and_private_key_pem_accepted(keys):
    private_pem = keys["p256"].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    v = verifier(["ES256"], [private_pem])
    assert v.verify(token("ES256", keys["p256"]))["sub"] == "alice"


def test_jwk_alg_binds_the_key(keys):
    jwk = RSAAlgorithm.to_jwk(keys["rsa"].public_key(), as_dict=True)
    jwk.update(kid="a", alg="RS256")
    v = JwtVerifier(["RS256", "PS256"], FakeSource(parse_jwks(jwks(jwk))), clock_at())
    assert v.verify(token("RS256", keys["rsa"], headers={"kid": "a"}))["sub"] == "alice"
    refused("no key for this algorithm", v.verify,
            token("PS256", keys["rsa"], headers={"kid": "a"}))


def test_jwk_refusals(keys):
    rsa_jwk = RSAAlgorithm.to_jwk(keys["rsa"].public_key(), as_dict=True)
    for bad in [
        {"kty": "oct", "k": b64(SECRET64)},
        dict(rsa_jwk, use="enc"),
        dict(rsa_jwk, key_ops=["encrypt"]),
        dict(rsa_jwk, alg="ES256"),
        dict(rsa_jwk, kid=7),
        {"kty": "RSA", "n": "AQAB"},
        {"kty": "XYZ"},
        "not an object",
    ]:
        with pytest.raises(ValueError):
            key_from_jwk(bad)
    ed = key_from_jwk(OKPAlgorithm.to_jwk(keys["ed25519"].public_key(), as_dict=True))
    assert ed.algorithms == {"EdDSA"}
    private = key_from_jwk(ECAlgorithm.to_jwk(keys["p384"], as_dict=True))
    assert isinstance(private.key, ec.EllipticCurvePublicKey)
    assert private.algorithms == {"ES384"}


def test_malformed_tokens_refused():
    v = verifier(["HS256"], [SECRET64])
    for bad in ["", "abc", "a.b.c", "a.b", b"\xff\xfe.x.y", "e30.e30.e30"]:
        with pytest.raises(InvalidCredentials):
            v.verify(bad)
    good = token("HS256", SECRET64)
    head, payload, signature = good.split(".")
    for bad in [good + ".x", head[:4] + "!" + head[4:] + "." + payload + "." + signature,
                hand_signed_hs256(SECRET64, {"alg": "HS256", "kid": 7}, {"exp": NOW + 9}),
                b64(b"[]") + "." + payload + "." + signature]:
        with pytest.raises(InvalidCredentials):
            v.verify(bad)
    assert v.verify(good)["sub"] == "alice"
    v = verifier(["HS256"], [SECRET64], max_token_length=50)
    refused("token too long", v.verify, token("HS256", SECRET64))


# -- JWT: claims and time ----------------------------------------------------


def test_expiry_follows_the_clock_not_the_wall_clock():
    clock = clock_at()
    v = verifier(["HS256"], [SECRET64], clock=clock, leeway=30)
    t = token("HS256", SECRET64, exp=NOW + 100)  # long past in wall-clock time
    assert v.verify(t)["sub"] == "alice"
    clock.advance(129)
    assert v.verify(t)["sub"] == "alice"  # within the leeway
    clock.advance(1)
    refused("token expired", v.verify, t)


def test_expiry_without_leeway():
    clock = clock_at()
    v = verifier(["HS256"], [SECRET64], clock=clock)
    t = token("HS256", SECRET64, exp=NOW + 10)
    clock.advance(9.5)
    assert v.verify(t)
    clock.advance(0.5)
    refused("token expired", v.verify, t)


def test_not_before_follows_the_clock():
    clock = clock_at()
    v = verifier(["HS256"], [SECRET64], clock=clock, leeway=5)
    t = token("HS256", SECRET64, nbf=NOW + 50)
    refused("token not yet valid", v.verify, t)
    clock.advance(44)
    refused("token not yet valid", v.verify, t)
    clock.advance(1)
    assert v.verify(t)["sub"] == "alice"


def test_issued_in_the_future_refused():
    clock = clock_at()
    v = verifier(["HS256"], [SECRET64], clock=clock)
    t = token("HS256", SECRET64, iat=NOW + 60)
    refused("token issued in the future", v.verify, t)
    clock.advance(60)
    assert v.verify(t)


def test_exp_required_unless_configured_otherwise():
    t = jwt.encode({"sub": "alice"}, SECRET64, algorithm="HS256")
    refused("missing claim exp", verifier(["HS256"], [SECRET64]).verify, t)
    assert verifier(["HS256"], [SECRET64], require_exp=False).verify(t)["sub"] == "alice"


def test_time_claims_must_be_numbers():
    v = verifier(["HS256"], [SECRET64])
    refused("invalid claim exp", v.verify, token("HS256", SECRET64, exp="tomorrow"))
    refused("invalid claim exp", v.verify, token("HS256", SECRET64, exp=True))
    refused("invalid claim nbf", v.verify, token("HS256", SECRET64, nbf="now"))


def test_issuer_and_audience():
    v = verifier(["HS256"], [SECRET64], issuer="https://id.example.com/",
                 audience="orders-api")
    good = {"iss": "https://id.example.com/", "aud": "orders-api"}
    assert v.verify(token("HS256", SECRET64, good))
    assert v.verify(token("HS256", SECRET64, good, aud=["other", "orders-api"]))
    refused("invalid issuer", v.verify,
            token("HS256", SECRET64, good, iss="https://evil.example.com/"))
    refused("invalid audience", v.verify, token("HS256", SECRET64, good, aud="other"))
    refused("missing claim iss", v.verify, token("HS256", SECRET64, {"aud": "orders-api"}))
    refused("missing claim aud", v.verify,
            token("HS256", SECRET64, {"iss": "https://id.example.com/"}))


def test_audience_not_checked_when_not_configured():
    v = verifier(["HS256"], [SECRET64])
    assert v.verify(token("HS256", SECRET64, aud="anything"))["sub"] == "alice"


# -- API keys ----------------------------------------------------------------


def api_keys(**kwargs) -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator(
        [
            Consumer("mobile-app", [hash_api_key("mobile-secret")]),
            Consumer("dev", ["plain-dev-key"]),
            Consumer("upper", ["sha256:" + hashlib.sha256(b"up").hexdigest().upper()]),
        ],
        **kwargs,
    )


def test_hash_api_key():
    assert hash_api_key("test") == "sha256:" + hashlib.sha256(b"test").hexdigest()


def test_api_key_stored_forms():
    a = api_keys()
    found = a.authenticate(Headers({b"X-API-Key": [b"mobile-secret"]}), {})
    assert found == AuthResult(method="api_key", consumer="mobile-app")
    found = a.authenticate(Headers({b"x-api-key": [b"plain-dev-key"]}), {})
    assert found.consumer == "dev"
    assert a.authenticate(Headers({b"X-API-Key": [b"up"]}), {}).consumer == "upper"


def test_api_key_query_and_header_precedence():
    a = api_keys()
    assert a.authenticate(Headers(), {b"api_key": [b"plain-dev-key"]}).consumer == "dev"
    both = a.authenticate(Headers({b"X-API-Key": [b"mobile-secret"]}),
                          {b"api_key": [b"plain-dev-key"]})
    assert both.consumer == "mobile-app"
    assert a.authenticate(Headers(), {}) is None
    custom = api_keys(header="Api-Token", query=None)
    assert custom.authenticate(Headers(), {b"api_key": [b"plain-dev-key"]}) is None
    assert custom.authenticate(Headers({b"api-token": [b"plain-dev-key"]}), {}).consumer == "dev"


def test_api_key_refusals():
    a = api_keys()
    refused("unknown API key", a.authenticate, Headers({b"X-API-Key": [b"guess"]}), {})
    # The stored digest itself is not a key.
    stored = hash_api_key("mobile-secret").encode()
    refused("unknown API key", a.authenticate, Headers({b"X-API-Key": [stored]}), {})
    refused("unknown API key", a.authenticate,
            Headers({b"X-API-Key": [b"mobile-secret "]}), {})
    refused("empty API key", a.authenticate, Headers({b"X-API-Key": [b""]}), {})
    refused("more than one API key", a.authenticate,
            Headers({b"X-API-Key": [b"mobile-secret", b"plain-dev-key"]}), {})
    refused("more than one API key", a.authenticate, Headers(),
            {b"api_key": [b"plain-dev-key", b"plain-dev-key"]})


def test_api_key_compared_in_constant_time(monkeypatch):
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("gateway.auth.hmac.compare_digest", spy)
    api_keys().authenticate(Headers({b"X-API-Key": [b"plain-dev-key"]}), {})
    digest = hashlib.sha256(b"plain-dev-key").digest()
    assert seen == [(digest, digest)]


class _CountingSha256:
    """C{gateway.auth.hashlib} for a test: counts what C{sha256} hashes."""

    def __init__(self):
        self.hashed = []

    def sha256(self, data=b""):
        self.hashed.append(data)
        return hashlib.sha256(data)


def test_api_key_valid_key_hashed_once(monkeypatch):
    a = api_keys()
    counting = _CountingSha256()
    monkeypatch.setattr("gateway.auth.hashlib", counting)
    results = [a.authenticate(Headers({b"X-API-Key": [b"mobile-secret"]}), {})
               for _ in range(3)]
    assert results == [AuthResult(method="api_key", consumer="mobile-app")] * 3
    assert counting.hashed == [b"mobile-secret"]
    # Another key, and the first again through the query string.
    assert a.authenticate(Headers(), {b"api_key": [b"plain-dev-key"]}).consumer == "dev"
    assert a.authenticate(Headers(), {b"api_key": [b"mobile-secret"]}).consumer == "mobile-app"
    assert counting.hashed == [b"mobile-secret", b"plain-dev-key"]


def test_api_key_refused_keys_not_remembered(monkeypatch):
    a = api_keys()
    counting = _CountingSha256()
    monkeypatch.setattr("gateway.auth.hashlib", counting)
    for _ in range(2):
        refused("unknown API key", a.authenticate, Headers({b"X-API-Key": [b"guess"]}), {})
    # Refused each time after hashing it each time: nothing was remembered.
    assert counting.hashed == [b"guess", b"guess"]
    assert a._known == {}


def test_api_key_remembered_keys_bounded(monkeypatch):
    monkeypatch.setattr("gateway.auth.KNOWN_KEYS_MAX", 2)
    a = api_keys()
    for key, consumer in [(b"mobile-secret", "mobile-app"), (b"plain-dev-key", "dev"),
                          (b"up", "upper"), (b"mobile-secret", "mobile-app")]:
        assert a.authenticate(Headers({b"X-API-Key": [key]}), {}).consumer == consumer
        assert len(a._known) <= 2
    assert b"mobile-secret" in a._known


def test_api_key_configuration_errors():
    with pytest.raises(ValueError):
        ApiKeyAuthenticator([Consumer("a", ["sha256:abc"])])
    with pytest.raises(ValueError):
        ApiKeyAuthenticator([Consumer("a", [""])])
    with pytest.raises(ValueError):  # same key, plain and hashed, two consumers
        ApiKeyAuthenticator([Consumer("a", ["k"]), Consumer("b", [hash_api_key("k")])])
    with pytest.raises(ValueError):
        ApiKeyAuthenticator([], header="Bad Header")


# -- verified tokens remembered -------------------------------------------------


def _counting_decode(v: JwtVerifier) -> list:
    """Count the signature verifications of C{v} (its PyJWT decodes)."""
    calls = []
    real = v._jwt.decode

    def decode(token, *args, **kwargs):
        calls.append(token)
        return real(token, *args, **kwargs)

    v._jwt.decode = decode
    return calls


def test_verified_token_verified_once():
    v = verifier(["HS256"], [SECRET64])
    calls = _counting_decode(v)
    t = token("HS256", SECRET64)
    for _ in range(3):
        assert v.verify(t)["sub"] == "alice"
    assert v.verify(t.encode())["sub"] == "alice"
    assert calls == [t]
    other = token("HS256", SECRET64, sub="bob")
    assert v.verify(other)["sub"] == "bob"
    assert calls == [t, other]


def test_remembered_token_expires():
    """The time claims of a remembered token are checked on every request."""
    clock = clock_at()
    v = verifier(["HS256"], [SECRET64], clock=clock)
    calls = _counting_decode(v)
    t = token("HS256", SECRET64, exp=NOW + 10)
    assert v.verify(t)["sub"] == "alice"
    clock.advance(10)
    refused("token expired", v.verify, t)
    assert t not in v._verified
    refused("token expired", v.verify, t)  # checked again, and refused again
    assert len(calls) == 2


def test_refused_tokens_not_remembered():
    v = verifier(["HS256"], [SECRET64])
    calls = _counting_decode(v)
    forged = token("HS256", b"w" * 64)
    for _ in range(2):
        refused("signature verification failed", v.verify, forged)
    assert calls == [forged, forged]
    assert v._verified == {}


class _SwappableKeys:
    """A key source whose key set the test replaces (a JWK Set fetched)."""

    def __init__(self, key_texts):
        self.keyset = StaticKeys(key_texts).current()

    def current(self):
        return self.keyset

    def refetch(self, kid):
        return None


def test_remembered_token_verified_again_with_new_keys():
    """
    A token remembered under one key set is verified again under the next:
    refused if its key is gone, accepted (once more) if it is still there.
    """
    keys = _SwappableKeys([SECRET64])
    v = JwtVerifier(algorithms=["HS256"], keys=keys, clock=clock_at())
    calls = _counting_decode(v)
    t = token("HS256", SECRET64)
    v.verify(t)
    v.verify(t)
    keys.keyset = StaticKeys([SECRET64]).current()  # the same key, fetched again
    v.verify(t)
    v.verify(t)
    assert len(calls) == 2
    keys.keyset = StaticKeys([b"n" * 64]).current()  # rotated away
    refused("signature verification failed", v.verify, t)


def test_remembered_tokens_bounded_oldest_forgotten(monkeypatch):
    monkeypatch.setattr("gateway.auth.VERIFIED_TOKENS_MAX", 2)
    v = verifier(["HS256"], [SECRET64])
    tokens = {name: token("HS256", SECRET64, sub=name) for name in "abc"}
    for name in "abc":
        assert v.verify(tokens[name])["sub"] == name
        assert len(v._verified) <= 2
    assert set(v._verified) == {tokens["b"], tokens["c"]}


def test_only_strict_compact_tokens_remembered():
    """
    PyJWT also accepts variants of a token that the compact form does not
    allow (here, padding after the signature): they are verified each
    time, never remembered, so one valid token cannot take the places of
    others.
    """
    v = verifier(["HS256"], [SECRET64])
    t = token("HS256", SECRET64)
    variant = t + "="
    assert v.verify(variant)["sub"] == "alice"
    assert v._verified == {}
    v.verify(t)
    assert list(v._verified) == [t]


def test_remembered_claims_are_not_shared():
    v = verifier(["HS256"], [SECRET64])
    t = token("HS256", SECRET64)
    v.verify(t)["sub"] = "mallory"
    first_hit = v.verify(t)
    first_hit["sub"] = "mallory"
    assert v.verify(t)["sub"] == "alice"


# -- the combination -----------------------------------------------------------


def bearer(t) -> Headers:
    return Headers({b"Authorization": [b"Bearer " + (t.encode() if isinstance(t, str) else t)]})


def combined(**kwargs) -> Authenticator:
    return Authenticator(
        [api_keys(), verifier(["HS256"], [SECRET64], forward_claims={"sub": "X-Consumer-ID"})],
        **kwargs,
    )


def unauthorized(call, *args) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        call(*args)
    return info.value


def test_www_authenticate_values():
    assert www_authenticate() == b'Bearer realm="txgateway"'
    assert www_authenticate("api", None, "ignored") == b'Bearer realm="api"'
    assert www_authenticate("txgateway", "invalid_token", 'bad "x"\\\r\n\xe9') == (
        b'Bearer realm="txgateway", error="invalid_token", '
        b'error_description="bad ?x?????"'
    )


def test_missing_credentials_challenge_has_no_error():
    a = combined()
    e = unauthorized(a.authenticate, Headers(), {})
    assert e.www_authenticate == b'Bearer realm="txgateway"'
    assert e.reason == "no credentials"
    # Another scheme is not a bearer token: still "missing".
    e = unauthorized(a.authenticate, Headers({b"Authorization": [b"Basic dXNlcjpwYXNz"]}), {})
    assert e.www_authenticate == b'Bearer realm="txgateway"'


def test_refused_credentials_challenge_says_why():
    clock = clock_at()
    a = Authenticator([verifier(["HS256"], [SECRET64], clock=clock)], realm="orders")
    t = token("HS256", SECRET64, exp=NOW + 1)
    assert a.authenticate(bearer(t), {}).consumer == "alice"
    clock.advance(1)
    e = unauthorized(a.authenticate, bearer(t), {})
    assert e.www_authenticate == (
        b'Bearer realm="orders", error="invalid_token", error_description="token expired"'
    )
    assert e.reason == "token expired"
    e = unauthorized(a.authenticate, bearer(b""), {})
    assert b'error="invalid_token"' in e.www_authenticate


def test_either_method_suffices():
    a = combined()
    good_jwt = token("HS256", SECRET64)
    result = a.authenticate(
        Headers({b"X-API-Key": [b"wrong"], b"Authorization": [b"Bearer " + good_jwt.encode()]}), {}
    )
    assert (result.method, result.consumer) == ("jwt", "alice")
    assert result.upstream_headers == ((b"X-Consumer-ID", b"alice"),)
    result = a.authenticate(
        Headers({b"X-API-Key": [b"mobile-secret"], b"Authorization": [b"Bearer junk"]}), {}
    )
    assert (result.method, result.consumer) == ("api_key", "mobile-app")
    e = unauthorized(a.authenticate,
                     Headers({b"X-API-Key": [b"wrong"], b"Authorization": [b"Bearer junk"]}), {})
    assert e.reason == "unknown API key"


def test_forward_claims_only_safe_scalars():
    v = verifier(["HS256"], [SECRET64],
                 forward_claims={"sub": "X-Consumer-ID", "tier": "X-Tier", "roles": "X-Roles"})
    a = Authenticator([v])
    r = a.authenticate(bearer(token("HS256", SECRET64, sub="a\r\nX-Admin: 1", tier=3,
                                    roles=["admin"])), {})
    assert r.upstream_headers == ((b"X-Tier", b"3"),)
    assert r.claims["roles"] == ["admin"]
    with pytest.raises(TypeError):
        r.claims["sub"] = "mallory"


def test_strip_credentials_and_forged_identity_headers():
    a = combined()
    headers = Headers({
        b"Authorization": [b"Bearer x"], b"X-API-Key": [b"k"],
        b"X-Consumer-ID": [b"forged"], b"Accept": [b"*/*"],
    })
    args = {b"api_key": [b"k"], b"page": [b"2"]}
    a.strip(headers, args)
    assert list(headers.getAllRawHeaders()) == [(b"Accept", [b"*/*"])]
    assert args == {b"page": [b"2"]}

    keep = combined(strip_credentials=False)
    headers = Headers({b"Authorization": [b"Bearer x"], b"X-Consumer-ID": [b"forged"]})
    args = {b"api_key": [b"k"]}
    keep.strip(headers, args)
    assert headers.getRawHeaders(b"Authorization") == [b"Bearer x"]
    assert not headers.hasHeader(b"X-Consumer-ID")
    assert args == {b"api_key": [b"k"]}


def test_authorize_allowed_consumers():
    alice = AuthResult(method="jwt", consumer="alice")
    authorize(alice, None)
    authorize(alice, ["bob", "alice"])
    with pytest.raises(Forbidden):
        authorize(alice, ["bob"])
    with pytest.raises(Forbidden):
        authorize(AuthResult(method="jwt", consumer=None), ["bob"])
    with pytest.raises(Forbidden):
        authorize(alice, [])


def test_authenticator_configuration_errors():
    with pytest.raises(ValueError):
        Authenticator([])
    with pytest.raises(ValueError):
        Authenticator([api_keys()], realm='a"b')


# -- unknown kid: the asynchronous path, with a controllable source -----------


class FakeSource:
    """A key source whose early refetch the test completes by hand."""

    def __init__(self, keyset, allow_refetch=True):
        self.keyset = keyset
        self.allow_refetch = allow_refetch
        self.refetches = []

    def current(self):
        return self.keyset

    def refetch(self, kid):
        if not self.allow_refetch:
            return None
        d = Deferred()
        self.refetches.append((kid, d))
        return d


def jwks(*jwk_dicts) -> bytes:
    return json.dumps({"keys": list(jwk_dicts)}).encode()


def jwk_of(private_key, kid, **extra):
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        d = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        d = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        d = OKPAlgorithm.to_jwk(public, as_dict=True)
    d.update(kid=kid, **extra)
    return d


def test_unknown_kid_waits_for_refetch(keys):
    source = FakeSource(parse_jwks(jwks(jwk_of(keys["rsa"], "a"))))
    v = JwtVerifier(["RS256", "ES256"], source, clock_at())
    a = Authenticator([v])
    known = a.authenticate(bearer(token("RS256", keys["rsa"], headers={"kid": "a"})), {})
    assert known.consumer == "alice" and source.refetches == []

    d = a.authenticate(bearer(token("ES256", keys["p256"], headers={"kid": "b"})), {})
    assert isinstance(d, Deferred) and not d.called
    [(kid, refetch)] = source.refetches
    assert kid == "b"
    source.keyset = parse_jwks(jwks(jwk_of(keys["p256"], "b")))
    refetch.callback(source.keyset)
    assert d.result.consumer == "alice"


def test_unknown_kid_still_unknown_after_refetch_falls_through(keys):
    source = FakeSource(parse_jwks(jwks(jwk_of(keys["rsa"], "a"))))
    a = Authenticator([JwtVerifier(["ES256"], source, clock_at()), api_keys()])
    headers = bearer(token("ES256", keys["p256"], headers={"kid": "zzz"}))
    d = a.authenticate(headers, {})
    source.refetches[0][1].callback(source.keyset)
    failure = []
    d.addErrback(failure.append)
    assert failure[0].check(Unauthorized)
    assert failure[0].value.reason == "unknown key id"

    # The next method still gets its turn after the asynchronous refusal.
    headers.setRawHeaders(b"X-API-Key", [b"plain-dev-key"])
    d = a.authenticate(headers, {})
    source.refetches[1][1].callback(source.keyset)
    assert d.result.consumer == "dev"


def test_unknown_kid_refused_when_refetch_not_allowed(keys):
    source = FakeSource(parse_jwks(jwks(jwk_of(keys["rsa"], "a"))), allow_refetch=False)
    v = JwtVerifier(["RS256"], source, clock_at())
    refused("unknown key id", v.verify, token("RS256", keys["rsa"], headers={"kid": "b"}))


def test_jwks_without_kid_in_token_tries_matching_keys(keys):
    source = FakeSource(parse_jwks(jwks(jwk_of(keys["rsa2"], "x"), jwk_of(keys["rsa"], "y"))))
    v = JwtVerifier(["RS256"], source, clock_at())
    assert v.verify(token("RS256", keys["rsa"]))["sub"] == "alice"
    assert source.refetches == []


def test_static_keys_ignore_kid(keys):
    v = verifier(["RS256"], [pem(keys["rsa"])])
    assert v.verify(token("RS256", keys["rsa"], headers={"kid": "whatever"}))["sub"] == "alice"


def test_parse_jwks_errors(keys):
    from gateway.auth import JwksError
    for body in [b"nope", b"[]", b'{"keys": {}}', jwks({"kty": "oct", "k": "AAAA"})]:
        with pytest.raises(JwksError):
            parse_jwks(body)
    mixed = parse_jwks(jwks({"kty": "oct", "k": "AAAA"}, jwk_of(keys["p256"], "b")))
    assert [k.kid for k in mixed.keys] == ["b"]


# -- JWK Set over HTTP: a real server on 127.0.0.1 ------------------------------


class JwksResource(Resource):
    isLeaf = True

    def __init__(self, body):
        super().__init__()
        self.body = body
        self.code = 200
        self.hang = False
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


class Server:
    def __init__(self, resource):
        self.resource = resource
        self.site = Site(resource, timeout=None)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = "http://127.0.0.1:%d/.well-known/jwks.json" % (self.port.getHost().port,)

    @inlineCallbacks
    def stop(self):
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()


def http_client():
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def bounded(d, seconds=5.0):
    """Fail, rather than hang, if C{d} has not fired within real seconds."""
    return d.addTimeout(seconds, reactor)


@inlineCallbacks
def wait_until(predicate, seconds=5.0):
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached in %s s" % (seconds,))


@inlineCallbacks
def settle(baseline):
    """Wait (bounded) for the reactor's delayed calls to return to baseline."""
    for _ in range(200):
        if set(reactor.getDelayedCalls()) <= baseline:
            break
        yield deferLater(reactor, 0.01, lambda: None)
    assert set(reactor.getDelayedCalls()) <= baseline


@pytest_twisted.inlineCallbacks
def test_jwks_rotation_refetch_and_rate_limit(keys):
    baseline = set(reactor.getDelayedCalls())
    resource = JwksResource(jwks(jwk_of(keys["rsa"], "a")))
    server = Server(resource)
    clock = Clock()
    source = JwksSource(server.url, clock, http_client(),
                        refresh_interval=300, min_refetch_interval=10)
    auth = Authenticator([JwtVerifier(["RS256", "ES256", "EdDSA"], source, clock, require_exp=False)])
    token_a = token("RS256", keys["rsa"], headers={"kid": "a"}, exp=None)
    token_b = token("ES256", keys["p256"], headers={"kid": "b"}, exp=None)
    token_c = token("EdDSA", keys["ed25519"], headers={"kid": "c"}, exp=None)
    try:
        # Before the first fetch completes, a token waits for it.
        source.start()
        early = auth.authenticate(bearer(token_a), {})
        assert isinstance(early, Deferred)
        assert (yield bounded(early)).consumer == "alice"
        assert resource.requests == 1
        assert source.last_success == 0

        # Known kid: synchronous, no fetch.
        assert auth.authenticate(bearer(token_a), {}).consumer == "alice"

        # The provider rotates to key b.
        resource.body = jwks(jwk_of(keys["p256"], "b"))
        clock.advance(5)
        # Within 10 s of the last fetch: no refetch, refused at once.
        e = unauthorized(auth.authenticate, bearer(token_b), {})
        assert e.reason == "unknown key id"
        assert resource.requests == 1

        clock.advance(5)
        d1 = auth.authenticate(bearer(token_b), {})
        d2 = auth.authenticate(bearer(token_b), {})  # joins the same fetch
        assert isinstance(d1, Deferred) and isinstance(d2, Deferred)
        assert (yield bounded(d1)).consumer == "alice"
        assert (yield bounded(d2)).consumer == "alice"
        assert resource.requests == 2
        # Now b is known and synchronous; a is gone with the rotation.
        assert auth.authenticate(bearer(token_b), {}).method == "jwt"

        # Another unknown kid right after: the rate limit holds.
        resource.body = jwks(jwk_of(keys["p256"], "b"), jwk_of(keys["ed25519"], "c"))
        for t in (token_c, token_a):
            e = unauthorized(auth.authenticate, bearer(t), {})
            assert e.reason == "unknown key id"
        assert resource.requests == 2

        clock.advance(9.9)
        unauthorized(auth.authenticate, bearer(token_c), {})
        assert resource.requests == 2
        clock.advance(0.1)
        assert (yield bounded(auth.authenticate(bearer(token_c), {}))).consumer == "alice"
        assert resource.requests == 3

        # The schedule: t=0 fetched; the next scheduled fetch is at t=300.
        clock.advance(279.9)
        assert resource.requests == 3
        clock.advance(0.1)
        yield bounded(source.refresh())  # joins the scheduled fetch
        assert resource.requests == 4
    finally:
        source.stop()
        yield server.stop()
    assert clock.getDelayedCalls() == []
    yield settle(baseline)


@pytest_twisted.inlineCallbacks
def test_jwks_failure_keeps_last_good_set(keys):
    baseline = set(reactor.getDelayedCalls())
    resource = JwksResource(jwks(jwk_of(keys["p256"], "a")))
    server = Server(resource)
    clock = Clock()
    source = JwksSource(server.url, clock, http_client(), refresh_interval=60)
    verifier_ = JwtVerifier(["ES256"], source, clock, require_exp=False)
    good = token("ES256", keys["p256"], headers={"kid": "a"}, exp=None)
    try:
        source.start()
        yield bounded(source.refresh())
        assert source.failures == 0 and len(source.current().keys) == 1
        good_set = source.current()

        breakages = [
            lambda: setattr(resource, "code", 500),
            lambda: (setattr(resource, "code", 200), setattr(resource, "body", b"<html>")),
            lambda: setattr(resource, "body", jwks({"kty": "oct", "k": "AAAA"},
                                                   jwk_of(keys["p256b"], "z", use="enc"))),
            # A valid JWK Set, but over the size limit.
            lambda: setattr(resource, "body", jwks(jwk_of(keys["p256b"], "z"))
                            + b" " * source.max_size),
        ]
        for count, breakage in enumerate(breakages, start=1):
            breakage()
            clock.advance(60)
            yield bounded(source.refresh())
            assert source.failures == count
            assert source.current() is good_set
            assert verifier_.verify(good)["sub"] == "alice"

        # The provider is down altogether.
        yield server.stop()
        clock.advance(60)
        yield bounded(source.refresh())
        assert source.failures == len(breakages) + 1
        assert verifier_.verify(good)["sub"] == "alice"
        assert source.fetches == len(breakages) + 2
    finally:
        source.stop()
        yield server.stop()
    assert clock.getDelayedCalls() == []
    yield settle(baseline)


@pytest_twisted.inlineCallbacks
def test_jwks_fetch_timeout_and_stop_cancel(keys):
    baseline = set(reactor.getDelayedCalls())
    resource = JwksResource(jwks(jwk_of(keys["p256"], "a")))
    server = Server(resource)
    clock = Clock()
    source = JwksSource(server.url, clock, http_client(), refresh_interval=60, timeout=5)
    try:
        source.start()
        yield bounded(source.refresh())
        resource.hang = True
        clock.advance(60)
        waiting = source.refresh()
        yield wait_until(lambda: resource.requests == 2)  # reached the server
        assert not waiting.called
        clock.advance(5)
        keyset = yield bounded(waiting)
        assert source.failures == 1 and len(keyset.keys) == 1

        # stop() while a fetch hangs cancels it: nothing is left scheduled.
        clock.advance(55)
        waiting = source.refresh()
        yield wait_until(lambda: resource.requests == 3)
        source.stop()
        yield bounded(waiting)
        assert clock.getDelayedCalls() == []
        # A stopped source never refetches.
        assert source.refetch("new") is None
    finally:
        source.stop()
        yield server.stop()
    yield settle(baseline)


def test_jwks_source_create_uses_the_reactor():
    source = JwksSource.create("https://id.example.com/jwks.json", reactor)
    assert source.clock is reactor and not source.running
    assert source.refetch("x") is None
    for bad in [dict(refresh_interval=0), dict(timeout=-1), dict(min_refetch_interval=-1)]:
        with pytest.raises(ValueError):
            JwksSource("https://id.example.com/jwks.json", Clock(), None, **bad)


class BrokenClient:
    def get(self, url, **kwargs):
        raise ValueError("bad URL")


def test_jwks_synchronous_client_error_keeps_the_schedule():
    clock = Clock()
    source = JwksSource("https://id.example.com/jwks.json", clock, BrokenClient(),
                        refresh_interval=60)
    source.start()
    assert source.failures == 1 and source.fetches == 1
    clock.advance(60)
    assert source.failures == 2
    fired = []
    source.refresh().addCallback(fired.append)
    assert fired == [source.current()]
    source.stop()
    assert clock.getDelayedCalls() == []
