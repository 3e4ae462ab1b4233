"""
An HTTPS demo backend for the tests: the demo backend's echo resource
behind TLS, optionally requiring a client certificate.

C{python -m tests.tls_backend --cert C --key K [--client-ca CA] --name N}
prints C{listening on PORT}.
"""

import argparse
import sys

from twisted.internet import ssl
from twisted.web import server

from gateway.demo_backend import Echo


def main(argv) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca")
    parser.add_argument("--name", default="tls")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    with open(args.cert, "rb") as f:
        cert_pem = f.read()
    with open(args.key, "rb") as f:
        key_pem = f.read()
    identity = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    extra = {}
    if args.client_ca:
        with open(args.client_ca, "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        extra = dict(verify=True, caCerts=[ca.original], requireCertificate=True)
    options = ssl.CertificateOptions(
        privateKey=identity.privateKey.original, certificate=identity.original, **extra
    )
    site = server.Site(Echo(args.name, reactor))
    site.noisy = False
    site.log = lambda request: None
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    print(f"listening on {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
