"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader) streams from the .proto alone."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pagedserve.backend.server import protogen
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient

NODE_DIR = Path(__file__).parent / "node"
NODE_FILES = ("package.json", "package-lock.json", "generate.js")
NPM_TIMEOUT_S = 300
RUN_TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm"
)


@pytest.fixture(scope="module")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client and its pinned dependencies, installed into a temporary directory."""
    work = tmp_path_factory.mktemp("node-client")
    for name in NODE_FILES:
        shutil.copy(NODE_DIR / name, work / name)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=work, check=True, timeout=NPM_TIMEOUT_S, capture_output=True,
    )
    return work


def _run(node_client: Path, address: str, prompt: str, max_tokens: int) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["node", "generate.js", address, str(protogen.PROTO_ROOT), prompt, str(max_tokens)],
        cwd=node_client, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert result.stdout, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_node_client_streams_a_generation(node_client: Path, tiny_server: BackgroundServer) -> None:
    with GenerationClient(tiny_server.address) as client:
        expected = client.complete("Hello from Node", max_tokens=12, temperature=0.0)
    lines = _run(node_client, tiny_server.address, "Hello from Node", 12)
    assert lines[-1] == {"status": "OK"}
    responses = lines[:-1]
    assert len(responses) > 1  # streamed, not one message
    assert "".join(r["text"] for r in responses) == expected.text
    assert [t for r in responses for t in r["token_ids"]] == list(expected.token_ids)
    last = responses[-1]
    assert last["finish_reason"] == "FINISH_REASON_LENGTH"
    assert last["usage"]["completion_tokens"] == 12
    assert len({r["request_id"] for r in responses}) == 1


def test_node_client_sees_invalid_argument(
    node_client: Path, tiny_server: BackgroundServer
) -> None:
    lines = _run(node_client, tiny_server.address, "Hello", 0)
    assert lines[-1]["status"] == "INVALID_ARGUMENT"
    assert lines[-1]["details"].startswith("max_tokens:")
