"""
End to end: request filters on a real gateway process (C{twist} with JSON
logs) in front of a real backend, with a JWK Set served by a real local
HTTP server that rotates keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth import hash_api_key
from tests.harness import ROOT, Process, env, get, request, wait_for

HS_SECRET = "e2e-hmac-secret-" + "x" * 48
BEARER_CHALLENGE = 'Bearer realm="txgateway"'

# twist with the test-only raising filter registered first: it is never
# part of a production gateway.
_LAUNCH = (
    "import sys; sys.argv[0] = 'twist'; "
    "from tests.raising_filter import register; register(); "
    "from twisted.application.twist._twist import Twist; sys.exit(Twist.main())"
)


class JsonLogGateway(Process):
    """A C{twist --log-format=json gateway} process on ephemeral ports."""

    def __init__(self, config: dict) -> None:
        self.dir = tempfile.mkdtemp(prefix="gateway-filters-")
        self.config_path = os.path.join(self.dir, "gateway.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        log_path = os.path.join(self.dir, "log.json")
        open(log_path, "w").close()
        popen = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, "--log-format=json", f"--log-file={log_path}",
             "gateway", "--config", self.config_path],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env(), cwd=ROOT,
        )
        super().__init__(popen, log_path)

        def started():
            if popen.poll() is not None:
                raise RuntimeError(f"gateway exited with {popen.returncode}:\n{self.log()}")
            return re.search(r"GatewaySite starting on (\d+)", self.log())

        self.port = int(wait_for(started, what="the gateway's listener").group(1))

    def events(self) -> list:
        # One JSON text per event, each after an RS (0x1e) as in RFC 7464.
        return [json.loads(text) for text in self.log().split("\x1e") if text.strip()]

    def events_of(self, request_id: str) -> list:
        return [e for e in self.events() if e.get("request_id") == request_id]


class JwksServer(Process):
    """C{python -m http.server} serving a directory holding C{jwks.json}."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="jwks-")
        fd, log_path = tempfile.mkstemp(prefix="jwks-", suffix=".log")
        os.close(fd)
        popen = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", self.dir],
            stdout=subprocess.PIPE, stderr=open(log_path, "w"), env=env(), text=True,
        )
        super().__init__(popen, log_path)
        line = popen.stdout.readline()  # printed once listening
        match = re.search(r"port (\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"JWKS server did not start: {line!r}")
        self.base = f"http://127.0.0.1:{match.group(1)}/"

    def url(self, name: str) -> str:
        return self.base + name

    def publish(self, name: str, *jwks) -> None:
        """Atomically replace the JWK Set served as C{name} (None: remove it, 404)."""
        path = os.path.join(self.dir, name)
        if jwks == (None,):
            os.unlink(path)
            return
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"keys": list(jwks)}, f)
        os.replace(tmp, path)

    def fetches(self, name: str) -> int:
        return self.log().count(f"GET /{name} ")


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


def jwk(private_key, kid: str, alg: str) -> dict:
    reader = RSAAlgorithm if isinstance(private_key, rsa.RSAPrivateKey) else ECAlgorithm
    d = json.loads(reader.to_jwk(private_key.public_key()))
    d.update(kid=kid, alg=alg, use="sig")
    return d


def token(alg, key, kid=None, **claims) -> str:
    payload = {"sub": "alice", "exp": time.time() + 600, "iss": "https://id.test/", "aud": "orders"}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def bearer(t: str, **more) -> dict:
    return {"Authorization": f"Bearer {t}", **more}


