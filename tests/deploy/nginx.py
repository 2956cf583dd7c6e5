"""Debian's nginx as a foreground gRPC load balancer on loopback, for the drain-behind-a-proxy test.

``nginx_binary()`` finds nginx or installs Debian's package (the test machine runs as root with
Debian's archive reachable). ``running_nginx`` writes a throwaway configuration (everything
under one temporary prefix, listening on 127.0.0.1 only), runs nginx in the foreground as a
single process (nothing is left behind when it is killed) and records, per request, which
upstreams nginx tried: the access log line carries the client's ``x-stream-id`` metadata and
``$upstream_addr`` ("A" or, after a retry, "A, B").
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NGINX_PATHS = ("/usr/sbin/nginx",)
# Debian ships the binary as "nginx" (bookworm and later); older releases as its flavours.
DEBIAN_PACKAGES = ("nginx", "nginx-light")
# All apt-get runs together, so a hanging mirror fails the install well inside pytest's timeout.
APT_BUDGET_S = 400.0
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
BIND_ATTEMPTS = 3
POLL_S = 0.05
# nginx 1.25.1 moved HTTP/2 from a ``listen`` parameter to the ``http2`` directive.
HTTP2_DIRECTIVE_SINCE = (1, 25, 1)
# ``-e`` (the log for errors before the configuration is read) exists since 1.19.5.
ERROR_LOG_FLAG_SINCE = (1, 19, 5)
STREAM_ID_HEADER = "x-stream-id"
LOG_SEPARATOR = "|"
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def find_nginx() -> Path | None:
    found = shutil.which("nginx")
    if found:
        return Path(found)
    for path in NGINX_PATHS:
        if os.access(path, os.X_OK):
            return Path(path)
    return None


def _apt(deadline: float, *args: str) -> str:
    """Run apt-get; returns "" on success, else what went wrong."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return f"apt-get {' '.join(args)}: no time left"
    try:
        result = subprocess.run(
            ["apt-get", *args],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            text=True,
            timeout=remaining,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"apt-get {' '.join(args)}: timed out"
    if result.returncode != 0:
        return f"apt-get {' '.join(args)}: {result.stderr.strip()[-400:]}"
    return ""


def install_nginx() -> tuple[Path | None, str]:
    """Install Debian's nginx with apt-get; returns the binary, or None and why not."""
    if shutil.which("apt-get") is None:
        return None, "apt-get is not available (not a Debian system)"
    if os.geteuid() != 0:
        return None, "installing nginx with apt-get needs root"
    deadline = time.monotonic() + APT_BUDGET_S
    errors: list[str] = []
    for refresh in (False, True):
        if refresh:  # a fresh machine may have no package lists yet
            errors.append(_apt(deadline, "update"))
        for package in DEBIAN_PACKAGES:
            errors.append(_apt(deadline, "install", "-y", "--no-install-recommends", package))
            binary = find_nginx()
            if binary is not None:
                return binary, ""
    return None, "; ".join(error for error in errors if error)


def nginx_binary() -> tuple[Path | None, str]:
    """nginx from PATH, else freshly installed; or None and the reason it cannot be had."""
    binary = find_nginx()
    if binary is not None:
        return binary, ""
    return install_nginx()


def nginx_version(binary: Path) -> tuple[int, ...]:
    result = subprocess.run(
        [str(binary), "-v"], capture_output=True, text=True, timeout=STOP_TIMEOUT_S, check=True
    )
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", result.stderr + result.stdout)
    if match is None:
        raise RuntimeError(f"cannot read the nginx version from {result.stderr!r}")
    return tuple(int(part) for part in match.groups())


def render_config(
    prefix: Path, port: int, upstreams: Sequence[str], version: tuple[int, ...]
) -> str:
    """An nginx.conf balancing gRPC over ``upstreams`` (``least_conn``), listening on loopback.

    ``grpc_next_upstream error timeout non_idempotent``: a replica that is draining refuses the
    connection (or the stream), and nginx passes the request on to the next replica. Retrying a
    non-idempotent POST is safe here because nginx only retries before it has sent the client
    anything, and a refused connection or stream was never processed.
    """
    if version >= HTTP2_DIRECTIVE_SINCE:
        listen = f"listen 127.0.0.1:{port};\n        http2 on;"
    else:
        listen = f"listen 127.0.0.1:{port} http2;"
    servers = "\n".join(f"        server {address};" for address in upstreams)
    temp_paths = "\n".join(
        f"    {name}_temp_path {prefix / 'temp' / name};" for name in TEMP_DIRS
    )
    log_fields = LOG_SEPARATOR.join(
        ["$http_" + STREAM_ID_HEADER.replace("-", "_"), "$status", "$upstream_addr"]
    )
    return f"""\
daemon off;
master_process off;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} info;

events {{
    worker_connections 1024;
}}

http {{
    log_format routes '{log_fields}';
    access_log {prefix / 'access.log'} routes;
{temp_paths}

    upstream pagedserve {{
        least_conn;
{servers}
    }}

    server {{
        {listen}

        location / {{
            grpc_pass grpc://pagedserve;
            grpc_next_upstream error timeout non_idempotent;
            grpc_next_upstream_tries {len(upstreams)};
            grpc_connect_timeout 5s;
            grpc_send_timeout 120s;
            grpc_read_timeout 120s;
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Route:
    """One request as nginx logged it."""

    stream_id: str
    status: int
    upstreams: tuple[str, ...]  # every replica nginx tried, in order; the last one answered


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    prefix: Path
    address: str

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def routes(self) -> dict[str, Route]:
        """Requests that carried ``x-stream-id``, by that id (nginx logs each when it ends)."""
        path = self.prefix / "access.log"
        routes: dict[str, Route] = {}
        for line in path.read_text().splitlines() if path.exists() else ():
            stream_id, status, upstreams = line.split(LOG_SEPARATOR)
            if stream_id != "-":
                addresses = tuple(a.strip() for a in upstreams.split(","))
                routes[stream_id] = Route(stream_id, int(status), addresses)
        return routes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def _start(binary: Path, prefix: Path, upstreams: Sequence[str]) -> Nginx:
    """Start on a free port; a port taken between probe and bind gets another try."""
    version = nginx_version(binary)
    for name in TEMP_DIRS:
        (prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    failures: list[str] = []
    for _ in range(BIND_ATTEMPTS):
        port = _free_port()
        conf.write_text(render_config(prefix, port, upstreams, version))
        base = [str(binary), "-p", str(prefix), "-c", str(conf)]
        if version >= ERROR_LOG_FLAG_SINCE:  # else nginx first opens /var/log/nginx/error.log
            base += ["-e", str(prefix / "error.log")]
        check = subprocess.run(
            [*base, "-t"], capture_output=True, text=True, timeout=STOP_TIMEOUT_S, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected its configuration:\n{check.stderr}")
        process = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            if _accepts(port):
                return Nginx(process, prefix, f"127.0.0.1:{port}")
            time.sleep(POLL_S)
        _stop(process)
        failures.append((prefix / "error.log").read_text(errors="replace")[-2000:])
    raise RuntimeError("nginx did not start:\n" + "\n".join(failures))


@contextmanager
def running_nginx(binary: Path, prefix: Path, upstreams: Sequence[str]) -> Iterator[Nginx]:
    """nginx balancing over ``upstreams`` until the block ends (then stopped, or killed)."""
    nginx = _start(binary, prefix, upstreams)
    try:
        yield nginx
    finally:
        _stop(nginx.process)
