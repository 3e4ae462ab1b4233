#!/bin/sh
# Install what the benchmark harness needs.  Idempotent and non-interactive.
#
#   PYTHON=/work/venv/bin/python sh bench/setup.sh
#
# System packages (wrk, nginx-light, golang-go for the Go peer, valgrind
# and apache2-utils for bench/instructions.py) are
# installed with apt-get only when the binaries are missing; aiohttp and
# uvloop (the aiohttp peer) go into the Python environment named by $PYTHON
# (default: python3).
set -eu

PYTHON="${PYTHON:-python3}"

need_apt=""
command -v wrk >/dev/null 2>&1 || need_apt="$need_apt wrk"
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    need_apt="$need_apt nginx-light"
fi
# Go's httputil.ReverseProxy peer (bench/peers/goproxy.go: standard library
# only, built offline by the harness).
command -v go >/dev/null 2>&1 || need_apt="$need_apt golang-go"
# bench/instructions.py: callgrind's counts, ApacheBench's fixed request counts.
command -v valgrind >/dev/null 2>&1 || need_apt="$need_apt valgrind"
command -v ab >/dev/null 2>&1 || need_apt="$need_apt apache2-utils"

if [ -n "$need_apt" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing$need_apt"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need_apt
    # Debian starts the packaged nginx service on install; the bench runs its
    # own instances and does not need it.
    if [ -n "$(echo "$need_apt" | grep nginx || true)" ] && command -v systemctl >/dev/null 2>&1; then
        $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
    fi
else
    echo "setup: wrk, nginx, go, valgrind and ab already present"
fi

if "$PYTHON" -c 'import aiohttp, uvloop' >/dev/null 2>&1; then
    echo "setup: aiohttp and uvloop already installed for $PYTHON"
else
    echo "setup: pip installing aiohttp uvloop for $PYTHON"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check aiohttp uvloop
fi

echo "setup: $(go version); the Go peer will be benchmarked"