@pytest.fixture(scope="module")
def jwks_server(keys):
    server = JwksServer()
    server.publish("rotating.json", jwk(keys["rsa"], "k1", "RS256"))
    server.publish("failing.json", jwk(keys["p256"], "k3", "ES256"))
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(backends, keys, jwks_server):
    backend = backends[0]
    jwt_common = {"issuer": "https://id.test/", "audience": "orders", "leeway": "5s",
                  "forward_claims": {"sub": "X-Consumer-ID"}}
    config = {
        "listen": "tcp:0:interface=127.0.0.1",
        "admin": {"listen": "tcp:0:interface=127.0.0.1"},
        "limits": {"max_request_body": "1KiB", "max_header_count": 20, "max_header_bytes": "4KiB",
                   "client_idle_timeout": "2s", "client_header_timeout": "1s"},
        "consumers": [
            {"name": "mobile-app", "api_keys": [hash_api_key("mobile-secret")]},
            {"name": "dev", "api_keys": ["dev-plain-key"]},
        ],
        "services": {"one": {"backends": [{"url": backend.url}]}},
        "routes": [
            {"name": "static", "service": "one", "match": {"path_prefix": "/static"}, "strip_prefix": True,
             "auth": {"methods": ["jwt"], "jwt": {
                 "algorithms": ["HS256", "HS384", "HS512", "RS256", "PS256", "ES256", "EdDSA"],
                 "keys": [HS_SECRET, pem(keys["rsa"]), pem(keys["p256"]), pem(keys["ed25519"])],
                 **jwt_common}}},
            {"name": "jwks", "service": "one", "match": {"path_prefix": "/jwks"}, "strip_prefix": True,
             "auth": {"methods": ["jwt"], "jwt": {
                 "algorithms": ["RS256", "ES256"], "jwks_url": jwks_server.url("rotating.json"),
                 "jwks_refresh_interval": "1h", "jwks_min_refetch_interval": "300ms", **jwt_common}}},
            {"name": "jwks-failing", "service": "one", "match": {"path_prefix": "/failing"},
             "auth": {"methods": ["jwt"], "jwt": {
                 "algorithms": ["ES256"], "jwks_url": jwks_server.url("failing.json"),
                 "jwks_refresh_interval": "500ms", **jwt_common}}},
            {"name": "keys", "service": "one", "match": {"path_prefix": "/keys"}, "strip_prefix": True,
             "auth": {"methods": ["api_key"], "api_key": {"header": "X-API-Key", "query": "api_key"}}},
            {"name": "mobile", "service": "one", "match": {"path_prefix": "/mobile"},
             "auth": {"methods": ["api_key"], "allowed_consumers": ["mobile-app"]}},
            {"name": "cors", "service": "one", "match": {"path_prefix": "/cors", "methods": ["GET", "PUT"]},
             "cors": {"allowed_origins": ["https://app.test", "https://*.example.test"],
                      "allowed_methods": ["GET", "PUT"], "allowed_headers": ["Content-Type"],
                      "exposed_headers": ["X-Request-Id"], "max_age": "10m"}},
            {"name": "open", "service": "one", "match": {"path_prefix": "/open"}, "strip_prefix": True,
             "rewrite": {"request_headers": {"set": {"X-Tenant": "acme"}},
                         "response_headers": {"remove": ["X-Backend"]}}},
        ],
    }
    gw = JsonLogGateway(config)
    yield gw
    assert gw.stop() == 0, gw.log()


def upstream(r, name: str) -> list:
    return [v for k, v in r.json()["headers"] if k.lower() == name.lower()]


# -- JWT -------------------------------------------------------------------------


SIGNERS = {"HS256": "hs", "HS384": "hs", "HS512": "hs", "RS256": "rsa", "PS256": "rsa",
           "ES256": "p256", "EdDSA": "ed25519"}


@pytest.mark.parametrize("alg", sorted(SIGNERS))
def test_valid_token_of_each_algorithm(gateway, keys, alg):
    key = HS_SECRET if SIGNERS[alg] == "hs" else keys[SIGNERS[alg]]
    r = get(gateway.port, "/static/x", headers=bearer(token(alg, key), **{"X-Consumer-ID": "forged"}))
    assert r.status == 200, r.body
    assert upstream(r, "X-Consumer-ID") == ["alice"]
    assert upstream(r, "Authorization") == []


def hand_hs256(secret: bytes, claims: dict, alg="HS256") -> str:
    import base64
    import hmac

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": alg}).encode()) + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


@pytest.mark.parametrize(
    "case, description",
    [
        ("expired", "token expired"),
        ("not_yet_valid", "token not yet valid"),
        ("other_key", "signature verification failed"),
        ("wrong_audience", "invalid audience"),
        ("alg_none", "algorithm not allowed"),
        ("confusion", "signature verification failed"),
    ],
)
def test_invalid_tokens_get_401_with_a_challenge(gateway, keys, case, description):
    now = time.time()
    claims = {"sub": "mallory", "exp": now + 60, "iss": "https://id.test/", "aud": "orders"}
    t = {
        "expired": lambda: token("ES256", keys["p256"], exp=now - 60),
        "not_yet_valid": lambda: token("EdDSA", keys["ed25519"], nbf=now + 60),
        "other_key": lambda: token("RS256", keys["rsa2"]),
        "wrong_audience": lambda: token("HS256", HS_SECRET, aud="billing"),
        "alg_none": lambda: jwt.encode(claims, None, algorithm="none"),
        # HS256 signed with the RSA public key the gateway trusts for RS256.
        "confusion": lambda: hand_hs256(pem(keys["rsa"]).encode(), claims),
    }[case]()
    r = get(gateway.port, "/static/x", headers=bearer(t))
    assert r.status == 401
    assert r.header("WWW-Authenticate") == (
        f'{BEARER_CHALLENGE}, error="invalid_token", error_description="{description}"'
    )
    assert r.json()["request_id"] == r.header("X-Request-Id")


