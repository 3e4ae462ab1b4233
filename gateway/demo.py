"""
The quick start: three demo backends and a gateway in front of them.

C{python -m gateway.demo} starts backends on 127.0.0.1:9001-9003 and
C{twistd -n gateway --config etc/demo.yaml}, prints curl lines to try, and
stops them all on Ctrl-C (or after C{--seconds N}).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(os.path.dirname(HERE), "etc", "demo.yaml")
BACKENDS = (("users-a", 9001), ("users-b", 9002), ("orders", 9003))

TRY = """
txgateway is listening on http://127.0.0.1:8080 (admin: http://127.0.0.1:9901/health)

  curl -s 127.0.0.1:8080/api/users/7                   # round robin: users-a, users-b, ...
  curl -s 127.0.0.1:8080/api/orders/1                  # GET only route -> orders
  curl -s -H 'X-Version: v2' 127.0.0.1:8080/api/orders/1   # header route, prefix stripped
  curl -si 127.0.0.1:8080/nowhere                      # 404 with a JSON body
  curl -s 127.0.0.1:9901/health

Ctrl-C stops the gateway and the backends.
"""


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run txgateway in front of demo backends.")
    parser.add_argument("--config", default=DEMO_CONFIG, help="gateway config (default: etc/demo.yaml)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    children: list[subprocess.Popen] = []
    try:
        for name, port in BACKENDS:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gateway.demo_backend", "--port", str(port), "--name", name],
                    stdout=subprocess.DEVNULL,
                    env=env,
                )
            )
        for _, port in BACKENDS:
            _wait_port(port)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        children.append(
            subprocess.Popen(
                [twistd, "-n", "--pidfile=", "gateway", "--config", args.config], env=env
            )
        )
        _wait_port(8080)
        print(TRY, flush=True)
        deadline = None if args.seconds is None else time.monotonic() + args.seconds
        while deadline is None or time.monotonic() < deadline:
            if any(child.poll() is not None for child in children):
                print("a demo process exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    sys.exit(main())
