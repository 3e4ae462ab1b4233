"""The command line: --check, refusing bad configs, and `twist gateway`."""

import os
import re
import subprocess
import sys

from tests.harness import ROOT, env, get, wait_for

BIN = os.path.dirname(sys.executable)


def run(*args, timeout=30):
    return subprocess.run(
        [os.path.join(BIN, "twistd"), *args], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout
    )


def test_check_prints_a_summary_and_exits_0():
    result = run("gateway", "--config", "etc/demo.yaml", "--check")
    assert result.returncode == 0, result.stderr
    assert "etc/demo.yaml: OK" in result.stdout
    assert "route users-api: /api/users -> users" in result.stdout


def test_check_prints_file_line_reason_and_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "services:\n  users:\n    backends: [{url: 'http://127.0.0.1:1'}]\n"
        "routes:\n  - name: r\n    service: userz\n"
    )
    result = run("gateway", "--config", str(bad), "--check")
    assert result.returncode == 1
    assert result.stderr.strip() == f"{bad}:6: routes[0].service: no service named 'userz'"


def test_bad_config_refuses_to_start(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: tcp:0\nservices: {}\nroutes: []\nextra: 1\n")
    result = run("-n", "--pidfile=", "gateway", "--config", str(bad))
    assert result.returncode != 0
    assert f"{bad}:4: extra: unknown key" in result.stdout + result.stderr


def test_config_is_required():
    result = run("gateway")
    assert result.returncode != 0
    assert "--config PATH is required" in result.stdout + result.stderr


def test_twist_runs_the_plugin(tmp_path, backends):
    config = tmp_path / "gw.yaml"
    config.write_text(
        "listen: tcp:0:interface=127.0.0.1\nadmin: {listen: 'tcp:0:interface=127.0.0.1'}\n"
        f"services: {{s: {{backends: [{{url: '{backends[0].url}'}}]}}}}\n"
        "routes: [{name: r, service: s}]\n"
    )
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [os.path.join(BIN, "twist"), "gateway", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=ROOT,
        )
    try:
        port = int(wait_for(lambda: re.search(r"GatewaySite starting on (\d+)", log.read_text()),
                            what="twist to listen").group(1))
        assert get(port, "/hello").json()["uri"] == "/hello"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
