"""
Peer: nginx as a reverse proxy, one worker, keep-alive upstream connections.

The harness imports L{write_config}; standalone::

    python bench/peers/nginx_proxy.py --port 8080 --origin http://127.0.0.1:8081

runs nginx in the foreground on a generated config until Ctrl-C.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nginxconf  # noqa: E402
import procs  # noqa: E402


def write_config(tmpdir, port, origin_url):
    """
    Write the proxy's config into C{tmpdir}; return the nginx command line.

    @param int port: port to listen on, on 127.0.0.1.
    @param str origin_url: e.g. C{"http://127.0.0.1:8081"}.
    @rtype: L{list} of L{str}
    """
    origin = urlsplit(origin_url)
    conf = nginxconf.prelude(tmpdir, "nginx-proxy") + (
        "  upstream origin {\n"
        f"    server {origin.hostname}:{origin.port};\n"
        "    keepalive 64;\n"
        "    keepalive_requests 100000000;\n"
        "  }\n"
        "  server {\n"
        f"    listen 127.0.0.1:{port} backlog=4096;\n"
        "    location / {\n"
        "      proxy_pass http://origin;\n"
        "      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n'
        # Buffer in memory as usual, but never spill a large response to a
        # temp file on disk: stream it through instead.
        "      proxy_max_temp_file_size 0;\n"
        "    }\n"
        "  }\n"
        "}\n"
    )
    path = os.path.join(tmpdir, "nginx-proxy.conf")
    with open(path, "w") as f:
        f.write(conf)
    return nginxconf.argv(path, tmpdir, "nginx-proxy")


def main():
    parser = argparse.ArgumentParser(description="nginx reverse-proxy peer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--origin", required=True, help="http://host:port")
    args = parser.parse_args()
    procs.interrupt_on_signals()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-proxy-") as tmpdir:
        proc = subprocess.Popen(write_config(tmpdir, args.port, args.origin))
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
