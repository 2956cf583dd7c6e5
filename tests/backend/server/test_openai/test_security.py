"""The HTTP API behind the gRPC port's security: TLS with the same certificate, mTLS with the
same client CAs, and the same API key as ``Authorization: Bearer`` (401 in OpenAI's shape
otherwise; /health open)."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pagedserve.backend.server.server import BackgroundServer
from tests.backend.server.harness import TINY_ENGINE, running_server
from tests.backend.server.test_openai.conftest import CALL_TIMEOUT_S
from tests.certs import Pki

KEY = "k3y-0f-the-http-server"


@pytest.fixture(scope="module")
def mtls_key_server(tiny_llama_dir: Path, pki: Pki) -> Iterator[BackgroundServer]:
    options = {
        "ssl_certfile": pki.server.cert,
        "ssl_keyfile": pki.server.key,
        "ssl_ca_certs": pki.ca,
        "api_key": KEY,
    }
    with running_server(tiny_llama_dir, server_options=options, **TINY_ENGINE) as server:
        yield server


def _context(pki: Pki, client_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if client_cert:
        context.load_cert_chain(pki.client.cert, pki.client.key)
    return context


def _oai(server: BackgroundServer, pki: Pki, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"https://{server.http_address}/v1", api_key=key, max_retries=0,
        timeout=CALL_TIMEOUT_S, http_client=openai.DefaultHttpxClient(verify=_context(pki)),
    )


def _get(server: BackgroundServer, path: str, context: ssl.SSLContext,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = server.http_address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(
        host, int(port), context=context, timeout=CALL_TIMEOUT_S
    )
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_the_right_key_over_mtls_is_served(mtls_key_server: BackgroundServer, pki: Pki) -> None:
    with _oai(mtls_key_server, pki, KEY) as oai:
        model = mtls_key_server.state.served_model_name
        response = oai.completions.create(model=model, prompt="Hi", max_tokens=2)
        assert response.choices
        chunks = list(oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
        ))
        assert chunks


@pytest.mark.parametrize(
    "authorization", [None, f"Bearer {KEY}x", "Bearer ", f"Basic {KEY}", KEY]
)
def test_a_wrong_or_missing_key_is_a_401_in_openai_shape(
    mtls_key_server: BackgroundServer, pki: Pki, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ("/v1/models", "/v1/completions", "/v1/nothing-here"):
        status, response_headers, body = _get(mtls_key_server, path, _context(pki), headers)
        assert status == 401, path
        assert response_headers["WWW-Authenticate"] == "Bearer"
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
        assert KEY not in error["message"]


def test_the_openai_client_sees_an_authentication_error(
    mtls_key_server: BackgroundServer, pki: Pki
) -> None:
    with _oai(mtls_key_server, pki, "not-the-key") as oai, pytest.raises(
        openai.AuthenticationError
    ):
        oai.models.list()


def test_health_needs_no_key(mtls_key_server: BackgroundServer, pki: Pki) -> None:
    status, _, body = _get(mtls_key_server, "/health", _context(pki))
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_tls_is_required_and_so_is_a_client_certificate(
    mtls_key_server: BackgroundServer, pki: Pki
) -> None:
    host, port = mtls_key_server.http_address.rsplit(":", 1)
    plain = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        plain.request("GET", "/health")
        plain.getresponse().read()
    plain.close()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _get(mtls_key_server, "/health", _context(pki, client_cert=False))
    stranger = ssl.create_default_context(cafile=pki.ca)
    stranger.load_cert_chain(pki.stranger.cert, pki.stranger.key)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _get(mtls_key_server, "/health", stranger)
