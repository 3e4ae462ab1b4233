"""
Authentication through the resource tree: API keys and JWTs of every
configured algorithm (time from the gateway's clock), 401 challenges, 403,
what is forwarded, JWK Sets fetched through an in-memory client, and the
config's file:line errors.
"""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from treq.testing import StubTreq
from twisted.web.resource import Resource

from gateway.auth import hash_api_key
from gateway.config import ConfigError, parse_config
from gateway.filters.auth import AuthFilter, without_query_args
from tests.stubgateway import BASE, StubGateway

NOW = 1_000_000.0
HS_SECRET = "s" * 64


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def pem(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def token(alg, key, kid=None, **claims) -> str:
    payload = {"sub": "alice", "exp": NOW + 600, "iss": "https://id.test/", "aud": "orders"}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def bearer(t: str) -> dict:
    return {"Authorization": f"Bearer {t}"}


CONSUMERS = f"""
consumers:
  - name: mobile-app
    api_keys: ["{hash_api_key('mobile-secret')}"]
  - name: dev
    api_keys: [dev-plain-key]
"""


def config(keys, route_auth: str = "") -> str:
    jwt_keys = [HS_SECRET, pem(keys["rsa"]), pem(keys["p256"]), pem(keys["ed25519"])]
    return BASE + CONSUMERS + f"""
auth:
  methods: [api_key, jwt]
  api_key: {{header: X-API-Key, query: api_key}}
  jwt:
    algorithms: [HS256, HS384, HS512, RS256, PS256, ES256, EdDSA]
    keys: {json.dumps(jwt_keys)}
    issuer: https://id.test/
    audience: orders
    leeway: 30s
    forward_claims: {{sub: X-Consumer-ID}}
routes:
  - {{name: r, service: svc, match: {{path_prefix: /r}}}}
  - {{name: mobile-only, service: svc, match: {{path_prefix: /m}}, auth: {{methods: [api_key], allowed_consumers: [mobile-app]}}}}
  - {{name: keep, service: svc, match: {{path_prefix: /keep}}, auth: {{methods: [api_key], strip_credentials: false}}}}
  - {{name: public, service: svc, match: {{path_prefix: /public}}, auth: false}}
{route_auth}
"""


def stub(keys, route_auth: str = "") -> StubGateway:
    gw = StubGateway(config(keys, route_auth))
    gw.reactor.advance(NOW)
    return gw


# -- API keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, path, consumer",
    [
        ({"X-API-Key": "mobile-secret"}, "/r/x", "mobile-app"),  # stored hashed
        ({"X-API-Key": "dev-plain-key"}, "/r/x", "dev"),  # stored plain
        ({}, "/r/x?api_key=dev-plain-key&b=2", "dev"),  # in the query
    ],
)
def test_api_keys_identify_the_consumer_and_are_not_forwarded(keys, headers, path, consumer):
    gw = stub(keys)
    r = gw.request("GET", path, headers=headers)
    assert r.code == 200
    assert gw.contexts[-1].consumer == consumer
    assert r.upstream_header("X-API-Key") == []
    assert "api_key" not in r.json()["uri"]
    if "?" in path:
        assert r.json()["uri"] == "/r/x?b=2"


def test_missing_credentials_get_401_with_a_bare_challenge(keys):
    gw = stub(keys)
    r = gw.request("GET", "/r/x")
    assert r.code == 401
    assert r.header("WWW-Authenticate") == 'Bearer realm="txgateway"'
    assert r.json() == {"error": "authentication required", "request_id": r.header("X-Request-Id")}
    assert gw.backend.requests == []


def test_bad_api_key_gets_401_invalid_token(keys):
    gw = stub(keys)
    r = gw.request("GET", "/r/x", headers={"X-API-Key": "guess"})
    assert r.code == 401
    assert r.header("WWW-Authenticate") == (
        'Bearer realm="txgateway", error="invalid_token", error_description="unknown API key"'
    )
    assert r.json()["error"] == "invalid credentials: unknown API key"