def test_jwks_rotation_refetches_early_for_an_unknown_kid(gateway, keys, jwks_server):
    name = "rotating.json"
    k1 = token("RS256", keys["rsa"], kid="k1")
    assert get(gateway.port, "/jwks/x", headers=bearer(k1)).status == 200

    # The identity provider rotates to k2. The gateway's schedule is an
    # hour: a k2 token makes it refetch at once (the rate limit allows one
    # fetch per 300ms; the last was at start-up, perhaps just now).
    jwks_server.publish(name, jwk(keys["p256"], "k2", "ES256"))
    time.sleep(0.35)
    before = jwks_server.fetches(name)
    k2 = token("ES256", keys["p256"], kid="k2")
    r = get(gateway.port, "/jwks/x", headers=bearer(k2))
    assert r.status == 200, r.body
    assert upstream(r, "X-Consumer-ID") == ["alice"]
    assert jwks_server.fetches(name) == before + 1
    assert "JWKS refetch for unknown kid" in gateway.log()

    # k1 is gone. Tokens naming unknown kids in a burst cause one fetch
    # at most: a flood of made-up kids cannot hammer the provider.
    time.sleep(0.35)
    before = jwks_server.fetches(name)
    for kid in ("k1", "made-up-1", "made-up-2", "made-up-3"):
        r = get(gateway.port, "/jwks/x", headers=bearer(token("RS256", keys["rsa"], kid=kid)))
        assert r.status == 401 and "unknown key id" in r.header("WWW-Authenticate")
    assert jwks_server.fetches(name) == before + 1


def test_jwks_failure_keeps_the_last_good_set(gateway, keys, jwks_server):
    name = "failing.json"
    k3 = token("ES256", keys["p256"], kid="k3")
    wait_for(lambda: get(gateway.port, "/failing/x", headers=bearer(k3)).status == 200, timeout=5,
             what="the first JWKS fetch")
    jwks_server.publish(name, None)  # now 404
    before = jwks_server.fetches(name)
    wait_for(lambda: jwks_server.fetches(name) >= before + 2, timeout=10, what="scheduled JWKS fetches")
    assert get(gateway.port, "/failing/x", headers=bearer(k3)).status == 200
    assert "keeping the last good key set" in gateway.log()
    jwks_server.publish(name, jwk(keys["p256"], "k3", "ES256"))


# -- API keys ----------------------------------------------------------------------


def test_api_keys_hashed_and_plain_header_and_query(gateway):
    r = get(gateway.port, "/keys/a", headers={"X-API-Key": "mobile-secret"})
    assert r.status == 200 and upstream(r, "X-API-Key") == []
    r = get(gateway.port, "/keys/a?x=1&api_key=dev-plain-key")
    assert r.status == 200 and r.json()["uri"] == "/a?x=1"


def test_missing_and_bad_api_keys_get_401(gateway):
    r = get(gateway.port, "/keys/a")
    assert r.status == 401 and r.header("WWW-Authenticate") == BEARER_CHALLENGE
    r = get(gateway.port, "/keys/a", headers={"X-API-Key": "guess"})
    assert r.status == 401
    assert r.header("WWW-Authenticate") == (
        f'{BEARER_CHALLENGE}, error="invalid_token", error_description="unknown API key"'
    )


def test_authenticated_but_not_allowed_gets_403(gateway):
    assert get(gateway.port, "/mobile/a", headers={"X-API-Key": "mobile-secret"}).status == 200
    r = get(gateway.port, "/mobile/a", headers={"X-API-Key": "dev-plain-key"})
    assert r.status == 403 and r.json()["error"] == "forbidden"


# -- CORS ----------------------------------------------------------------------------


def test_cors_preflight_and_actual_request(gateway):
    preflight = {"Origin": "https://a.example.test", "Access-Control-Request-Method": "PUT",
                 "Access-Control-Request-Headers": "content-type"}
    r = request(gateway.port, "OPTIONS", "/cors/x", headers=preflight)
    assert r.status == 204
    assert r.header("Access-Control-Allow-Origin") == "https://a.example.test"
    assert r.header("Access-Control-Allow-Methods") == "GET, PUT"
    assert r.header("Access-Control-Allow-Headers") == "content-type"
    assert r.header("Access-Control-Max-Age") == "600"
    r = request(gateway.port, "OPTIONS", "/cors/x", headers={**preflight, "Origin": "https://evil.test"})
    assert r.status == 403 and r.header("Access-Control-Allow-Origin") is None
    r = get(gateway.port, "/cors/x", headers={"Origin": "https://app.test"})
    assert r.status == 200
    assert r.header("Access-Control-Allow-Origin") == "https://app.test"
    assert r.header("Access-Control-Expose-Headers") == "X-Request-Id"


