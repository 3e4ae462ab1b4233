#!/usr/bin/env python
"""
Scaling with --workers: the gateway's requests/s with 1 and with N worker
processes, side by side in one run, in front of the bench's nginx origin.

    python bench/workers.py [--workers 1 2] [--cpu-budget 0.5]
                            [--gateway-config bench/scenarios/typical-rl.yaml]

The gateway (master and workers) runs on --proxy-cpus, wrk and the origin
on --load-cpu, as in bench/run.py.  On a machine with a core per worker
and one more for the load, give each worker its own core
(``--proxy-cpus 0-1 --load-cpu 2``) and no budget.

On a smaller machine (two cores: the load needs one), --cpu-budget C gives
every serving process a CPU budget of C cores through a cgroup of its own
(CFS bandwidth: cgroup v1's cpu.cfs_quota_us or v2's cpu.max, which needs
root), and keeps the proxy cores equally busy in every row: a row with
fewer workers than the largest gets, for each missing worker, a busy loop
with the same budget.  With ``--workers 1 2 --cpu-budget 0.5`` on one proxy
core, the one-worker row is a worker and a busy loop at half a core each,
the two-worker row two workers at half a core each: the question is whether
a second worker doubles what one worker does with the same CPU.  A worker
gets no more than its budget, so a worker with few connections shows as
lost requests/s rather than being made up for by the others.

For each row: requests/s (the median of --repeat measurements), the ratio
to the one-worker row, p99, each serving process's CPU use and its share of
the client connections (counted halfway through the measurement).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import procs  # noqa: E402
import wrkrun  # noqa: E402
from origin import Origin  # noqa: E402
from run import write_gateway_config  # noqa: E402

DEFAULT_CONFIG = os.path.join(HERE, "scenarios", "filters-off.yaml")
START_TIMEOUT = 30.0  # seconds for the gateway and all its workers to serve


class CpuBudgets:
    """
    CPU budgets for processes, one cgroup each (CFS bandwidth control).

    @param period_us: the CFS period, microseconds; a process runs at most
        C{cores * period_us} per period.  A short period spreads the
        throttling finely (10 ms: 5 ms on, 5 ms off at half a core).
    @raise RuntimeError: if no writable cgroup cpu controller is found.
    """

    V1 = "/sys/fs/cgroup/cpu"
    V2 = "/sys/fs/cgroup"

    def __init__(self, period_us=10_000):
        self.period_us = period_us
        self.paths = []
        self.note = ""
        controllers = os.path.join(self.V2, "cgroup.controllers")
        if os.path.exists(controllers):
            with open(controllers) as f:
                if "cpu" not in f.read().split():
                    raise RuntimeError("cgroup v2 without the cpu controller")
            self.root, self.v2 = self.V2, True
            try:  # let child groups use the controller
                with open(os.path.join(self.V2, "cgroup.subtree_control"), "w") as f:
                    f.write("+cpu")
            except OSError as e:  # (then creating cpu.max below fails and says so)
                self.note = f"enabling cpu for child groups failed: {e}"
        elif os.path.exists(os.path.join(self.V1, "cpu.cfs_quota_us")):
            self.root, self.v2 = self.V1, False
        else:
            raise RuntimeError("no cgroup cpu controller under /sys/fs/cgroup")

    def limit(self, pid, cores):
        """
        Put C{pid} (all its threads) in a new group of at most C{cores}
        CPUs (a fraction of one, or more).

        @return: the group's directory.
        @raise RuntimeError: if the group cannot be made or set (not root,
            a read-only cgroup file system, a quota under 1 ms per period).
        """
        path = os.path.join(self.root, f"txgateway-bench-{os.getpid()}-{len(self.paths)}")
        try:
            os.mkdir(path)
            self.paths.append(path)
            quota = int(cores * self.period_us)
            if self.v2:
                self._write(path, "cpu.max", f"{quota} {self.period_us}")
            else:
                self._write(path, "cpu.cfs_period_us", str(self.period_us))
                self._write(path, "cpu.cfs_quota_us", str(quota))
            self._write(path, "cgroup.procs", str(pid))
        except OSError as e:
            why = f"; {self.note}" if self.note else ""
            raise RuntimeError(f"cannot set a CPU budget in {path}: {e}{why}")
        return path

    @staticmethod
    def _write(path, name, value):
        with open(os.path.join(path, name), "w") as f:
            f.write(value)

    def throttled(self, path):
        """How many periods the group's processes were throttled in so far."""
        with open(os.path.join(path, "cpu.stat")) as f:
            stat = dict(line.split() for line in f if line.strip())
        return int(stat.get("nr_throttled", 0))

    def remove_all(self):
        """Remove the groups (their processes must have ended); never raises."""
        for path in reversed(self.paths):
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # a process still exiting
                    time.sleep(0.1)
        self.paths = []


