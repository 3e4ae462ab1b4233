#!/usr/bin/env python
"""
Latency percentiles beside PyPy's collector pauses: how often the
collector stops the gateway, for how long, and what share of the requests
those pauses can hold up, against the p99 and p99.9 that wrk measures in
the same seconds.

    python bench/pauses.py \\
        --gateway-config bench/scenarios/typical-rl-jsonl.yaml \\
        --gateway-config nomajor=bench/scenarios/typical-rl-jsonl.yaml \\
        --gateway-env nomajor:PYPY_GC_MIN=8GB --rounds 3

Each row starts a gateway on C{--gateway-python} (by default the PyPy of
C{.venv-pypy}, as README.rst makes it) pinned to core C{--proxy-cpu} (0), with
C{PYPY_GC_NURSERY=32MB PYPY_GC_INCREMENT_STEP=2MB} (as
C{etc/txgateway.service}; C{--gateway-env} overrides) and
C{PYPYLOG=gc-minor,gc-collect-step} into a file, in front of the bench's
nginx origin on core C{--load-cpu} (1).  wrk (1 thread, C{--connections}
keep-alive connections, on that core too) warms it up for C{--warmup}
seconds, then measures C{--duration} seconds; only the log written
during those seconds is read.  Rows alternate in C{--rounds} rounds.

The table's columns: requests/s; wrk's errors (socket errors and non-2xx
answers); mean, p50, p99 and p99.9 latency (ms); p99 divided by the
mean; minor collections a second and their median length (ms); steps of
major collections longer than C{--pause-ms} a second, how many of those
a second were sweeping steps, and the longest (ms); "held %", the share of the requests
those long steps can hold up (each holds up the requests in flight, one
per connection: steps x connections / requests).  When "held %" is under
1, the long steps cannot set the p99 by themselves; and the
timestamp counter's rate (below).  A row that fails (its gateway does
not start, wrk fails) is reported and the others go on.

PyPy's log stamps events in CPU timestamp-counter ticks; the ticks per
second are taken from the measured window itself (its first and last
events against wrk's duration), which the table shows as "tsc GHz".
Under CPython there is no log, and the collector columns stay empty.
"""

import argparse
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import procs  # noqa: E402
import wrkrun  # noqa: E402
from run import TWISTD, measure_in_rounds, write_gateway_config  # noqa: E402

START_TIMEOUT = 60.0  # seconds
DEFAULT_ENV = {"PYPY_GC_NURSERY": "32MB", "PYPY_GC_INCREMENT_STEP": "2MB"}
PERCENTILES = (50, 99, 99.9)

#: A wrk script that prints the mean and chosen percentiles in ms, which
#: wrk's own report rounds or leaves out (p99.9).
LUA = """
done = function(summary, latency, requests)
  io.write(string.format("LATENCY mean=%.3f", latency.mean / 1000))
  for _, p in ipairs({PERCENTILES}) do
    io.write(string.format(" p%s=%.3f", p, latency:percentile(p) / 1000))
  end
  io.write("\\n")
end
""".replace("PERCENTILES", ", ".join(str(p) for p in PERCENTILES))

# Some PyPy versions write a thread number ("3# ") before the timestamp.
_OPEN = re.compile(r"(?:\d+# )?\[([0-9a-f]+)\] \{([\w-]+)")
_CLOSE = re.compile(r"(?:\d+# )?\[([0-9a-f]+)\] ([\w-]+)\}")


def parse_gc_log(text):
    """
    The collections in a C{PYPYLOG=gc-minor,gc-collect-step} log.

    @param str text: the log (it may start or end in the middle of a
        section; such sections are skipped).
    @return: C{(minors, steps)}: lists of C{(start, ticks)} for each minor
        collection, and of C{(start, ticks, state)} for each step of a
        major collection, C{state} being the state it started in
        (C{"MARKING"}, C{"SWEEPING"}, ...); C{start} and C{ticks} in
        timestamp-counter ticks.
    """
    minors, steps = [], []
    open_ = {}
    for line in text.splitlines():
        m = _OPEN.match(line)
        if m:
            open_[m.group(2)] = (int(m.group(1), 16), [])
            continue
        m = _CLOSE.match(line)
        if m:
            began = open_.pop(m.group(2), None)
            if began is None:
                continue
            start, body = began
            ticks = int(m.group(1), 16) - start
            if m.group(2) == "gc-minor":
                minors.append((start, ticks))
            elif m.group(2) == "gc-collect-step":
                state = next((b.split(":", 1)[1].strip() for b in body if b.startswith("starting gc state:")), "?")
                steps.append((start, ticks, state))
            continue
        for _, body in open_.values():
            body.append(line)
    return minors, steps