def test_api_key_removed_by_a_reload_is_refused(keys):
    """
    A key used before (and so remembered by the authenticator) stops
    working at the reload that removes it from the configuration, while
    the consumer's other key keeps working.
    """
    two_keys = config(keys).replace("api_keys: [dev-plain-key]",
                                    "api_keys: [dev-plain-key, dev-second-key]")
    gw = StubGateway(two_keys)
    gw.reactor.advance(NOW)
    for _ in range(2):
        assert gw.request("GET", "/r/x", headers={"X-API-Key": "dev-plain-key"}).code == 200
    assert gw.request("GET", "/r/x", headers={"X-API-Key": "dev-second-key"}).code == 200
    gw.reload(config(keys))
    r = gw.request("GET", "/r/x", headers={"X-API-Key": "dev-second-key"})
    assert r.code == 401
    assert gw.request("GET", "/r/x", headers={"X-API-Key": "dev-plain-key"}).code == 200


def test_valid_but_not_allowed_consumer_gets_403(keys):
    gw = stub(keys)
    assert gw.request("GET", "/m/x", headers={"X-API-Key": "mobile-secret"}).code == 200
    r = gw.request("GET", "/m/x", headers={"X-API-Key": "dev-plain-key"})
    assert r.code == 403 and r.json()["error"] == "forbidden"
    assert gw.contexts[-1].consumer == "dev"
    assert len(gw.backend.requests) == 1


def test_keys_are_looked_for_in_the_query_not_in_form_bodies(keys):
    gw = stub(keys)
    r = gw.request(
        "POST", "/r/x", body=b"api_key=dev-plain-key",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.code == 401


def test_strip_credentials_false_forwards_the_key(keys):
    gw = stub(keys)
    r = gw.request("GET", "/keep/x", headers={"X-API-Key": "dev-plain-key"})
    assert r.upstream_header("X-API-Key") == ["dev-plain-key"]


def test_public_route_opts_out(keys):
    assert stub(keys).request("GET", "/public/x").code == 200


def test_without_query_args_keeps_the_others_as_sent():
    names = frozenset([b"api_key"])
    assert without_query_args(b"?a=1&api_key=k&b=%20x", names) == b"?a=1&b=%20x"
    assert without_query_args(b"?api%5Fkey=k", names) == b""
    assert without_query_args(b"?api_key", names) == b""
    assert without_query_args(b"", names) == b""


# -- JWT -----------------------------------------------------------------------


def signing_key(keys, alg):
    return {
        "HS256": HS_SECRET, "HS384": HS_SECRET, "HS512": HS_SECRET,
        "RS256": keys["rsa"], "PS256": keys["rsa"], "ES256": keys["p256"], "EdDSA": keys["ed25519"],
    }[alg]


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "RS256", "PS256", "ES256", "EdDSA"])
def test_each_algorithm_accepted_and_claims_forwarded(keys, alg):
    gw = stub(keys)
    r = gw.request("GET", "/r/x", headers={**bearer(token(alg, signing_key(keys, alg))), "X-Consumer-ID": "forged"})
    assert r.code == 200, r.body
    assert gw.contexts[-1].consumer == "alice"
    assert r.upstream_header("X-Consumer-ID") == ["alice"]
    assert r.upstream_header("Authorization") == []


