"""
TLS: the client-facing listener (certificates chosen by SNI, HTTP/2 by
ALPN) and HTTPS to backends (verified with service-identity, optional CA
bundle and client certificate).

Listener, top-level config::

    tls:
      certificates:            # the first is the default (no or unknown SNI)
        - {cert: /etc/txgateway/api.pem, key: /etc/txgateway/api.key}
        - {cert: /etc/txgateway/admin.pem, key: /etc/txgateway/admin.key}
      http2: true              # offer h2 by ALPN when the h2 package is installed

or just C{tls: {cert: ..., key: ...}}. Each certificate serves the DNS names
of its subjectAltName (C{*.example.com} wildcards too). The listener
endpoint (C{tcp:443}, C{systemd:...}, or a worker's inherited socket) is
wrapped in TLS; a reload re-reads the files and new connections use the new
certificates. A C{ssl:} endpoint string works too, with Twisted's own
single-certificate TLS and no SNI.

Backends, per service::

    services:
      users:
        backends: [{url: "https://users.internal:8443"}]
        tls:
          ca: /etc/txgateway/internal-ca.pem    # trust only these CAs
          cert: /etc/txgateway/gw-client.pem    # client certificate (mTLS)
          key: /etc/txgateway/gw-client.key
          server_name: users.internal           # name to verify, if not the URL's
          verify: true                          # false: no verification at all

Without C{tls}, HTTPS backends are verified against the system's CA store,
as by a browser. The files are read and checked when the config is loaded,
so a bad file is a config error, never a failed request.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from gateway.config import Extension, Section, Where, boolean, register, string

_log = Logger()

try:  # Twisted's HTTP/2 server needs the h2 package (the "http2" extra)
    from twisted.web._http2 import H2Connection  # noqa: F401

    H2_AVAILABLE = True
except ImportError:
    H2_AVAILABLE = False


# --- config ------------------------------------------------------------------


@attrs.frozen
class CertificateFile:
    """
    One certificate (with its chain) and its private key, read from files.

    @ivar cert_path: the PEM file: the certificate first, then its chain.
    @ivar names: the lower-case DNS names it serves (subjectAltName, or
        the subject's common name if it has none).
    """

    cert_path: str
    key_path: str
    cert_pem: bytes = attrs.field(repr=False)
    key_pem: bytes = attrs.field(repr=False)
    names: tuple[str, ...] = ()


@attrs.frozen
class ListenerTLS:
    """The listener's TLS settings (top-level C{tls})."""

    certificates: tuple[CertificateFile, ...]
    http2: bool = True


@attrs.frozen
class BackendTLS:
    """
    How a service speaks TLS to its HTTPS backends (service-level C{tls}).

    @ivar ca_pem: PEM CA certificates to trust instead of the system's, or
        None for the system's.
    @ivar client_pem: PEM certificate and key presented to backends, or None.
    @ivar server_name: the name verified (and sent by SNI) instead of the
        backend URL's host, or None.
    @ivar verify: False turns verification off (for tests only).
    """

    ca_path: Optional[str] = None
    ca_pem: Optional[bytes] = attrs.field(default=None, repr=False)
    client_path: Optional[str] = None
    client_pem: Optional[bytes] = attrs.field(default=None, repr=False)
    server_name: Optional[str] = None
    verify: bool = True


def _read(where: Where, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise where.error(f"cannot read {path}: {e.strerror or e}") from None


def _pem_certificates(where: Where, path: str, data: bytes) -> list:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise where.error(f"{path}: not a PEM certificate: {e}") from None
    return certs


def _names(cert) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            a.value.lower()
            for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        ]
    return tuple(names)


def _key_pair(section: Section) -> tuple[CertificateFile, Where]:
    cert_where = section.at("cert")
    key_where = section.at("key")
    cert_path = section.take("cert", string)
    key_path = section.take("key", string)
    cert_pem = _read(cert_where, cert_path)
    key_pem = _read(key_where, key_path)
    certs = _pem_certificates(cert_where, cert_path, cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise key_where.error(f"{key_path}: not an unencrypted PEM private key: {e}") from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != certs[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise key_where.error(f"{key_path} is not the key of the certificate in {cert_path}")
    return CertificateFile(cert_path, key_path, cert_pem, key_pem, _names(certs[0])), cert_where


def parse_listener_tls(where: Where, value: Any, context=None) -> ListenerTLS:
    """Parse the top-level C{tls} key. @raise ConfigError: bad value or file."""
    section = Section(where, value)
    entries = []
    if section.has("cert") or section.has("key"):
        entries.append(_key_pair(section)[0])
    if section.has("certificates"):
        from gateway.config import sequence

        for item_where, item in sequence(section.at("certificates"), section.take("certificates", lambda w, v: v)):
            item_section = Section(item_where, item)
            entries.append(_key_pair(item_section)[0])
            item_section.finish()
    if not entries:
        raise where.error("needs cert and key, or a list of certificates")
    http2 = section.take("http2", boolean, True)
    section.finish()
    return ListenerTLS(tuple(entries), http2)


def parse_backend_tls(where: Where, value: Any, context=None) -> BackendTLS:
    """Parse a service's C{tls} key. @raise ConfigError: bad value or file."""
    section = Section(where, value)
    ca_path = ca_pem = client_path = client_pem = None
    if section.has("ca"):
        ca_where = section.at("ca")
        ca_path = section.take("ca", string)
        ca_pem = _read(ca_where, ca_path)
        _pem_certificates(ca_where, ca_path, ca_pem)
    if section.has("cert") or section.has("key"):
        pair, _ = _key_pair(section)
        client_path = pair.cert_path
        client_pem = pair.cert_pem + b"\n" + pair.key_pem
    server_name = section.take("server_name", string, None)
    verify = section.take("verify", boolean, True)
    section.finish()
    return BackendTLS(ca_path, ca_pem, client_path, client_pem, server_name, verify)


register("top", Extension("tls", parse_listener_tls, None))
register("service", Extension("tls", parse_backend_tls, None))


# --- the listener --------------------------------------------------------------


def _matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


def _alpn_select(protocols: list[bytes]):
    def select(connection: SSL.Connection, offered: list[bytes]):
        for protocol in protocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS  # no ALPN answer; the client decides

    return select


class _Contexts:
    """The OpenSSL contexts for one L{ListenerTLS}, with SNI selection."""

    def __init__(self, settings: ListenerTLS) -> None:
        protocols = [b"h2", b"http/1.1"] if settings.http2 and H2_AVAILABLE else [b"http/1.1"]
        self.by_cert = []
        for entry in settings.certificates:
            certs = x509.load_pem_x509_certificates(entry.cert_pem)
            leaf = ssl.PrivateCertificate.loadPEM(
                certs[0].public_bytes(serialization.Encoding.PEM) + b"\n" + entry.key_pem
            )
            chain = [
                ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)).original
                for c in certs[1:]
            ]
            options = ssl.CertificateOptions(
                privateKey=leaf.privateKey.original,
                certificate=leaf.original,
                extraCertChain=chain or None,
            )
            context = options.getContext()
            # Our own ALPN choice: Twisted's would add what the Site offers
            # (h2 whenever h2 is installed), so http2: false could not
            # turn it off.
            context.set_alpn_select_callback(_alpn_select(protocols))
            self.by_cert.append((entry.names, context))
        self.default = self.by_cert[0][1]
        self.default.set_tlsext_servername_callback(self._servername)

    def for_name(self, name: str) -> Optional[SSL.Context]:
        for names, context in self.by_cert:
            if any(_matches(pattern, name) for pattern in names):
                return context
        return None

    def _servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if not raw:
            return
        context = self.for_name(raw.decode("ascii", "replace").lower().rstrip("."))
        if context is not None and context is not self.default:
            connection.set_context(context)


@implementer(IOpenSSLServerConnectionCreator)
class ListenerTLSCreator:
    """
    Makes the server side of each TLS connection from the gateway's
    current config, so that a reload that changes certificates applies to
    the connections that follow.

    @param gateway: the L{gateway.state.Gateway}; its snapshot's config
        must have a C{tls} option.
    """

    def __init__(self, gateway) -> None:
        self._gateway = gateway
        self._settings: Optional[ListenerTLS] = None
        self._contexts: Optional[_Contexts] = None

    def contexts(self) -> _Contexts:
        settings = self._gateway.snapshot.config.options.get("tls")
        if settings is None:
            settings = self._settings  # turned off by a reload: needs a restart
        if settings is not self._settings or self._contexts is None:
            self._contexts = _Contexts(settings)
            self._settings = settings
        return self._contexts

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.contexts().default, None)


