"""
Run wrk and parse its text report.

wrk 4.x prints, with C{--latency}::

    Running 10s test @ http://127.0.0.1:8080/
      1 threads and 64 connections
      Thread Stats   Avg      Stdev     Max   +/- Stdev
        Latency   612.31us  101.56us   4.73ms   90.12%
        Req/Sec   104.52k     3.18k  110.08k    71.00%
      Latency Distribution
         50%  598.00us
         75%  650.00us
         90%  712.00us
         99%    1.01ms
      1040000 requests in 10.00s, 220.18MB read
      Socket errors: connect 0, read 0, write 0, timeout 3
      Non-2xx or 3xx responses: 12
    Requests/sec: 104000.00
    Transfer/sec:     22.02MB

The "Socket errors" and "Non-2xx" lines appear only when non-zero.
"""

import re
import subprocess

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _bytes(text):
    m = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text)
    if not m:
        raise ValueError(f"unparsable wrk size {text!r}")
    return float(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse(output):
    """
    Parse wrk's report.

    @param str output: wrk's stdout.
    @return: a L{dict} with C{requests} (int), C{seconds} (float),
        C{rps} (requests/s, float), C{bytes_per_s} (float), C{p50_ms},
        C{p75_ms}, C{p90_ms}, C{p99_ms} (float, milliseconds; C{None} when
        wrk was run without C{--latency}), C{socket_errors} (dict of
        connect/read/write/timeout counts), C{non_2xx} (int) and C{errors}
        (int, their sum).
    @raise ValueError: if the essential lines are missing.
    """
    out = {
        "p50_ms": None,
        "p75_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "non_2xx": 0,
    }
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not m:
        raise ValueError("no 'Requests/sec' line in wrk output")
    out["rps"] = float(m.group(1))
    m = re.search(r"Transfer/sec:\s+(\S+)", output)
    out["bytes_per_s"] = _bytes(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output)
    if not m:
        raise ValueError("no 'N requests in T' line in wrk output")
    out["requests"] = int(m.group(1))
    out["seconds"] = _ms(m.group(2) + m.group(3)) / 1e3
    m = re.search(r"Latency Distribution\s*\n((?:\s+\d+%\s+\S+\s*\n)+)", output)
    if m:
        for pct, value in re.findall(r"(\d+)%\s+(\S+)", m.group(1)):
            out[f"p{pct}_ms"] = _ms(value)
    m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
        output,
    )
    if m:
        out["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()))
        )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if m:
        out["non_2xx"] = int(m.group(1))
    out["errors"] = out["non_2xx"] + sum(out["socket_errors"].values())
    return out


def run(url, duration, connections, threads=1, cpu=None, timeout_s=2, extra=()):
    """
    Run wrk against C{url} for C{duration} seconds and parse its report.

    @param int duration: seconds.
    @param int connections: concurrent keep-alive connections.
    @param cpu: pin wrk to this CPU with C{taskset} when not C{None}.
    @param int timeout_s: wrk's per-request timeout (a request slower than
        this counts as a socket timeout error).
    @return: L{parse}'s dict plus C{raw} (wrk's stdout).
    @raise RuntimeError: if wrk fails, hangs past C{duration + 30} seconds,
        or prints no report.
    """
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={timeout_s}s",
        "--latency",
        *extra,
        url,
    ]
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + argv
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=duration + 30,
        )
    except subprocess.TimeoutExpired:
        # subprocess.run kills wrk (by its PID) before raising.
        raise RuntimeError(f"wrk did not finish within {duration + 30} s")
    if done.returncode != 0:
        raise RuntimeError(
            f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
        )
    try:
        result = parse(done.stdout)
    except ValueError as e:
        raise RuntimeError(f"{e}:\n{done.stdout}\n{done.stderr}")
    result["raw"] = done.stdout
    return result