def test_hand_signed_hs256(keys):
    # A token PyJWT did not make for us: the gateway does not depend on how it was built.
    import base64, hashlib, hmac

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "bob", "exp": NOW + 60, "iss": "https://id.test/", "aud": "orders"}).encode())
    sig = b64(hmac.new(HS_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    gw = stub(keys)
    assert gw.request("GET", "/r/x", headers=bearer(f"{head}.{body}.{sig}")).code == 200


def refused(gw, t, description):
    r = gw.request("GET", "/r/x", headers=bearer(t))
    assert r.code == 401, r.body
    assert f'error_description="{description}"' in r.header("WWW-Authenticate")
    return r


@pytest.mark.parametrize(
    "make, description",
    [
        (lambda k: token("RS256", k["rsa2"]), "signature verification failed"),
        (lambda k: token("ES256", k["p256"], exp=NOW - 31), "token expired"),
        (lambda k: token("ES256", k["p256"], nbf=NOW + 31), "token not yet valid"),
        (lambda k: token("ES256", k["p256"], iss="https://evil.test/"), "invalid issuer"),
        (lambda k: token("ES256", k["p256"], aud="billing"), "invalid audience"),
        (lambda k: token("RS384", k["rsa"]), "algorithm not allowed"),
        (lambda k: jwt.encode({"sub": "x", "exp": NOW + 60}, None, algorithm="none"), "algorithm not allowed"),
        (lambda k: "not.a.token", "malformed token"),
    ],
)
def test_bad_tokens_refused(keys, make, description):
    refused(stub(keys), make(keys), description)


def test_leeway_admits_slightly_expired_tokens(keys):
    gw = stub(keys)
    assert gw.request("GET", "/r/x", headers=bearer(token("ES256", keys["p256"], exp=NOW - 29))).code == 200


def test_tampered_token_refused(keys):
    t = token("RS256", keys["rsa"])
    head, body, sig = t.split(".")
    other = token("RS256", keys["rsa"], sub="mallory").split(".")[1]
    refused(stub(keys), f"{head}.{other}.{sig}", "signature verification failed")


def test_algorithm_confusion_rsa_public_key_as_hmac_secret(keys):
    import base64, hashlib, hmac

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256"}).encode())
    body = b64(json.dumps({"sub": "mallory", "exp": NOW + 60, "iss": "https://id.test/", "aud": "orders"}).encode())
    secret = pem(keys["rsa"]).encode()
    sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
    refused(stub(keys), f"{head}.{body}.{sig}", "signature verification failed")


def test_either_method_suffices(keys):
    gw = stub(keys)
    r = gw.request("GET", "/r/x", headers={"X-API-Key": "bad", **bearer(token("HS256", HS_SECRET))})
    assert r.code == 200 and gw.contexts[-1].consumer == "alice"


# -- JWK Sets ------------------------------------------------------------------


class Jwks(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.keys = []
        self.fetches = 0

    def render_GET(self, request):
        self.fetches += 1
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


def jwk(private_key, kid, alg):
    reader = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    d = json.loads(reader.to_jwk(private_key.public_key()))
    d.update(kid=kid, alg=alg, use="sig")
    return d


JWKS_ROUTE = """
  - name: jwks
    service: svc
    match: {path_prefix: /j}
    auth:
      methods: [jwt]
      jwt:
        algorithms: [RS256, ES256]
        jwks_url: http://id.test/jwks.json
        jwks_min_refetch_interval: 10s
"""


def jwks_gateway(keys, server):
    client = StubTreq(server)
    gw = StubGateway(
        config(keys, JWKS_ROUTE),
        filter_factories={"auth": lambda gateway: AuthFilter(gateway, http_client=client)},
    )
    gw.reactor.advance(NOW)
    return gw, client


def test_jwks_rotation_refetches_for_unknown_kids_rate_limited(keys):
    server = Jwks()
    server.keys = [jwk(keys["rsa"], "k1", "RS256")]
    gw, client = jwks_gateway(keys, server)
    auth = gw.filter("auth")
    auth.service.startService()
    try:
        client.flush()
        assert server.fetches == 1
        ok = token("RS256", keys["rsa"], kid="k1")
        assert gw.request("GET", "/j/x", headers=bearer(ok), extra_flush=[client.flush]).code == 200

        # The provider rotates: k2 replaces k1. A k2 token triggers a refetch.
        server.keys = [jwk(keys["p256"], "k2", "ES256")]
        gw.reactor.advance(11)
        new = token("ES256", keys["p256"], kid="k2")
        r = gw.request("GET", "/j/x", headers=bearer(new), extra_flush=[client.flush])
        assert r.code == 200 and server.fetches == 2
        # k1 is gone; asking again within the rate limit does not refetch.
        refused_old = gw.request("GET", "/j/x", headers=bearer(ok), extra_flush=[client.flush])
        assert refused_old.code == 401 and server.fetches == 2
        assert "unknown key id" in refused_old.header("WWW-Authenticate")
        made_up = token("ES256", keys["p256"], kid="nope")
        assert gw.request("GET", "/j/x", headers=bearer(made_up), extra_flush=[client.flush]).code == 401
        assert server.fetches == 2
    finally:
        auth.service.stopService()
    assert [c for c in gw.reactor.getDelayedCalls() if c.active()] == []


def test_jwks_sources_follow_reloads(keys):
    server = Jwks()
    server.keys = [jwk(keys["rsa"], "k1", "RS256")]
    gw, client = jwks_gateway(keys, server)
    auth = gw.filter("auth")
    auth.service.startService()
    (source,) = auth.sources.values()
    assert source.running
    gw.reload(config(keys, JWKS_ROUTE + "  - {name: other, service: svc, match: {path_prefix: /o}}\n"))
    assert list(auth.sources.values()) == [source]  # same URL: kept, not refetched
    gw.reload(config(keys))
    assert auth.sources == {} and not source.running
    gw.reload(config(keys, JWKS_ROUTE))
    (fresh,) = auth.sources.values()
    assert fresh.running
    auth.service.stopService()
    assert not fresh.running


# -- configuration ---------------------------------------------------------------


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "gw.yaml")
    return info.value


def route_with(auth: str, consumers: str = CONSUMERS) -> str:
    return BASE + consumers + f"routes:\n  - name: r\n    service: svc\n    auth:\n{auth}"


@pytest.mark.parametrize(
    "auth, line, reason",
    [
        ("      methods: [password]\n", 17, "expected one of api_key, jwt"),
        ("      methods: [jwt]\n", 17, "the jwt method needs a 'jwt' section"),
        ("      methods: [jwt]\n      jwt: {algorithms: [none], keys: [x]}\n", 18, "unsupported JWT algorithm 'none'"),
        ("      methods: [jwt]\n      jwt: {algorithms: [HS256], keys: [short]}\n", 18, "shorter than 32 bytes"),
        ("      methods: [jwt]\n      jwt: {algorithms: [RS256], keys: ['-----BEGIN PUBLIC KEY-----x']}\n", 18, "unreadable PEM key"),
        ("      methods: [jwt]\n      jwt: {algorithms: [RS256]}\n", 18, "give either keys or jwks_url"),
        ("      methods: [jwt]\n      jwt: {algorithms: [RS256], jwks_url: 'ftp://x'}\n", 18, "expected an http:// or https:// URL"),
        ("      methods: [jwt]\n      jwt: {algorithms: [HS256], keys: ['" + "k" * 32 + "'], forward_claims: {sub: 'X Bad'}}\n", 18, "not a valid header name"),
        ("      methods: [api_key]\n      api_key: {header: false, query: false}\n", 18, "needs a header or a query argument"),
        ("      methods: [api_key]\n      realm: 'a\"b'\n", 18, "cannot be quoted"),
        ("      methods: [api_key]\n      allowed: [x]\n", 18, "unknown key"),
    ],
)
def test_bad_auth_config_names_file_and_line(auth, line, reason):
    e = error_of(route_with(auth))
    assert e.line == line and reason in str(e), str(e)


def test_api_key_without_consumers_refused():
    e = error_of(route_with("      methods: [api_key]\n", consumers=""))
    assert "needs top-level consumers" in str(e) and e.line == 11


@pytest.mark.parametrize(
    "consumers, line, reason",
    [
        ("consumers:\n  - {name: a, api_keys: ['sha256:abc']}\n", 8, "64 hex digits"),
        ("consumers:\n  - {name: a, api_keys: [k1]}\n  - {name: a}\n", 9, "duplicate consumer name 'a'"),
        ("consumers:\n  - {name: a, api_keys: [k1]}\n  - {name: b, api_keys: [k1]}\n", 9, "also a key of consumer 'a'"),
        (f"consumers:\n  - {{name: a, api_keys: [k1]}}\n  - {{name: b, api_keys: ['{hash_api_key('k1')}']}}\n", 9, "also a key of consumer 'a'"),
    ],
)
def test_bad_consumers(consumers, line, reason):
    e = error_of(BASE + consumers + "routes: []\n")
    assert e.line == line and reason in str(e), str(e)
