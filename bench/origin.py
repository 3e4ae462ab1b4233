"""
The origin every proxy under test forwards to: one nginx worker, so that it is
never the bottleneck.

Routes:
  - C{GET /large}: a generated file of C{large_size} bytes (1 MiB by default),
    served with sendfile, for the streaming scenario;
  - any other path: 200 with a fixed 100-byte C{text/plain} body.

Standalone, for poking at by hand::

    python bench/origin.py [--port 0] [--large-size 1048576]

prints its URL and serves until Ctrl-C.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nginxconf  # noqa: E402
import procs  # noqa: E402

SMALL_BODY = b"x" * 99 + b"\n"
assert len(SMALL_BODY) == 100


class Origin:
    """
    An nginx origin on 127.0.0.1, its files in C{tmpdir}.

    @ivar port: the port it listens on.
    @ivar proc: its L{subprocess.Popen} (the nginx master), once started.
    """

    def __init__(self, tmpdir, port=None, large_size=1 << 20):
        self.tmpdir = tmpdir
        self.port = port or procs.free_port()
        self.large_size = large_size
        self.proc = None
        self.url = f"http://127.0.0.1:{self.port}"

    def write_config(self):
        """
        Generate the large file and the config; return the config's path.
        """
        large = os.path.join(self.tmpdir, "large.bin")
        with open(large, "wb") as f:
            chunk = os.urandom(1 << 16)
            left = self.large_size
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        conf = nginxconf.prelude(self.tmpdir, "origin") + (
            "  server {\n"
            f"    listen 127.0.0.1:{self.port} backlog=4096;\n"
            "    location = /large {\n"
            f"      alias {large};\n"
            "    }\n"
            "    location / {\n"
            "      default_type text/plain;\n"
            f'      return 200 "{SMALL_BODY.decode().rstrip()}\\n";\n'
            "    }\n"
            "  }\n"
            "}\n"
        )
        path = os.path.join(self.tmpdir, "origin.conf")
        with open(path, "w") as f:
            f.write(conf)
        return path

    def start(self, processes, cpu=None, timeout=10.0):
        """
        Start nginx (pinned to C{cpu} when given) and wait, bounded, until
        C{GET /} answers with the 100-byte body.

        @type processes: L{procs.Processes}
        """
        path = self.write_config()
        self.proc = processes.start(
            nginxconf.argv(path, self.tmpdir, "origin"),
            "origin",
            os.path.join(self.tmpdir, "origin.out"),
            cpu=cpu,
        )
        procs.wait_port(self.port, timeout, proc=self.proc)
        procs.wait_http(self.port, "/", timeout, expect_len=len(SMALL_BODY))
        procs.wait_http(self.port, "/large", timeout, expect_len=self.large_size)
        return self


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--large-size", type=int, default=1 << 20)
    args = parser.parse_args()
    procs.interrupt_on_signals()
    processes = procs.Processes()
    with tempfile.TemporaryDirectory(prefix="bench-origin-") as tmpdir:
        try:
            origin = Origin(tmpdir, args.port or None, args.large_size)
            origin.start(processes)
            print(f"origin at {origin.url}/ (and {origin.url}/large); Ctrl-C stops it")
            origin.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            processes.stop_all()


if __name__ == "__main__":
    main()
