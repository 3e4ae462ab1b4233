"""
Shared pieces of the nginx configurations the bench generates (the origin
and the nginx reverse-proxy peer).

Each nginx instance keeps everything it writes (pid file, error log, temp
paths) in the run's temp directory, runs in the foreground (C{daemon off}) as
the current user, with one worker process.
"""

import os
import pwd
import shutil

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx", "/usr/local/sbin/nginx")


def nginx_binary():
    """
    Path to nginx, or C{None}.  Debian puts it in C{/usr/sbin}, which is not
    on a non-root user's C{PATH}.
    """
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def prelude(tmpdir, name, worker_connections=4096):
    """
    The main-context and C{events} part of a config, plus the C{http}-level
    directives shared by every instance (the caller appends its C{server}
    blocks and the closing brace of C{http}).

    @param str tmpdir: directory for the pid file, logs and temp paths.
    @param str name: prefix for those files, e.g. C{"origin"}.
    """
    tmp = os.path.join(tmpdir, f"{name}-tmp")
    os.makedirs(tmp, exist_ok=True)
    lines = []
    if os.geteuid() == 0:
        # As root, nginx would switch its worker to "nobody", which cannot
        # read the 0700 temp dir: keep the worker as the current user.
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name};")
    lines += [
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        f"pid {tmpdir}/{name}.pid;",
        f"error_log {tmpdir}/{name}-error.log warn;",
        "worker_rlimit_nofile 16384;",
        f"events {{ worker_connections {worker_connections}; multi_accept on; }}",
        "http {",
        "  access_log off;",
        "  sendfile on;",
        "  tcp_nopush on;",
        "  tcp_nodelay on;",
        # nginx closes a keep-alive connection after 1000 requests by
        # default; wrk would then reconnect mid-run.  Lift the limit.
        "  keepalive_requests 100000000;",
        "  keepalive_timeout 75s;",
        "  default_type application/octet-stream;",
        f"  client_body_temp_path {tmp}/client_body;",
        f"  proxy_temp_path {tmp}/proxy;",
        f"  fastcgi_temp_path {tmp}/fastcgi;",
        f"  uwsgi_temp_path {tmp}/uwsgi;",
        f"  scgi_temp_path {tmp}/scgi;",
    ]
    return "\n".join(lines) + "\n"


def argv(conf_path, tmpdir, name):
    """
    The command line running nginx in the foreground on C{conf_path}.

    C{-p} and C{-e} keep nginx away from C{/var/log/nginx} and C{/etc/nginx}
    even before it has read the config.
    """
    return [
        nginx_binary() or "nginx",
        "-p",
        tmpdir,
        "-e",
        os.path.join(tmpdir, f"{name}-error.log"),
        "-c",
        conf_path,
    ]
