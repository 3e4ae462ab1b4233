"""
Process and socket helpers for the benchmark harness.

Every process the harness starts goes through L{start}, which records it in a
L{Processes} registry; L{Processes.stop_all} stops them by PID (and the
children they forked, found before the stop, by PID too), so nothing outlives
the run even after an exception or Ctrl-C.  No fixed sleeps: readiness is a
bounded poll of the listening port (L{wait_port}) or of an HTTP answer
(L{wait_http}).
"""

import http.client
import os
import shlex
import signal
import socket
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(host="127.0.0.1"):
    """
    Ask the kernel for a free ephemeral TCP port on C{host}.

    The socket is closed before returning, so another process could in
    principle take the port before ours binds it; on a bench machine that
    race does not happen in practice.

    @rtype: L{int}
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port, timeout, proc=None, host="127.0.0.1"):
    """
    Poll until C{host:port} accepts a TCP connection.

    @param float timeout: seconds to wait at most.
    @param proc: if given, a L{subprocess.Popen} whose early exit aborts the
        wait.
    @raise RuntimeError: if the port did not accept in time or C{proc} exited.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.pid} exited with {proc.returncode} "
                f"before port {port} accepted"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"port {port} did not accept within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def http_get(port, path="/", timeout=5.0, host="127.0.0.1", headers=()):
    """
    One HTTP/1.1 GET; return C{(status, body)}.

    @param headers: C{"Name: value"} strings sent with it.

    @raise OSError: or L{http.client.HTTPException} on connection failure.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={k.strip(): v.strip() for k, v in (h.split(":", 1) for h in headers)})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(port, path, timeout, expect_len=None, proc=None, headers=()):
    """
    Poll until C{GET path} on C{port} answers 200 (with a body of
    C{expect_len} bytes, if given).  A proxy whose port accepts but whose
    upstream is not wired yet (a gateway still probing its backends, say)
    answers 502/503 for a moment; this waits that out, bounded.

    @return: the last C{(status, body length)} seen.
    @raise RuntimeError: if no good answer came in C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}")
        try:
            status, body = http_get(
                port, path, timeout=max(0.5, min(5.0, timeout)), headers=headers
            )
            last = (status, len(body))
            if status == 200 and (expect_len is None or len(body) == expect_len):
                return last
        except (OSError, http.client.HTTPException) as e:
            last = (None, repr(e))
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"GET {path} on port {port} gave no good answer within "
                f"{timeout:.0f} s (last: status/length {last})"
            )
        time.sleep(0.1)


def _children_of(pid):
    """
    PIDs of all live descendants of C{pid}, read from C{/proc}.

    @rtype: L{list} of L{int}
    """
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after
        # the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid):
    """
    User and system CPU seconds used so far by C{pid} and its live
    descendants (nginx's master plus its worker, say).

    @rtype: L{tuple} of two L{float}
    """
    user = system = 0
    for p in [pid] + _children_of(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[0] is field 3 (state); utime and stime are fields 14, 15.
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def machine_user_seconds():
    """
    User-mode CPU seconds (user plus nice, guest included) spent by every
    process on the machine since boot, from C{/proc/stat}.  Minus what our
    own processes used, it shows whether someone else was busy during a
    measurement.

    @rtype: L{float}
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return (int(fields[1]) + int(fields[2])) / CLK_TCK


def core_busy_seconds(cpu):
    """
    CPU seconds core C{cpu} has spent busy since boot (everything but idle
    and iowait: our processes, the kernel's softirq work for the loopback
    traffic, and anything else that ran there), from C{/proc/stat}.

    @rtype: L{float}
    """
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                # user nice system idle iowait irq softirq steal guest
                # guest_nice; guest time is already counted in user.
                values = [int(x) for x in line.split()[1:9]]
                return (sum(values) - values[3] - values[4]) / CLK_TCK
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def machine_busy_pct(interval=1.0):
    """
    How busy all CPUs together were over the next C{interval} seconds, in
    percent of one core (200 = two cores fully busy).

    @rtype: L{float}
    """

    def busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / CLK_TCK

    t0, b0 = time.monotonic(), busy()
    time.sleep(interval)
    return 100.0 * (busy() - b0) / (time.monotonic() - t0)


def wait_quiet(max_seconds, threshold_pct=10.0):
    """
    Wait, at most C{max_seconds}, until the machine is idle: less than
    C{threshold_pct} of one core busy over one second.  Used between
    measurements, when our own processes are idle.

    @return: C{(seconds waited, last busy percentage)}.
    """
    start = time.monotonic()
    while True:
        pct = machine_busy_pct()
        waited = time.monotonic() - start
        if pct < threshold_pct or waited >= max_seconds:
            return waited, pct


def rss_kib(pid):
    """
    Resident set size in KiB of C{pid} plus its live descendants.

    @rtype: L{int}
    """
    total = 0
    for p in [pid] + _children_of(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


class Processes:
    """
    The processes this run started, stopped by PID in reverse start order.
    """

    def __init__(self):
        self._procs = []

    def start(self, argv, name, log_path, cpu=None, env=None, cwd=None):
        """
        Start C{argv} (pinned to C{cpu} with C{taskset} when given), its
        stdout and stderr going to C{log_path}, in a session of its own so
        that a Ctrl-C on the terminal reaches only the harness, which then
        stops it in order.

        @rtype: L{subprocess.Popen}
        """
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + list(argv)
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc.bench_name = name
        proc.bench_log = log_path
        self._procs.append(proc)
        return proc

    def stop(self, proc, timeout=5.0):
        """
        Stop C{proc}: SIGTERM, wait up to C{timeout} seconds, then SIGKILL;
        descendants it leaves behind (found before the signal) get the same.
        Never raises.
        """
        if proc in self._procs:
            self._procs.remove(proc)
        if proc.poll() is not None:
            return
        try:
            kids = _children_of(proc.pid)
        except OSError:
            kids = []
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                proc.kill()
                proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        for kid in kids:
            # Only PIDs recorded as our process's descendants a moment ago.
            while _alive(kid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(kid):
                try:
                    os.kill(kid, signal.SIGKILL)
                except OSError:
                    pass

    def stop_all(self):
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat[stat.rfind(")") + 2 :].split()[0]
    return state != "Z"


def interrupt_on_signals():
    """
    Make SIGTERM, and SIGINT even when inherited as ignored (a background
    job of a non-interactive shell), raise L{KeyboardInterrupt}, so that
    C{finally} blocks stop what was started.

    @return: a callable restoring the previous handlers.
    """

    def raise_(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, raise_),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    return lambda: [signal.signal(s, h) for s, h in old.items()]


def tail(path, lines=20):
    """
    The last C{lines} lines of the text file at C{path}, or C{""}.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()[-16384:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