def summarize(minors, steps, seconds, requests, connections, pause_ms):
    """
    Rates and lengths of the collector's pauses in a measured window.

    @param seconds: the window's length (wrk's duration), in seconds.
    @param requests: requests completed in it.
    @param connections: requests in flight (wrk's connections).
    @param pause_ms: steps longer than this many milliseconds count as long.
    @return: a L{dict}: C{tsc_ghz} (ticks per nanosecond, from the first
        and last events against C{seconds}), C{minor_per_s},
        C{minor_median_ms}, C{long_per_s}, C{long_sweep_per_s} (the long
        steps that were sweeping), C{long_max_ms} and C{held_pct}; empty
        when the window has fewer than two events.
    """
    starts = sorted([s for s, _ in minors] + [s for s, _, _ in steps])
    if len(starts) < 2 or seconds <= 0:
        return {}
    ticks_per_ms = (starts[-1] - starts[0]) / (seconds * 1e3)
    long_ = [(t / ticks_per_ms, state) for _, t, state in steps if t / ticks_per_ms > pause_ms]
    return {
        "tsc_ghz": ticks_per_ms / 1e6,
        "minor_per_s": len(minors) / seconds,
        "minor_median_ms": statistics.median(t for _, t in minors) / ticks_per_ms if minors else None,
        "long_per_s": len(long_) / seconds,
        "long_sweep_per_s": sum(state == "SWEEPING" for _, state in long_) / seconds,
        "long_max_ms": max(ms for ms, _ in long_) if long_ else None,
        "held_pct": 100.0 * len(long_) * connections / requests if requests else None,
    }


def parse_latency(output):
    """
    The line that L{LUA} prints: C{{"mean": ms, "p50": ms, "p99": ms, "p99.9": ms}}.

    @raise ValueError: when wrk printed no such line.
    """
    m = re.search(r"^LATENCY (.*)$", output, re.M)
    if not m:
        raise ValueError("no LATENCY line in wrk's output")
    return {k: float(v) for k, v in (pair.split("=") for pair in m.group(1).split())}


def measure(args, row, tmpdir, processes, origin, index):
    """Start C{row}'s gateway, warm it up, measure; return the table's cells for it."""
    with open(row["config"]) as f:
        template = f.read()
    port = procs.free_port()
    config = os.path.join(tmpdir, f"{row['name']}-{index}.yaml")
    headers, twistd_args = write_gateway_config(template, config, port, procs.free_port(), origin, tmpdir)
    log = os.path.join(tmpdir, f"{row['name']}-{index}.pypylog")
    env = dict(os.environ, **DEFAULT_ENV)
    env.update(row["env"])
    env["PYPYLOG"] = f"gc-minor,gc-collect-step:{log}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, HERE, env.get("PYTHONPATH")) if p)
    argv = [row["python"], "-c", TWISTD, "-n", "--pidfile=", *twistd_args, "gateway", "--config", config]
    out = os.path.join(tmpdir, f"{row['name']}-{index}.log")
    gateway = processes.start(argv, row["name"], out, cpu=args.proxy_cpu, env=env, cwd=REPO)
    script = os.path.join(tmpdir, "latency.lua")
    with open(script, "w") as f:
        f.write(LUA)
    extra = [x for h in headers for x in ("-H", h)]
    url = f"http://127.0.0.1:{port}/"
    try:
        procs.wait_port(port, START_TIMEOUT, proc=gateway)
        procs.wait_http(port, "/", START_TIMEOUT, proc=gateway, headers=headers)
        if args.warmup > 0:
            wrkrun.run(url, args.warmup, args.connections, cpu=args.load_cpu, extra=extra)
        mark = os.path.getsize(log) if os.path.exists(log) else 0
        result = wrkrun.run(url, args.duration, args.connections, cpu=args.load_cpu, extra=extra + ["-s", script])
        end = os.path.getsize(log) if os.path.exists(log) else 0
    except Exception:
        print(procs.tail(out), file=sys.stderr)
        raise
    finally:
        processes.stop(gateway)
    cells = {"rps": result["rps"], "errors": result["errors"]}
    cells.update(parse_latency(result["raw"]))
    if end > mark:
        with open(log, "rb") as f:
            f.seek(mark)
            text = f.read(end - mark).decode("ascii", "replace")
        minors, steps = parse_gc_log(text)
        if not minors and not steps:
            print(f"{row['name']}: {end - mark} bytes of PYPYLOG but no collection read from them", file=sys.stderr)
        cells.update(summarize(minors, steps, result["seconds"], result["requests"], args.connections, args.pause_ms))
    return cells


COLUMNS = (
    ("req/s", "rps", ",.0f"), ("errors", "errors", "d"), ("mean", "mean", ".2f"), ("p50", "p50", ".2f"), ("p99", "p99", ".2f"),
    ("p99.9", "p99.9", ".2f"), ("p99/mean", None, ".2f"), ("minor/s", "minor_per_s", ".1f"),
    ("minor ms", "minor_median_ms", ".2f"), ("long/s", "long_per_s", ".2f"), ("sweep/s", "long_sweep_per_s", ".2f"),
    ("long max", "long_max_ms", ".1f"),
    ("held %", "held_pct", ".2f"), ("tsc GHz", "tsc_ghz", ".2f"),
)


