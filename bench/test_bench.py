"""
Tests for the bench harness's pure parts: wrk report parsing, ratios, the
table.  Run with: python -m pytest bench/test_bench.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

import run  # noqa: E402
import wrkrun  # noqa: E402

REPORT = """\
Running 5s test @ http://127.0.0.1:41877/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.37ms    2.01ms  22.73ms   80.00%
    Req/Sec     6.57k   200.00     7.00k    70.00%
  Latency Distribution
     50%  598.00us
     75%   10.00ms
     90%   11.50ms
     99%    1.01s
  32670 requests in 5.00s, 8.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 12
Requests/sec:   6534.00
Transfer/sec:      1.62MB
"""


def test_parse_full_report():
    r = wrkrun.parse(REPORT)
    assert r["rps"] == 6534.0
    assert r["requests"] == 32670
    assert r["seconds"] == 5.0
    assert r["p50_ms"] == pytest.approx(0.598)
    assert r["p99_ms"] == pytest.approx(1010.0)
    assert r["bytes_per_s"] == pytest.approx(1.62 * 1024 * 1024)
    assert r["socket_errors"] == {"connect": 0, "read": 2, "write": 0, "timeout": 3}
    assert r["non_2xx"] == 12
    assert r["errors"] == 17


def test_parse_clean_report_has_no_errors():
    clean = "\n".join(
        line for line in REPORT.splitlines()
        if "errors" not in line and "Non-2xx" not in line
    )
    r = wrkrun.parse(clean)
    assert r["errors"] == 0


def test_parse_rejects_garbage():
    with pytest.raises(ValueError):
        wrkrun.parse("unable to connect to 127.0.0.1:1 Connection refused")


def _row(peer, rps, scenario="small", variant=None, **kw):
    row = {
        "peer": peer, "variant": variant, "label": run.LABELS[peer], "scenario": scenario,
        "status": "ok", "rps": rps, "bytes_per_s": 1e6, "p50_ms": 1.0, "p99_ms": 2.0,
        "errors": 0, "proxy_cpu_pct": 99.0, "proxy_core_busy_pct": 100.0,
        "load_core_busy_pct": 50.0, "others_cpu_pct": 0.0,
    }
    row.update(kw)
    return row


def test_ratios_against_plain_gateway():
    rows = [
        _row("nginx", 100000),
        _row("twisted", 5000),
        _row("gateway", 10000, variant="filters"),
        _row("gateway", 20000),
        {"peer": "go", "variant": None, "label": "go", "scenario": "small",
         "status": "skipped: no go"},
    ]
    base = run.add_ratios(rows)
    assert base == {"small": "gateway"}
    assert rows[0]["gw_ratio"] == pytest.approx(0.2)
    assert rows[1]["gw_ratio"] == pytest.approx(4.0)
    assert rows[2]["gw_ratio"] == pytest.approx(2.0)
    assert "gw_ratio" not in rows[4]
    run.add_tail_ratios(rows, 64)
    # p99 2 ms at 100,000 req/s: the mean in flight is 64 / 100,000 s = 0.64 ms
    assert rows[0]["p99_over_mean"] == pytest.approx(2.0 / 0.64)
    assert rows[1]["p99_over_mean"] == pytest.approx(2.0 / 12.8)
    assert "p99_over_mean" not in rows[4]
    lines, notes = run.table(rows, None)
    assert "p99/mean" in lines[0]
    assert any("0.20" in line and "3.12" in line and "nginx" in line for line in lines)
    assert notes == ["go: skipped: no go"]
    assert run.summary(rows, base) == [
        "gateway/nginx (small): 0.20 of nginx's requests/s (gateway)"
    ]


def test_no_gateway_no_ratio():
    rows = [
        _row("nginx", 100000),
        {"peer": "gateway", "variant": None, "label": "gateway", "scenario": "small",
         "status": "not available: twistd lists no 'gateway' plugin yet"},
    ]
    assert run.add_ratios(rows) == {}
    assert "gw_ratio" not in rows[0]
    assert run.summary(rows, {}) == ["gateway/nginx (small): n/a (gateway: not available)"]


def test_median_over_processes_takes_each_scenarios_middle_process():
    def row(scenario, rps, errors=0):
        return {"peer": "gateway", "scenario": scenario, "rps": rps, "errors": errors,
                "status": "ok" if not errors else "errors"}

    each = [
        [row("small", 14000), row("large", 900)],
        [row("small", 19000), row("large", 1000, errors=3)],
        [row("small", 15000), {"peer": "gateway", "scenario": "large", "status": "error: x"}],
    ]
    small, large = run.median_over_processes(each)
    assert small["rps"] == 15000 and small["processes"] == [14000, 19000, 15000]
    # an even count of measured processes: the lower middle one; the worst errors
    assert large["rps"] == 900 and large["processes"] == [900, 1000, None]
    assert large["errors"] == 3 and large["status"] == "errors"
    assert large["process_status"] == ["ok", "errors", "error: x"]
    failed = run.median_over_processes([[{"scenario": "small", "status": "error: y"}]] * 2)
    assert failed == [{"scenario": "small", "status": "error: y"}]


def _fake_peers(monkeypatch, bench_peer):
    """run.main with C{bench_peer} for every peer, no origin, wrk or nginx needed."""

    class Origin:
        url = "http://127.0.0.1:1/"

        def __init__(self, *args, **kwargs):
            pass

        def start(self, *args, **kwargs):
            pass

    monkeypatch.setattr(run, "bench_peer", bench_peer)
    monkeypatch.setattr(run, "Origin", Origin)
    monkeypatch.setattr(run.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(run.nginxconf, "nginx_binary", lambda: "/usr/sbin/nginx")


def test_an_interrupted_peer_keeps_the_processes_it_measured(monkeypatch, tmp_path):
    """Ctrl-C during a peer's second process: the first process's rows are reported."""
    calls = []

    def bench_peer(ctx, peer, variant, scenarios, deadline, out):
        calls.append(peer)
        out.extend({"peer": peer, "variant": variant, "label": peer, "scenario": s} for s in scenarios)
        if len(calls) == 2:
            raise KeyboardInterrupt
        for row in out:
            row.update(_row(peer, 1000.0, requests=5000))

    _fake_peers(monkeypatch, bench_peer)
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exited:
        run.main(["--peers", "aiohttp", "--scenarios", "small", "--processes", "3", "--no-pin",
                  "--json", str(out)])
    assert exited.value.code == 130  # (as after Ctrl-C)
    import json

    (row,) = json.loads(out.read_text())["results"]
    assert row["rps"] == 1000.0 and row["processes"] == [1000.0, None]
    assert row["process_status"] == ["ok", "interrupted"]


def test_processes_run_in_rounds_of_every_peer(monkeypatch, tmp_path):
    """--processes 2: direct once, then nginx, aiohttp, nginx, aiohttp."""
    calls = []
    rates = iter([100.0, 200.0, 10.0, 300.0, 30.0])

    def bench_peer(ctx, peer, variant, scenarios, deadline, out):
        calls.append(peer)
        out.extend(_row(peer, next(rates), requests=5000, scenario=s) for s in scenarios)

    _fake_peers(monkeypatch, bench_peer)
    out = tmp_path / "out.json"
    run.main(["--peers", "direct,nginx,aiohttp", "--scenarios", "small", "--processes", "2",
              "--no-pin", "--json", str(out)])
    assert calls == ["direct", "nginx", "aiohttp", "nginx", "aiohttp"]
    import json

    rows = {r["peer"]: r for r in json.loads(out.read_text())["results"]}
    assert "processes" not in rows["direct"] and rows["direct"]["rps"] == 100.0
    assert rows["nginx"]["processes"] == [200.0, 300.0]
    assert rows["aiohttp"]["processes"] == [10.0, 30.0]


def test_processes_and_repeat_must_be_positive():
    with pytest.raises(SystemExit):
        run.parse_args(["--processes", "0"])


def test_plan_puts_variants_after_gateway(tmp_path):
    f = tmp_path / "on.yaml"
    f.write_text("listen: tcp:${PORT}\n")
    args = run.parse_args(
        ["--peers", "nginx,gateway,twisted", "--gateway-config", f"filters={f}", "--no-pin"]
    )
    assert args.plan == [
        ("nginx", None), ("gateway", None), ("gateway", "filters"), ("twisted", None)
    ]
    assert args.gateway_configs == {"filters": str(f)}


def test_gateway_row_not_available_without_plugin():
    ctx = run.Context(run.parse_args(["--no-pin"]), "/nonexistent", None, None)
    ctx._gateway_help[ctx.python] = "Commands:\n    conch   A Conch SSH service.\n    dns   DNS.\n"
    with pytest.raises(run.Unavailable, match="not available"):
        ctx.gateway_available()
    ctx._gateway_help[ctx.python] = "Commands:\n    gateway          HTTP API gateway.\n"
    ctx.gateway_available()


def test_gateway_rows_take_their_own_interpreter_and_environment(tmp_path):
    f = tmp_path / "on.yaml"
    f.write_text("listen: tcp:0\n")
    args = run.parse_args([
        "--peers", "gateway", "--no-pin",
        "--gateway-config", f"pypy={f}", "--gateway-python", "pypy=/usr/bin/pypy3",
        "--gateway-config", f"malloc={f}", "--gateway-env", "malloc:PYTHONMALLOC=malloc",
    ])
    assert args.gateway_pythons == {"pypy": "/usr/bin/pypy3"}
    assert args.gateway_envs == {"malloc": {"PYTHONMALLOC": "malloc"}}
    with pytest.raises(SystemExit):
        run.parse_args(["--gateway-python", "nosuchrow=/usr/bin/pypy3"])
    with pytest.raises(SystemExit):
        run.parse_args(["--gateway-config", f"malloc={f}", "--gateway-env", "malloc:NOEQUALS"])


# -- bench/workers.py ----------------------------------------------------------

import workers  # noqa: E402

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0
   2: 0100007F:1F90 0100007F:D432 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0
   3: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 444 1 0
   4: 0100007F:1F91 0100007F:D433 01 00000000:00000000 00:00000000 00000000     0        0 555 1 0
"""