def wrap_listener(gateway, factory):
    """
    C{factory} wrapped in TLS from the config's C{tls} settings.

    @raise ValueError: the certificates cannot be used.
    """
    creator = ListenerTLSCreator(gateway)
    creator.contexts()  # fail at start-up, not on the first connection
    return TLSMemoryBIOFactory(creator, False, factory)


# --- backends -------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """A client TLS connection creator that checks nothing (verify: false)."""

    def __init__(self, options: ssl.CertificateOptions, server_name: str) -> None:
        self._options = options
        self._server_name = server_name

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if not _is_ip(self._server_name):
            connection.set_tlsext_host_name(self._server_name.encode("idna"))
        connection.set_connect_state()
        connection.set_app_data(tlsProtocol)
        return connection


@implementer(IPolicyForHTTPS)
class BackendTLSPolicy:
    """
    The HTTPS policy for one service's backends: verify the certificate
    chain against C{settings.ca_pem} (or the system store) and the host
    name with service-identity, present a client certificate if configured.

    @param settings: the service's L{BackendTLS}.
    """

    def __init__(self, settings: BackendTLS) -> None:
        self._settings = settings
        if settings.ca_pem is not None:
            self._trust = ssl.trustRootFromCertificates(
                [
                    ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                    for c in x509.load_pem_x509_certificates(settings.ca_pem)
                ]
            )
        else:
            self._trust = ssl.platformTrust()
        self._client = (
            ssl.PrivateCertificate.loadPEM(settings.client_pem)
            if settings.client_pem is not None
            else None
        )
        self._creators: dict = {}

    def creatorForNetloc(self, hostname: bytes, port: int):
        key = (hostname, port)
        creator = self._creators.get(key)
        if creator is None:
            name = self._settings.server_name or hostname.decode("idna")
            if self._settings.verify:
                creator = ssl.optionsForClientTLS(
                    name,
                    trustRoot=self._trust,
                    clientCertificate=self._client,
                    acceptableProtocols=[b"http/1.1"],
                )
            else:
                extra = {}
                if self._client is not None:
                    extra = dict(
                        privateKey=self._client.privateKey.original,
                        certificate=self._client.original,
                    )
                creator = _Unverified(ssl.CertificateOptions(verify=False, **extra), name)
            self._creators[key] = creator
        return creator


def backend_policy(service) -> IPolicyForHTTPS:
    """
    The HTTPS policy for C{service}'s backends: L{BackendTLSPolicy} from its
    C{tls} option, or browser-like verification against the system store.
    Health probes to HTTPS backends should use the same policy.
    """
    settings = service.options.get("tls") if service.options else None
    if settings is None:
        return BrowserLikePolicyForHTTPS()
    return BackendTLSPolicy(settings)
