"""The terminal clients against a server with mTLS and an API key: generate, chat and
bench serve with the connection flags (and the key from the environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from pagedserve.clients.security import API_KEY_ENV, ChannelSecurity
from tests.backend.server.harness import TINY_ENGINE, running_server
from tests.certs import RENAMED_SERVER, Pki

KEY = "cli-test-key"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def mtls_key_server(tiny_llama_dir: Path, pki: Pki) -> Iterator[BackgroundServer]:
    options = {
        "ssl_certfile": pki.renamed_server.cert,
        "ssl_keyfile": pki.renamed_server.key,
        "ssl_ca_certs": pki.ca,
        "api_key": KEY,
    }
    with running_server(tiny_llama_dir, server_options=options, **TINY_ENGINE) as server:
        yield server


def tls_flags(pki: Pki) -> list[str]:
    return [
        "--ssl-ca-certs", pki.ca, "--ssl-certfile", pki.client.cert,
        "--ssl-keyfile", pki.client.key, "--ssl-server-name", RENAMED_SERVER,
    ]


def run_cli(
    *args: str, key: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if key is not None:
        environ[API_KEY_ENV] = key
    return subprocess.run(
        [sys.executable, "-m", "pagedserve.backend.cli", *args], input=stdin,
        capture_output=True, text=True, timeout=TIMEOUT_S, env=environ,
    )


def _expected(server: BackgroundServer, pki: Pki, prompt: str, max_tokens: int) -> str:
    with GenerationClient(
        server.address, api_key=KEY, ssl_ca_certs=pki.ca, ssl_certfile=pki.client.cert,
        ssl_keyfile=pki.client.key, ssl_server_name=RENAMED_SERVER,
    ) as client:
        messages = [{"role": "user", "content": prompt}]
        return client.complete(messages=messages, max_tokens=max_tokens, temperature=0.0).text


def test_generate_with_the_connection_flags(mtls_key_server: BackgroundServer, pki: Pki) -> None:
    address = mtls_key_server.address
    expected = _expected(mtls_key_server, pki, "Hello", 8)
    command = ["generate", "--server", address, "--max-tokens", "8", "--temperature", "0",
               *tls_flags(pki), "Hello"]
    from_env = run_cli(*command, key=KEY)
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout == expected + "\n"
    from_flag = run_cli(*command, "--api-key", KEY, key="not-this-one")
    assert from_flag.returncode == 0, from_flag.stderr
    assert from_flag.stdout == expected + "\n"

    no_key = run_cli(*command)
    assert no_key.returncode == 1
    assert "UNAUTHENTICATED" in no_key.stderr
    no_certificate = run_cli(
        "generate", "--server", address, "--ssl-ca-certs", pki.ca,
        "--ssl-server-name", RENAMED_SERVER, "Hello", key=KEY,
    )
    assert no_certificate.returncode == 1
    assert "UNAVAILABLE" in no_certificate.stderr
    half = run_cli("generate", "--server", address, "--ssl-certfile", pki.client.cert, "Hello")
    assert half.returncode == 2
    assert "ssl_certfile and ssl_keyfile" in half.stderr


def test_chat_with_the_connection_flags(mtls_key_server: BackgroundServer, pki: Pki) -> None:
    address = mtls_key_server.address
    expected = _expected(mtls_key_server, pki, "Hello", 6)
    chat = run_cli(
        "chat", "--server", address, "--max-tokens", "6", "--temperature", "0", *tls_flags(pki),
        "--api-key", KEY,
        stdin="Hello\n/exit\n",
    )
    assert chat.returncode == 0, chat.stderr
    assert expected in chat.stdout
    # A client that cannot verify the server gives up at once instead of waiting --wait.
    untrusting = run_cli("chat", "--server", address, "--ssl", "--wait", "300", key=KEY,
                         stdin="Hello\n/exit\n")
    assert untrusting.returncode == 1
    assert "UNAVAILABLE" in untrusting.stderr and "andshake" in untrusting.stderr


def test_bench_serve_with_the_connection_flags(
    mtls_key_server: BackgroundServer, pki: Pki, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    command = [
        "bench", "serve", "--server", mtls_key_server.address, *tls_flags(pki),
        "--num-requests", "4", "--input-len", "8", "--output-len", "4", "--no-progress",
        "--json", str(report),
    ]
    bench = run_cli(*command, key=KEY)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(report.read_text())["completed"] == 4
    refused = run_cli(*command, "--api-key", "wrong")
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr


def test_bench_serve_api_openai_with_the_connection_flags(
    mtls_key_server: BackgroundServer, pki: Pki, tmp_path: Path
) -> None:
    """HTTPS with a client certificate, the renamed server's name and the key, as on gRPC."""
    report = tmp_path / "report.json"
    command = [
        "bench", "serve", "--api", "openai", "--server", mtls_key_server.http_address,
        "--grpc-server", mtls_key_server.address, *tls_flags(pki), "--num-requests", "4",
        "--input-len", "8", "--output-len", "4", "--no-progress", "--json", str(report),
    ]
    bench = run_cli(*command, key=KEY)
    assert bench.returncode == 0, bench.stderr
    result = json.loads(report.read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] == 16


async def test_a_wrong_key_over_http_is_a_failed_request(
    mtls_key_server: BackgroundServer, pki: Pki
) -> None:
    from pagedserve.clients.openai_load import CompletionsTarget, OpenAICompletions

    security = ChannelSecurity(
        ssl_ca_certs=pki.ca, ssl_certfile=pki.client.cert, ssl_keyfile=pki.client.key,
        ssl_server_name=RENAMED_SERVER, api_key="wrong",
    )
    model = mtls_key_server.state.served_model_name
    target = CompletionsTarget(mtls_key_server.http_address, model, security)
    async with OpenAICompletions(target) as completions:
        record = await completions.request([5, 6, 7], 2, True)
    assert record.error is not None
    assert record.error.startswith("HTTP 401: authentication_error:"), record.error


def test_channel_security_refuses_what_cannot_work(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ssl_certfile and ssl_keyfile"):
        ChannelSecurity(ssl_keyfile=pki.client.key)
    with pytest.raises(ValueError, match="ssl=False"):
        ChannelSecurity(ssl=False, ssl_ca_certs=pki.ca)
    with pytest.raises(ValueError, match="TLS connections only"):
        ChannelSecurity(ssl_server_name=RENAMED_SERVER)
    with pytest.raises(ValueError, match="cannot read ssl_ca_certs"):
        GenerationClient("127.0.0.1:1", ssl_ca_certs=str(tmp_path / "none.pem"))
    assert KEY not in repr(ChannelSecurity(api_key=KEY))