def fillers_for(workers, largest):
    """
    How many busy loops keep the proxy cores as busy with C{workers}
    workers as with C{largest}: one per missing worker.
    """
    return max(0, largest - workers)


def established_inodes(port, tables=("/proc/net/tcp", "/proc/net/tcp6")):
    """
    The socket inodes of the established TCP connections whose local port
    is C{port}, read from C{/proc/net/tcp} (and C{tcp6}).

    @rtype: L{set} of L{int}
    """
    found = set()
    for table in tables:
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st ... inode (field 10)
            if len(fields) > 9 and fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def sockets_of(pid):
    """The socket inodes among C{pid}'s open file descriptors."""
    found = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]$", target)
        if m:
            found.add(int(m.group(1)))
    return found


def connections_by_pid(port, pids):
    """
    How many of the client connections to C{port} each of C{pids} holds.

    @rtype: L{dict} of L{int} to L{int}
    """
    client = established_inodes(port)
    return {pid: len(sockets_of(pid) & client) for pid in pids}


def log_format_for(twistd_args):
    """
    The C{twist --log-format} for a template's C{bench-twistd-arg}s: C{json}
    for C{--logger=jsonlog.observer} (bench/run.py's JSON lines), else
    C{text}.

    @raise ValueError: for any other twistd argument.
    """
    fmt = "text"
    for arg in twistd_args:
        if arg == "--logger=jsonlog.observer":
            fmt = "json"
        else:
            raise ValueError(f"bench/workers.py runs twist, which has no {arg!r}")
    return fmt


def serving_processes(master, workers, log_path, deadline):
    """
    The processes that serve requests: the gateway itself with one worker,
    else its workers, once every one of them has logged that it listens.
    """
    if workers == 1:
        return [master.pid]
    while True:
        with open(log_path, errors="replace") as f:
            # (a text line, or a JSON event with the format and its prefix)
            listening = sum(1 for line in f if "starting on" in line and "GatewaySite" in line)
        kids = procs._children_of(master.pid)
        if listening >= workers and len(kids) >= workers:
            return kids
        if master.poll() is not None:
            raise RuntimeError(f"the gateway exited:\n{procs.tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers did not start in time:\n{procs.tail(log_path)}")
        time.sleep(0.1)


def measure_row(args, tmpdir, processes, origin, workers, largest, budgets):
    """Start the gateway with C{workers} workers, warm it up, measure it; stop it."""
    with open(args.gateway_config) as f:
        template = f.read()
    port = procs.free_port()
    config = os.path.join(tmpdir, f"gateway-{workers}.yaml")
    headers, twistd_args = write_gateway_config(template, config, port, procs.free_port(), origin, tmpdir)
    log_format = log_format_for(twistd_args)
    wrk_extra = [a for h in headers for a in ("-H", h)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, HERE, env.get("PYTHONPATH")) if p)
    log_path = os.path.join(tmpdir, f"gateway-{workers}.log")
    # twist, not twistd: the workers run under twist with the master's
    # --log-format, so that every row logs alike.
    argv = ["taskset", "-c", args.proxy_cpus, args.python, "-m", "twisted", "--log-format", log_format,
            "gateway", "--config", config, "--workers", str(workers)]
    gateway = processes.start(argv, f"gateway-{workers}", log_path, env=env, cwd=REPO)
    fillers, groups = [], []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        procs.wait_port(port, START_TIMEOUT, proc=gateway)
        procs.wait_http(port, "/", START_TIMEOUT, proc=gateway, headers=headers)
        serving = serving_processes(gateway, workers, log_path, deadline)
        for _ in range(fillers_for(workers, largest) if budgets else 0):
            fillers.append(processes.start(
                ["taskset", "-c", args.proxy_cpus, sys.executable, "-c", "while True: pass"],
                "busy loop", os.path.join(tmpdir, "busy.log"),
            ))
        if budgets:
            groups = [budgets.limit(pid, args.cpu_budget) for pid in serving + [f.pid for f in fillers]]
        url = f"http://127.0.0.1:{port}/"
        if args.warmup:
            wrkrun.run(url, args.warmup, args.connections, cpu=args.load_cpu, extra=wrk_extra)
        runs = []
        for _ in range(args.repeat):
            if args.wait_quiet:
                procs.wait_quiet(args.wait_quiet, threshold_pct=10.0 + 100.0 * len(fillers) * (args.cpu_budget or 0))
            held = {}
            counter = threading.Timer(args.duration / 2, lambda: held.update(connections_by_pid(port, serving)))
            before = {pid: sum(procs.cpu_seconds(pid)) for pid in serving}
            t0 = time.monotonic()
            counter.start()
            try:
                result = wrkrun.run(url, args.duration, args.connections, cpu=args.load_cpu, extra=wrk_extra)
            finally:
                counter.cancel()
            wall = time.monotonic() - t0
            result["cpu_pct"] = [round(100 * (sum(procs.cpu_seconds(p)) - before[p]) / wall) for p in serving]
            result["connections"] = [held.get(p) for p in serving]
            result.pop("raw", None)
            runs.append(result)
        return {
            "workers": workers,
            "runs": runs,
            "rps": statistics.median(r["rps"] for r in runs),
            "throttled": [budgets.throttled(g) for g in groups] if budgets else None,
        }
    finally:
        for proc in fillers:
            processes.stop(proc)
        processes.stop(gateway, timeout=15.0)


