#!/usr/bin/env python
"""
Instructions per proxied request, counted by valgrind's callgrind: a
measure of the gateway's work that does not move with the machine's load
or speed, for changes too small to see in requests/s on a shared VM.

    python bench/instructions.py \\
        --gateway-config typical=bench/scenarios/typical-rl-jsonl.yaml \\
        --checkout before=/tmp/before --gateway-config before=bench/scenarios/typical-rl-jsonl.yaml

Each row starts a gateway under C{valgrind --tool=callgrind
--instr-atstart=no} in front of the bench's nginx origin, sends it
C{--warmup-requests} keep-alive requests with ApacheBench (C{ab -k}, C{-c
--concurrency}), switches callgrind's counting on (C{callgrind_control -i
on}), sends C{--requests} more, switches it off and stops the gateway; the
row's count is the instructions counted divided by those requests.  Rows
are measured in C{--repeat} rounds of every row, and the table shows each
row's median and every count, with the ratio to the first row.

A row is named by its C{--gateway-config NAME=FILE} (the bench's
placeholders and C{# bench-...} directives, as in C{bench/run.py}; FILE
alone is the row "gateway"), and runs the gateway of C{--checkout
NAME=DIR} (a checkout of this repository, e.g. a C{git worktree} of the
commit to compare with; by default this one) on C{--gateway-python
NAME=PATH} (by default the interpreter running this script).

On CPython the counts repeat to about 0.1% for the same code and config
(C{PYTHONHASHSEED=0}; timers that run on the wall clock, such as the
access log's flush, still add a little).  Under PyPy they vary by several
percent from process to process (JIT and collector decisions; JIT code
needs C{--smc-check=all}, which this sets): compare medians of several
rounds there, or use C{bench/run.py}'s requests/s.

Needs valgrind, C{callgrind_control} and C{ab} (Debian: valgrind,
apache2-utils; C{bench/setup.sh}).  Under valgrind the gateway runs 50 to
100 times slower: about half a minute per CPython row with the defaults.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import procs  # noqa: E402
from run import TWISTD, measure_in_rounds, write_gateway_config  # noqa: E402

START_TIMEOUT = 300.0  # seconds: the gateway starts slowly under valgrind


def callgrind_total(path):
    """
    The instructions counted in a callgrind output file (its C{totals:}
    line, or C{summary:} when it has none).

    @raise ValueError: the file has neither.
    """
    found = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"(totals|summary):\s+(\d+)", line)
            if m:
                found[m.group(1)] = int(m.group(2))
    if "totals" in found:
        return found["totals"]
    if "summary" in found:
        return found["summary"]
    raise ValueError(f"{path}: no totals or summary line")


def ab_check(report, expected):
    """
    Check an ApacheBench report: C{expected} requests completed, none
    failed, none answered with other than 2xx.

    @raise RuntimeError: saying what went wrong.
    """
    complete = re.search(r"^Complete requests:\s+(\d+)", report, re.M)
    failed = re.search(r"^Failed requests:\s+(\d+)", report, re.M)
    non2xx = re.search(r"^Non-2xx responses:\s+(\d+)", report, re.M)
    if complete is None or int(complete.group(1)) != expected:
        raise RuntimeError(f"ab completed {complete.group(1) if complete else 'no'} of {expected} requests")
    if failed is not None and int(failed.group(1)):
        raise RuntimeError(f"ab: {failed.group(1)} requests failed")
    if non2xx is not None and int(non2xx.group(1)):
        raise RuntimeError(f"ab: {non2xx.group(1)} answers were not 2xx")


def named(values, what):
    """C{["NAME=VALUE", ...]} as a dict; a value alone is named "gateway"."""
    result = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            name, value = "gateway", item
        if not name or not value:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {item!r}")
        result[name] = value
    return result


def rows_of(args):
    """
    The rows to measure: C{[{"name", "config", "checkout", "python"}]} in
    the order their configs were given.
    """
    configs = named(args.gateway_config, "--gateway-config") or {
        "gateway": os.path.join(HERE, "scenarios", "filters-off.yaml")
    }
    checkouts = named(args.checkout, "--checkout")
    pythons = named(args.gateway_python, "--gateway-python")
    for what, given in (("--checkout", checkouts), ("--gateway-python", pythons)):
        unknown = set(given) - set(configs)
        if unknown:
            raise SystemExit(f"{what}: no --gateway-config row named {', '.join(sorted(unknown))}")
    return [
        {
            "name": name,
            "config": os.path.abspath(config),
            "checkout": os.path.abspath(checkouts.get(name, REPO)),
            "python": pythons.get(name, sys.executable),
        }
        for name, config in configs.items()
    ]


def measure(args, row, tmpdir, processes, origin, index):
    """Start C{row}'s gateway under callgrind, count C{args.requests}; stop it."""
    with open(row["config"]) as f:
        template = f.read()
    port = procs.free_port()
    config = os.path.join(tmpdir, f"{row['name']}-{index}.yaml")
    headers, twistd_args = write_gateway_config(template, config, port, procs.free_port(), origin, tmpdir)
    out = os.path.join(tmpdir, f"{row['name']}-{index}.callgrind")
    env = dict(os.environ, PYTHONHASHSEED="0")
    checkout = row["checkout"]
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (checkout, os.path.join(checkout, "bench"), HERE, env.get("PYTHONPATH")) if p
    )
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all",
        f"--callgrind-out-file={out}", row["python"], "-c", TWISTD,
        "-n", "--pidfile=", *twistd_args, "gateway", "--config", config,
    ]
    log_path = os.path.join(tmpdir, f"{row['name']}-{index}.log")
    gateway = processes.start(argv, f"{row['name']} (callgrind)", log_path, env=env, cwd=checkout)
    ab = ["ab", "-q", "-k", "-c", str(args.concurrency)]
    for header in headers:
        ab += ["-H", header]
    url = f"http://127.0.0.1:{port}/"
    try:
        procs.wait_port(port, START_TIMEOUT, proc=gateway)
        procs.wait_http(port, "/", START_TIMEOUT, proc=gateway, headers=headers)
        if args.warmup_requests:
            warm = _run(ab + ["-n", str(args.warmup_requests), url], args.timeout)
            ab_check(warm, args.warmup_requests)
        _run(["callgrind_control", "-i", "on", str(gateway.pid)], 60)
        report = _run(ab + ["-n", str(args.requests), url], args.timeout)
        _run(["callgrind_control", "-i", "off", str(gateway.pid)], 60)
        ab_check(report, args.requests)
    except Exception:
        print(procs.tail(log_path), file=sys.stderr)
        raise
    finally:
        processes.stop(gateway, timeout=120.0)  # callgrind writes its counts on exit
    return callgrind_total(out) / args.requests


