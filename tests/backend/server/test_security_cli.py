"""``pagedserve serve``'s security flags: how they map onto the config, and every bad
combination failing at start with one line that names the cause (a real process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pagedserve.backend.cli import build_parser
from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.cli import CONFIG_ERROR_EXIT, server_config_from_args
from pagedserve.backend.server.security import API_KEY_ENV, SecurityConfigError, validate
from tests.certs import Pki

KEY = "s3cret-key"
# The check runs before torch is imported and the model loads: a failing start takes well
# under this, where loading the model would take longer.
FAST_EXIT_S = 30.0


def parse(*flags: str, environ: dict[str, str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(["serve", *flags])
    saved = os.environ.pop(API_KEY_ENV, None)
    try:
        if environ:
            os.environ.update(environ)
        return server_config_from_args(args)
    finally:
        os.environ.pop(API_KEY_ENV, None)
        if saved is not None:
            os.environ[API_KEY_ENV] = saved


def test_the_flags_fill_the_config(pki: Pki, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")  # a mounted secret ends with a newline
    config = parse(
        "--ssl-certfile", pki.server.cert, "--ssl-keyfile", pki.server.key,
        "--ssl-ca-certs", pki.ca, "--api-key-file", str(key_file),
        "--metrics-ssl", "--metrics-require-api-key",
    )
    assert config.ssl_certfile == pki.server.cert
    assert config.ssl_ca_certs == pki.ca
    assert config.api_key == KEY
    telemetry = config.telemetry
    assert (telemetry.metrics_ssl_certfile, telemetry.metrics_ssl_keyfile) == (
        pki.server.cert, pki.server.key,
    )
    assert telemetry.metrics_ssl_ca_certs == pki.ca
    assert telemetry.metrics_api_key == KEY
    validate(config)
    assert KEY not in repr(config)


def test_the_key_comes_from_the_flag_else_the_environment(tmp_path: Path) -> None:
    assert parse().api_key is None
    assert parse(environ={API_KEY_ENV: KEY}).api_key == KEY
    flag = parse("--api-key", "from-flag", environ={API_KEY_ENV: KEY})
    assert flag.api_key == "from-flag"
    # Open metrics unless asked, plain HTTP unless asked.
    telemetry = parse("--api-key", KEY).telemetry
    assert telemetry.metrics_api_key is None and telemetry.metrics_ssl_certfile is None


@dataclass(frozen=True)
class BadStart:
    flags: Callable[[Pki, Path], list[str]]
    cause: str  # in the last line of stderr
    environ: dict[str, str] | None = None


def _tls(cert: str, key: str) -> list[str]:
    return ["--ssl-certfile", cert, "--ssl-keyfile", key]


def _file(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _corrupt(kind: str) -> str:
    return f"-----BEGIN {kind}-----\nAAAA\n-----END {kind}-----\n"


BAD_STARTS: dict[str, BadStart] = {
    "cert without key": BadStart(
        lambda p, t: ["--ssl-certfile", p.server.cert], "--ssl-certfile needs --ssl-keyfile"
    ),
    "key without cert": BadStart(
        lambda p, t: ["--ssl-keyfile", p.server.key], "--ssl-keyfile needs --ssl-certfile"
    ),
    "CA without TLS": BadStart(
        lambda p, t: ["--ssl-ca-certs", p.ca], "--ssl-ca-certs needs --ssl-certfile"
    ),
    "missing cert file": BadStart(
        lambda p, t: _tls(str(t / "nope.pem"), p.server.key),
        "cannot read --ssl-certfile {tmp}/nope.pem: No such file or directory",
    ),
    "key is a directory": BadStart(
        lambda p, t: _tls(p.server.cert, str(t)),
        "cannot read --ssl-keyfile {tmp}: Is a directory",
    ),
    "key of another certificate": BadStart(
        lambda p, t: _tls(p.server.cert, p.wrong_key),
        "is not the private key of the certificate in --ssl-certfile",
    ),
    "cert not PEM": BadStart(
        lambda p, t: _tls(p.not_pem, p.server.key), "holds no PEM certificate"
    ),
    "key not PEM": BadStart(
        lambda p, t: _tls(p.server.cert, p.not_pem), "holds no PEM private key"
    ),
    "corrupt cert": BadStart(
        lambda p, t: _tls(_file(t, "c.pem", _corrupt("CERTIFICATE")), p.server.key),
        "holds a certificate that does not parse",
    ),
    "corrupt key": BadStart(
        lambda p, t: _tls(p.server.cert, _file(t, "k.pem", _corrupt("PRIVATE KEY"))),
        "is not a valid PEM private key",
    ),
    "encrypted key": BadStart(
        lambda p, t: _tls(p.server.cert, p.encrypted_key), "is encrypted"
    ),
    "CA not PEM": BadStart(
        lambda p, t: [*_tls(p.server.cert, p.server.key), "--ssl-ca-certs", p.not_pem],
        "--ssl-ca-certs",
    ),
    "missing CA": BadStart(
        lambda p, t: [*_tls(p.server.cert, p.server.key), "--ssl-ca-certs", str(t / "ca")],
        "cannot read --ssl-ca-certs",
    ),
    "key twice": BadStart(
        lambda p, t: ["--api-key", KEY, "--api-key-file", p.not_pem], "not both"
    ),
    "missing key file": BadStart(
        lambda p, t: ["--api-key-file", str(t / "none")], "cannot read --api-key-file"
    ),
    "empty key file": BadStart(
        lambda p, t: ["--api-key-file", _file(t, "empty", "\n")], "is empty"
    ),
    "empty key variable": BadStart(lambda p, t: [], f"${API_KEY_ENV} is empty", {API_KEY_ENV: ""}),
    "key with a space": BadStart(
        lambda p, t: ["--api-key", "two words"], "--api-key must be printable ASCII"
    ),
    "metrics TLS without TLS": BadStart(
        lambda p, t: ["--metrics-ssl"], "--metrics-ssl needs --ssl-certfile"
    ),
    "metrics key without a key": BadStart(
        lambda p, t: ["--metrics-require-api-key"], "--metrics-require-api-key needs --api-key"
    ),
}


@pytest.mark.parametrize("case", BAD_STARTS.values(), ids=BAD_STARTS.keys())
def test_a_bad_start_fails_at_once_with_one_line(pki: Pki, tmp_path: Path, case: BadStart) -> None:
    environ = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    # A model that does not exist: were the check after loading, the error would be the model's.
    command = [
        sys.executable, "-m", "pagedserve.backend.cli", "serve", "--model", str(tmp_path / "none"),
        "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", *case.flags(pki, tmp_path),
    ]
    start = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=FAST_EXIT_S,
        env={**environ, **(case.environ or {})},
    )
    assert time.monotonic() - start < FAST_EXIT_S
    assert result.returncode == CONFIG_ERROR_EXIT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[-1].startswith("pagedserve serve: error: ")
    assert case.cause.format(tmp=tmp_path) in lines[-1]
    assert KEY not in result.stderr


def test_the_same_checks_guard_a_server_started_from_code(pki: Pki) -> None:
    from pagedserve.backend.server.server import BackgroundServer

    config = ServerConfig(
        host="127.0.0.1", port=0, http_port=None, ssl_certfile=pki.server.cert,
        ssl_keyfile=pki.wrong_key,
        telemetry=TelemetryConfig(metrics_port=None),
    )
    server = BackgroundServer(config, EngineConfig.from_kwargs(model="/nonexistent"))
    with pytest.raises(SecurityConfigError, match="is not the private key"):
        server.start()