HEADER = f"{'workers':>7}  {'req/s':>8}  {'ratio':>5}  {'p99 ms':>7}  cpu % per process; connections per process"


def row_lines(row, base):
    """A row's lines, a measurement each, the ratio against C{base} req/s (or none)."""
    ratio = f"{row['rps'] / base:5.2f}" if base else "    -"
    lines = []
    for i, run in enumerate(row["runs"]):
        lead = f"{row['workers']:>7}  {row['rps']:>8.0f}  {ratio}" if i == 0 else " " * 24
        cpu = "/".join(str(c) for c in run["cpu_pct"])
        conns = "/".join("?" if c is None else str(c) for c in run["connections"])
        lines.append(f"{lead}  {run.get('p99_ms') or 0:>7.1f}  {run['rps']:.0f} req/s; cpu {cpu}; conns {conns}")
    return lines


def render(rows):
    """The table: one line per measurement, the ratio against the first row."""
    base = rows[0]["rps"] if rows and rows[0]["rps"] else None
    return "\n".join([HEADER] + [line for row in rows for line in row_lines(row, base)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    p.add_argument("--warmup", type=int, default=10, help="seconds of load before measuring")
    p.add_argument("--repeat", type=int, default=3, help="measurements per row (median shown)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--gateway-config", default=DEFAULT_CONFIG,
                   help="gateway YAML with bench/run.py's placeholders")
    p.add_argument("--python", default=sys.executable, help="the gateway's interpreter")
    p.add_argument("--proxy-cpus", default="0", help="taskset CPU list of the gateway")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU of wrk and the origin")
    p.add_argument("--cpu-budget", type=float, default=None,
                   help="cores per serving process (a cgroup each; root)")
    p.add_argument("--period-us", type=int, default=10_000, help="CFS period of the budgets")
    p.add_argument("--wait-quiet", type=float, default=10.0,
                   help="seconds at most to wait for an idle machine before each measurement")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.workers[0] != 1:
        p.error("--workers must start with 1 (the baseline of the ratios)")
    if args.cpu_budget is not None and args.cpu_budget * args.period_us < 1000:
        p.error("--cpu-budget x --period-us must be at least 1000 (the kernel's smallest quota, 1 ms)")
    return args


def main(argv=None):
    args = parse_args(argv)
    for tool in ("wrk", "nginx", "taskset"):
        if not subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).stdout:
            sys.exit(f"{tool} is not installed (bench/setup.sh)")
    budgets = None
    if args.cpu_budget is not None:
        try:
            budgets = CpuBudgets(args.period_us)
        except RuntimeError as e:
            sys.exit(str(e))
    procs.interrupt_on_signals()
    processes = procs.Processes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmpdir:
        try:
            origin = Origin(tmpdir).start(processes, cpu=args.load_cpu)
            budget = f", {args.cpu_budget} cores each (cgroup)" if budgets else ""
            print(f"gateway on cpus {args.proxy_cpus}{budget}; wrk -c{args.connections} and the origin "
                  f"on cpu {args.load_cpu}; {args.warmup} s warm-up, {args.repeat} x {args.duration} s; "
                  f"{os.path.relpath(args.gateway_config, REPO)}", flush=True)
            for workers in args.workers:
                rows.append(measure_row(args, tmpdir, processes, origin, workers, max(args.workers), budgets))
                print("\n".join(row_lines(rows[-1], rows[0]["rps"])), flush=True)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
        finally:
            processes.stop_all()
            if budgets:
                budgets.remove_all()
    print()
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