def _run(argv, timeout):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def render(results):
    """The table: each row's median instructions per request, its ratio to the first row's, every count."""
    base = statistics.median(results[0]["counts"]) if results and results[0]["counts"] else None
    width = max([len("row")] + [len(r["name"]) for r in results])
    lines = [f"{'row':<{width}}  {'instructions/request':>20}  {'ratio':>6}  counts"]
    for r in results:
        if not r["counts"]:
            lines.append(f"{r['name']:<{width}}  {'-':>20}  {'-':>6}  (not measured)")
            continue
        median = statistics.median(r["counts"])
        ratio = f"{median / base:.4f}" if base else "-"
        counts = ", ".join(f"{c:,.0f}" for c in r["counts"])
        lines.append(f"{r['name']:<{width}}  {median:>20,.0f}  {ratio:>6}  {counts}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway-config", action="append", default=[], metavar="[NAME=]FILE",
                   help="a row: gateway YAML with bench/run.py's placeholders (default: filters-off)")
    p.add_argument("--checkout", action="append", default=[], metavar="NAME=DIR",
                   help="the checkout whose gateway row NAME runs (default: this one)")
    p.add_argument("--gateway-python", action="append", default=[], metavar="NAME=PATH",
                   help="interpreter of row NAME (default: this one)")
    p.add_argument("--requests", type=int, default=2000, help="requests counted per row (2000)")
    p.add_argument("--warmup-requests", type=int, default=1000,
                   help="requests before counting starts (1000; PyPy's JIT wants 20000)")
    p.add_argument("--concurrency", type=int, default=16, help="ab's concurrent connections (16)")
    p.add_argument("--repeat", type=int, default=2, help="rounds of every row (2)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one ab run may take (1800)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.repeat < 1 or args.concurrency < 1 or args.warmup_requests < 0:
        p.error("--requests, --repeat and --concurrency must be at least 1, --warmup-requests at least 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = rows_of(args)
    for tool in ("valgrind", "callgrind_control", "ab", "nginx"):
        if not subprocess.run(["sh", "-c", f"command -v {tool} || test -x /usr/sbin/{tool}"],
                              capture_output=True).returncode == 0:
            sys.exit(f"{tool} is not installed (bench/setup.sh)")
    results = [{"name": row["name"], "counts": []} for row in rows]

    def one(row, round_, index, tmpdir, processes, origin):
        count = measure(args, row, tmpdir, processes, origin, round_)
        results[index]["counts"].append(count)
        print(f"round {round_ + 1}: {row['name']}: {count:,.0f} instructions/request", flush=True)

    measure_in_rounds("bench-instructions-", rows, args.repeat, one)
    print()
    print(render(results))


if __name__ == "__main__":
    main()