def render(results):
    """The table: one line per row and round, in the order measured."""
    width = max([len("row")] + [len(r["name"]) for r in results])
    head = f"{'round':>5}  {'row':<{width}}  " + "  ".join(f"{title:>8}" for title, _, _ in COLUMNS)
    lines = [head]
    for r in results:
        cells = []
        for title, key, fmt in COLUMNS:
            if key is None:
                value = r["cells"]["p99"] / r["cells"]["mean"] if r["cells"].get("mean") else None
            else:
                value = r["cells"].get(key)
            cells.append(f"{format(value, fmt):>8}" if value is not None else f"{'-':>8}")
        lines.append(f"{r['round']:>5}  {r['name']:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _named(option, spec):
    """C{NAME=VALUE} as C{(NAME, VALUE)}; a usage error otherwise."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{option} {spec}: want NAME=VALUE")
    return name, value


def rows_of(args):
    """
    The rows: C{[{"name", "config", "python", "env"}]}, from the options,
    in the order given.  C{--gateway-config} takes C{NAME=FILE} or FILE
    alone (the row "gateway"; so is a spec whose part before the first
    C{=} holds a C{/}), as C{bench/run.py} does.

    @raise SystemExit: a row named twice, a missing config file, or an
        option naming no row.
    """
    configs = {}
    for spec in args.gateway_config or [os.path.join(HERE, "scenarios", "typical-rl-jsonl.yaml")]:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or not name:
            name, path = "gateway", spec
        if name in configs:
            raise SystemExit(f"--gateway-config {spec}: a second row named {name}")
        if not os.path.isfile(path):
            raise SystemExit(f"--gateway-config {spec}: no such file {path}")
        configs[name] = os.path.abspath(path)
    pythons = dict(_named("--gateway-python", spec) for spec in args.gateway_python)
    envs = {name: {} for name in configs}
    for spec in args.gateway_env:
        name, sep, assignment = spec.partition(":")
        var, eq, value = assignment.partition("=")
        if not sep or not eq or not var:
            raise SystemExit(f"--gateway-env {spec}: want NAME:VAR=VALUE")
        if name not in configs:
            raise SystemExit(f"--gateway-env {spec}: no --gateway-config row named {name}")
        envs[name][var] = value
    unknown = set(pythons) - set(configs)
    if unknown:
        raise SystemExit(f"--gateway-python: no --gateway-config row named {', '.join(sorted(unknown))}")
    return [
        {"name": name, "config": config, "python": pythons.get(name, args.python), "env": envs[name]}
        for name, config in configs.items()
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway-config", action="append", default=[], metavar="[NAME=]FILE",
                   help="a row: gateway YAML with bench/run.py's placeholders (default: typical-rl-jsonl)")
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME:VAR=VALUE",
                   help="environment variable for row NAME only (after the PyPy defaults)")
    p.add_argument("--gateway-python", action="append", default=[], metavar="NAME=PATH",
                   help="interpreter of row NAME (default: --python)")
    p.add_argument("--python", default=os.path.join(REPO, ".venv-pypy", "bin", "python"),
                   help="interpreter of the rows (.venv-pypy/bin/python)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of every row (1)")
    p.add_argument("--warmup", type=int, default=30, help="seconds of load before measuring (30)")
    p.add_argument("--duration", type=int, default=20, help="seconds measured (20)")
    p.add_argument("--connections", type=int, default=64, help="wrk's keep-alive connections (64)")
    p.add_argument("--pause-ms", type=float, default=5.0, help="a step longer than this is long (5)")
    p.add_argument("--proxy-cpu", type=int, default=0, help="core of the gateway (0)")
    p.add_argument("--load-cpu", type=int, default=1, help="core of wrk and the origin (1)")
    args = p.parse_args(argv)
    if min(args.rounds, args.duration, args.connections) < 1 or args.warmup < 0:
        p.error("--rounds, --duration and --connections must be at least 1, --warmup at least 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = rows_of(args)
    for row in rows:
        if not os.path.exists(row["python"]):
            sys.exit(f"{row['python']}: no such interpreter (make .venv-pypy as README.rst says, or pass --python)")
    results = []

    def one(row, round_, index, tmpdir, processes, origin):
        try:
            cells = measure(args, row, tmpdir, processes, origin, f"{round_}-{index}")
        except (RuntimeError, ValueError, OSError) as e:
            print(f"round {round_ + 1}: {row['name']}: failed: {e}", file=sys.stderr, flush=True)
            return
        results.append({"round": round_ + 1, "name": row["name"], "cells": cells})
        print(f"round {round_ + 1}: {row['name']}: {cells['rps']:,.0f} req/s, "
              f"p99 {cells['p99']:.2f} ms, {cells['errors']} errors", flush=True)

    measure_in_rounds("bench-pauses-", rows, args.rounds, one, origin_cpu=args.load_cpu)
    print()
    print(render(results))


if __name__ == "__main__":
    main()