def test_established_inodes_are_the_servers_side_only(tmp_path):
    table = tmp_path / "tcp"
    table.write_text(TCP_TABLE)
    # port 0x1F90 = 8080: the listener (0A) and the client side (local port
    # 0xD431) are not counted, nor another port's connection.
    assert workers.established_inodes(8080, tables=(str(table),)) == {222, 333}


def test_fillers_keep_the_largest_rows_demand():
    assert [workers.fillers_for(n, 4) for n in (1, 2, 4)] == [3, 2, 0]


def test_render_ratios_against_one_worker():
    def row(n, rps):
        run = {"rps": rps, "p99_ms": 10.0, "cpu_pct": [60] * n, "connections": [64 // n] * n}
        return {"workers": n, "runs": [run], "rps": rps}

    lines = workers.render([row(1, 1000), row(2, 1800)]).splitlines()
    assert "1.00" in lines[1] and "1.80" in lines[2] and "conns 32/32" in lines[2]


def test_workers_must_start_with_one():
    with pytest.raises(SystemExit):
        workers.parse_args(["--workers", "2", "4"])


def test_workers_bench_logs_json_where_run_py_would():
    assert workers.log_format_for([]) == "text"
    assert workers.log_format_for(["--logger=jsonlog.observer"]) == "json"
    with pytest.raises(ValueError):
        workers.log_format_for(["--reactor=poll"])


def test_workers_budget_quota_is_at_least_a_millisecond():
    with pytest.raises(SystemExit):
        workers.parse_args(["--cpu-budget", "0.05"])  # 500 us of a 10 ms period
    assert workers.parse_args(["--cpu-budget", "0.1"]).cpu_budget == 0.1


# --- bench/instructions.py ---------------------------------------------------------

import instructions  # noqa: E402

AB_REPORT = """\
Concurrency Level:      16
Complete requests:      2000
Failed requests:        0
Keep-Alive requests:    2000
"""


def test_callgrind_total_reads_the_totals_line(tmp_path):
    out = tmp_path / "callgrind.out"
    out.write_text("version: 1\nevents: Ir\nsummary: 0\nfn=(1) x\n0 5\ntotals: 2583915386\n")
    assert instructions.callgrind_total(str(out)) == 2583915386
    out.write_text("events: Ir\nsummary: 77\n")
    assert instructions.callgrind_total(str(out)) == 77
    out.write_text("events: Ir\n")
    with pytest.raises(ValueError, match="no totals"):
        instructions.callgrind_total(str(out))


def test_ab_check_refuses_short_failed_or_non_2xx_runs():
    instructions.ab_check(AB_REPORT, 2000)
    with pytest.raises(RuntimeError, match="completed 2000 of 3000"):
        instructions.ab_check(AB_REPORT, 3000)
    with pytest.raises(RuntimeError, match="3 requests failed"):
        instructions.ab_check(AB_REPORT.replace("Failed requests:        0", "Failed requests:        3"), 2000)
    with pytest.raises(RuntimeError, match="5 answers were not 2xx"):
        instructions.ab_check(AB_REPORT + "Non-2xx responses:      5\n", 2000)


def test_instruction_rows_and_table():
    args = instructions.parse_args(
        ["--gateway-config", "new=a.yaml", "--gateway-config", "old=a.yaml", "--checkout", "old=/tmp/old"]
    )
    rows = instructions.rows_of(args)
    assert [r["name"] for r in rows] == ["new", "old"]
    assert rows[0]["checkout"] == instructions.REPO and rows[1]["checkout"] == "/tmp/old"
    with pytest.raises(SystemExit, match="no --gateway-config row named other"):
        instructions.rows_of(instructions.parse_args(["--gateway-config", "a.yaml", "--checkout", "other=/x"]))
    table = instructions.render(
        [{"name": "new", "counts": [1000.0, 1002.0]}, {"name": "old", "counts": [1100.0, 1100.0]}, {"name": "x", "counts": []}]
    )
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["new", "1,001", "1.0000"]
    assert lines[2].split()[:3] == ["old", "1,100", "1.0989"]
    assert "(not measured)" in lines[3]


# --- bench/pauses.py ---------------------------------------------------------------

import pauses  # noqa: E402

# A PYPYLOG window as PyPy 7.3.11 writes it: cut at both ends, a minor
# collection with a nested section, and steps of a major collection.
PYPYLOG = """\
number of pinned objects: 0
[1000] gc-minor}
[2000] {gc-minor
[2100] {gc-minor-walkroots
[2200] gc-minor-walkroots}
minor collect, total memory used: 5308216
total size of surviving objects: 660000
[2600] gc-minor}
[3000] {gc-collect-step
starting gc state:  MARKING
number of objects to mark 1560 plus 274
stopping, now in gc state:  MARKING
[3200] gc-collect-step}
[4000] {gc-collect-step
starting gc state:  SWEEPING
freeing GC objects, up to 12288 pages. More to do.
stopping, now in gc state:  SWEEPING
[5400] gc-collect-step}
[6000] {gc-minor
[6400] gc-minor}
[7000] {gc-minor
"""


def test_parse_gc_log_reads_minors_and_steps_and_skips_cut_sections():
    minors, steps = pauses.parse_gc_log(PYPYLOG)
    assert minors == [(0x2000, 0x600), (0x6000, 0x400)]
    assert steps == [(0x3000, 0x200, "MARKING"), (0x4000, 0x1400, "SWEEPING")]


def test_parse_gc_log_reads_lines_with_a_thread_number():
    tagged = "\n".join(
        ("3# " + line) if line.startswith("[") else line for line in PYPYLOG.splitlines()
    )
    assert pauses.parse_gc_log(tagged) == pauses.parse_gc_log(PYPYLOG)


def test_summarize_calibrates_ticks_from_the_window_and_counts_long_steps():
    # Events from tick 0 to tick 2,000,000 over 2 s: 1,000 ticks a millisecond (0.001 GHz).
    minors = [(0, 1000), (1_000_000, 3000), (2_000_000, 2000)]
    steps = [(500_000, 6000, "SWEEPING"), (600_000, 4000, "MARKING"), (700_000, 12_000, "MARKING")]
    got = pauses.summarize(minors, steps, seconds=2.0, requests=20_000, connections=64, pause_ms=5.0)
    assert got["tsc_ghz"] == pytest.approx(1e-3)
    assert got["minor_per_s"] == pytest.approx(1.5)
    assert got["minor_median_ms"] == pytest.approx(2.0)
    assert got["long_per_s"] == pytest.approx(1.0)  # 6 and 12 ms; not 4 ms
    assert got["long_sweep_per_s"] == pytest.approx(0.5)  # the 6 ms one
    assert got["long_max_ms"] == pytest.approx(12.0)
    assert got["held_pct"] == pytest.approx(100.0 * 2 * 64 / 20_000)
    assert pauses.summarize(minors[:1], [], seconds=2.0, requests=1, connections=64, pause_ms=5.0) == {}


def test_latency_line_and_table():
    assert pauses.parse_latency("Requests/sec: 1\nLATENCY mean=4.000 p50=3.500 p99=9.000 p99.9=20.000\n") == {
        "mean": 4.0, "p50": 3.5, "p99": 9.0, "p99.9": 20.0,
    }
    with pytest.raises(ValueError, match="no LATENCY line"):
        pauses.parse_latency("Requests/sec: 1\n")
    assert "{50, 99, 99.9}" in pauses.LUA
    cells = {"rps": 10000.0, "errors": 0, "mean": 4.0, "p50": 3.5, "p99": 9.0, "p99.9": 20.0}
    table = pauses.render([
        {"round": 1, "name": "cpython", "cells": cells},
        {"round": 1, "name": "pypy", "cells": dict(cells, errors=3, minor_per_s=40.0, minor_median_ms=1.5,
                                                    long_per_s=0.5, long_sweep_per_s=0.4, long_max_ms=17.0,
                                                    held_pct=0.32, tsc_ghz=2.6)},
    ])
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["round", "row", "req/s", "errors", "mean"]
    assert lines[1].split() == ["1", "cpython", "10,000", "0", "4.00", "3.50", "9.00", "20.00", "2.25"] + ["-"] * 7
    assert lines[2].split()[3] == "3"
    assert lines[2].split()[-7:] == ["40.0", "1.50", "0.50", "0.40", "17.0", "0.32", "2.60"]


def test_pause_rows_take_their_own_environment_and_interpreter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "x=y").mkdir()
    (tmp_path / "x=y" / "b.yaml").write_text("")
    args = pauses.parse_args([
        "--gateway-config", "a.yaml", "--gateway-config", "nomajor=a.yaml",
        "--gateway-config", "other=./x=y/b.yaml",
        "--gateway-env", "nomajor:PYPY_GC_MIN=8GB", "--gateway-python", "nomajor=/usr/bin/pypy3",
    ])
    rows = pauses.rows_of(args)
    assert [(r["name"], r["env"]) for r in rows] == [
        ("gateway", {}), ("nomajor", {"PYPY_GC_MIN": "8GB"}), ("other", {}),
    ]
    assert rows[2]["config"] == str(tmp_path / "x=y" / "b.yaml")
    assert rows[0]["python"] == args.python and rows[1]["python"] == "/usr/bin/pypy3"
    # A FILE alone whose directory holds "=" is still the row "gateway".
    assert pauses.rows_of(pauses.parse_args(["--gateway-config", "./x=y/b.yaml"]))[0]["name"] == "gateway"

    def refused(argv, message):
        with pytest.raises(SystemExit, match=message):
            pauses.rows_of(pauses.parse_args(argv))

    refused(["--gateway-env", "other:X=1"], "no --gateway-config row named other")
    refused(["--gateway-config", "a.yaml", "--gateway-env", "gateway:X"], "want NAME:VAR=VALUE")
    refused(["--gateway-config", "a.yaml", "--gateway-config", "a.yaml"], "a second row named gateway")
    refused(["--gateway-config", "missing.yaml"], "no such file")
    refused(["--gateway-config", "a.yaml", "--gateway-python", "/usr/bin/pypy3"], "want NAME=VALUE")
    assert pauses.rows_of(pauses.parse_args([]))[0]["config"].endswith("typical-rl-jsonl.yaml")


@pytest.mark.parametrize(
    "name", sorted(n for n in os.listdir(os.path.join(run.HERE, "scenarios")) if n.endswith(".yaml"))
)
def test_every_scenario_is_a_valid_config(name, tmp_path):
    from types import SimpleNamespace

    from gateway.config import parse_config

    with open(os.path.join(run.HERE, "scenarios", name)) as f:
        template = f.read()
    path = tmp_path / "gateway.yaml"
    origin = SimpleNamespace(url="http://127.0.0.1:9000", port=9000)
    run.write_gateway_config(template, str(path), 8080, 8081, origin, str(tmp_path))
    parse_config(path.read_text(), name)