# -- request IDs, errors, other filters --------------------------------------------------


def test_request_ids_in_answers_and_log_events(gateway):
    r = get(gateway.port, "/keys/a", headers={"X-Request-Id": "e2e-refused-1"})
    assert r.status == 401 and r.json()["request_id"] == "e2e-refused-1"
    events = wait_for(lambda: gateway.events_of("e2e-refused-1"), what="the refusal's log event")
    assert any("unauthenticated request" in e["log_format"] for e in events)
    r = get(gateway.port, "/open/a", headers={"X-Request-Id": "e2e-ok-1"})
    assert r.header("X-Request-Id") == "e2e-ok-1" and upstream(r, "X-Request-Id") == ["e2e-ok-1"]


def test_a_filter_that_raises_gives_500_is_logged_and_the_gateway_keeps_serving(gateway):
    for mode in ("request", "deferred"):
        rid = f"e2e-boom-{mode}"
        r = get(gateway.port, "/open/a", headers={"X-Test-Raise": mode, "X-Request-Id": rid})
        assert r.status == 500
        assert r.json() == {"error": "internal gateway error", "request_id": rid}
        # (The access-log event of the request carries its ID too.)
        (event,) = wait_for(
            lambda: [e for e in gateway.events_of(rid) if "log_failure" in e], what="the failure's log event"
        )
        failure = event["log_failure"]
        assert failure["type"]["__name__"] == "RuntimeError"
        if mode == "request":  # a Deferred failed with fail() has no frames to show
            assert any(frame[0] == "on_request" for frame in failure["frames"])  # the traceback
    assert get(gateway.port, "/open/a").status == 200


def test_security_headers_and_rewrites(gateway):
    r = get(gateway.port, "/open/a", headers={"X-Tenant": "evil"})
    assert r.header("X-Frame-Options") == "DENY" and r.header("X-Content-Type-Options") == "nosniff"
    assert r.header("Strict-Transport-Security") is None
    assert upstream(r, "X-Tenant") == ["acme"]
    assert r.header("X-Backend") is None


# -- limits --------------------------------------------------------------------------------


def test_oversize_body_gets_413(gateway):
    r = request(gateway.port, "POST", "/open/a", body=b"x" * 2048, headers={"X-Request-Id": "e2e-big"})
    assert r.status == 413
    assert r.json() == {"error": "request body too large", "request_id": "e2e-big"}
    # a response like the others: security headers, and its access event
    assert r.header("X-Content-Type-Options") == "nosniff" and r.header("X-Frame-Options") == "DENY"

    def access_event():
        found = [e for e in gateway.events_of("e2e-big") if e.get("log_namespace") == "gateway.access"]
        return found[0] if found else None

    event = wait_for(access_event, timeout=5, what="the 413's access event")
    assert (event["status"], event["method"], event["path"]) == (413, "POST", "/open/a")
    assert event["error"] == "request body too large" and event["route"] is None


def test_too_many_or_too_large_headers_get_431_and_long_uri_414(gateway):
    many = {f"X-H{i}": "v" for i in range(25)}
    r = get(gateway.port, "/open/a", headers=many)
    assert r.status == 431 and r.json()["error"] == "too many request header fields"
    r = get(gateway.port, "/open/a", headers={"X-Big": "v" * 5000})
    assert r.status == 431 and r.json()["error"] == "request header fields too large"
    r = get(gateway.port, "/open/" + "a" * 5000)
    assert r.status == 414
    assert get(gateway.port, "/open/a").status == 200


def raw_connection(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def read_all(s: socket.socket, limit: float = 5.0) -> bytes:
    s.settimeout(limit)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_slowloris_gets_408_within_the_header_timeout(gateway):
    s = raw_connection(gateway.port)
    try:
        started = time.monotonic()
        s.sendall(b"GET /open/a HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        s.settimeout(0.3)
        while time.monotonic() - started < 5:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # a trickle: the idle timeout never fires
            except OSError:
                break
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - started
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 <= elapsed < 3.0, elapsed


def test_idle_client_is_disconnected(gateway):
    s = raw_connection(gateway.port)
    try:
        started = time.monotonic()
        assert read_all(s, limit=6) == b""
        elapsed = time.monotonic() - started
    finally:
        s.close()
    assert 1.9 <= elapsed < 5, elapsed
