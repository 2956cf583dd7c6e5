"""README.md's code blocks, each checked as it is written.

A reader copies these snippets first, so a renamed flag, a moved path or a changed answer must
fail a test rather than a reader. ``BLOCKS`` maps every fenced block of the README to the tests
that check it, and ``test_every_block_is_checked`` fails when the README gains a block the
table does not know or loses one it names: a new snippet cannot go in unchecked.

What runs here runs as written, against real servers on the default model: the HTTP section's
``pagedserve serve`` (the command ``make serve`` runs) and the Triton section's, one server each
(the HTTP snippets address the model by its directory's name, the Triton ones by the
``--served-model-name`` their block gives it). The only rewriting is of addresses: the
documented default ports (8001 gRPC, 8000 HTTP, 8002 metrics, checked against the parser's
defaults) become the test servers' loopback ports, and ``pagedserve`` the virtualenv's
executable. Commands that need what a snippet leaves abstract (a model ``DIR``, certificates,
``llm.example``) or take minutes (the benchmarks) are parsed by pagedserve's own argument
parser, so a renamed or removed flag fails; the deploy commands name files that tests/deploy
renders and validates.

Every process here is given one intra-op thread: two servers and a snippet share the machine,
and torch's threads spin-wait on a core that is busy elsewhere (on two cores beside one busy
process, a single stream decodes some twenty times slower with two threads than with one).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest

from pagedserve.backend.cli import build_parser
from pagedserve.backend.server.security import API_KEY_ENV as SERVER_API_KEY_ENV
from pagedserve.clients.client import GenerationClient
from pagedserve.clients.security import API_KEY_ENV as CLIENT_API_KEY_ENV
from tests.backend.server.serve_process import REPO_ROOT, ServeProcess

README = REPO_ROOT / "README.md"
# The executable `make serve` installs; the README calls it `.venv/bin/pagedserve` or, on PATH,
# `pagedserve`.
PAGEDSERVE = Path(sys.executable).with_name("pagedserve")
DOCUMENTED_EXECUTABLES = frozenset({"pagedserve", ".venv/bin/pagedserve"})
# The ports the snippets address: the server's defaults (test_documented_ports_are_the_defaults).
GRPC_PORT, HTTP_PORT, METRICS_PORT = 8001, 8000, 8002
DOCUMENTED_HOSTS = ("127.0.0.1", "localhost")
METRICS_LOGGED = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)")
# A snippet's process: the interpreter, the model load where it has one (a few seconds, more
# on a busy two-core machine) and up to 192 tokens at one thread.
SNIPPET_TIMEOUT_S = 180.0
MAKE_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

# The Quick start's question to the server (other blocks run `generate --server` too).
QUICK_START = 'pagedserve generate --server 127.0.0.1:8001 --temperature 0 "What is the capital'
# The HTTP section's block: the module server's `pagedserve serve`, then the curl request.
HTTP_BLOCK = "curl -s localhost:8000/v1/chat/completions"
# Every fenced block of the README, keyed by a fragment of its text, to the tests that check
# it. A block belongs to the key it contains; where it contains several, to the one that holds
# the others (``make serve`` is part of the Set up block too, which ``make serve   # install``
# names). Two blocks open with the same import line, so keys are not confined to first lines.
BLOCKS: dict[str, tuple[str, ...]] = {
    "make serve   # install": ("test_make_targets_run_the_documented_commands",),
    "make serve": ("test_make_targets_run_the_documented_commands",),
    QUICK_START: ("test_generate_prints_the_documented_answer",),
    "The capital of France is Paris.": ("test_generate_prints_the_documented_answer",),
    'GenerationClient("127.0.0.1:8001")': ("test_python_client_streams_a_reply",),
    "bench serve --compare-offline": ("test_commands_parse",),
    "bench serve --api openai": ("test_commands_parse",),
    HTTP_BLOCK: (
        "test_documented_ports_are_the_defaults", "test_curl_chat_completion_answers",
    ),
    "from openai import OpenAI": ("test_openai_client_streams_a_reply",),
    "# p95 time to first token": ("test_promql_names_exported_metrics",),
    "from pagedserve import LLM, SamplingParams": ("test_offline_llm_generates_and_chats",),
    "outputs = llm.chat(": ("test_offline_llm_generates_and_chats",),
    'pagedserve generate "What is the capital of France?"': (
        "test_commands_parse", "test_offline_generate_streams_an_answer",
    ),
    "--tensor-parallel-size 2": ("test_commands_parse",),
    'pip install "tritonclient[grpc]"': (
        "test_triton_client_package_is_installable", "test_triton_client_streams_and_infers",
    ),
    'MODEL = "smollm2"': ("test_triton_client_streams_and_infers",),
    "docker build -f deploy/docker/Dockerfile.cpu": ("test_docker_commands_name_validated_files",),
    "kubectl apply -k deploy/k8s/overlays/cpu": (
        "test_kubectl_commands_apply_validated_kustomizations",
    ),
    "pagedserve serve --ssl-certfile": ("test_commands_parse",),
    'GenerationClient("llm.example:8001"': ("test_tls_snippet_calls_match_the_signatures",),
    "pagedserve serve --api-key-file": ("test_commands_parse",),
    # The tracing section: three terminals (run end to end, with free ports, by
    # tests/backend/telemetry/test_trace_viewer.py), then what the first one prints.
    "pagedserve traces  ": ("test_commands_parse", "test_trace_commands_meet_on_one_port"),
    "trace f84650cfa9284e091015f0c085d090f6": ("test_the_trace_sample_is_what_the_viewer_prints",),
}

# The blocks whose commands take what the README leaves abstract or run for minutes.
PARSED_ONLY = tuple(key for key, tests in BLOCKS.items() if "test_commands_parse" in tests)


# ---- the README's blocks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced block: its info string's language, its text and where it opens."""

    language: str
    text: str
    line: int


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, in order (CommonMark fences: ``` or ~~~, closed by a longer-or-equal
    run of the same character)."""
    blocks: list[Block] = []
    opened: tuple[str, str, int] | None = None
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if opened is None:
            match = FENCE.match(line)
            if match:
                opened, body = (match.group(1), match.group(2), number), []
            continue
        fence, language, start = opened
        stripped = line.strip()
        if stripped.startswith(fence) and stripped == fence[0] * len(stripped):
            blocks.append(Block(language, "".join(f"{b}\n" for b in body), start))
            opened = None
        else:
            body.append(line)
    assert opened is None, f"README.md: the block opened on line {opened[2]} never closes"
    return blocks


def assign(blocks: Sequence[Block], keys: Sequence[str]) -> dict[str, list[Block]]:
    """Each key's blocks: a block goes to the key it contains that no other contained key holds."""
    owners: dict[str, list[Block]] = {key: [] for key in keys}
    unknown: list[str] = []
    for block in blocks:
        found = [key for key in keys if key in block.text]
        owners_of_block = [k for k in found if not any(k != o and k in o for o in found)]
        if len(owners_of_block) == 1:
            owners[owners_of_block[0]].append(block)
        else:
            unknown.append(f"line {block.line} ({block.language or 'no language'}): "
                           f"{block.text.splitlines()[0] if block.text else ''!r} "
                           f"matches {owners_of_block or 'no key'}")
    assert not unknown, "README blocks BLOCKS does not map to one entry:\n" + "\n".join(unknown)
    return owners


def block(key: str) -> Block:
    """The README block that ``key`` names in ``BLOCKS``."""
    (found,) = assign(readme_blocks(README.read_text()), list(BLOCKS))[key]
    return found


def shell_commands(text: str) -> list[list[str]]:
    """A shell block's commands as argv lists: comments dropped, ``\\`` continuations joined, a
    quoted argument allowed to span lines."""
    commands: list[list[str]] = []
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line + "\n"
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the argument goes on on the next line
            continue
        if argv:
            commands.append(argv)
        pending = ""
    assert not pending.strip(), f"unterminated command: {pending!r}"
    return commands


def is_pagedserve(argv: Sequence[str]) -> bool:
    return bool(argv) and argv[0] in DOCUMENTED_EXECUTABLES


def parses(argv: Sequence[str]) -> Any:
    """``argv`` (a ``pagedserve`` command) through the real parser, without running it."""
    assert is_pagedserve(argv), argv
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(list(argv[1:]))
    except SystemExit as exit_:
        raise AssertionError(
            f"{shlex.join(argv)} does not parse (exit {exit_.code}): {errors.getvalue().strip()}"
        ) from None


# ---- servers as the README starts them ---------------------------------------------------------


@dataclass
class Server:
    """A ``pagedserve serve`` process started from a README command, on loopback ports."""

    process: ServeProcess
    http_port: int | None
    metrics_port: int

    @property
    def address(self) -> str:
        return self.process.address

    def at_server(self, text: str) -> str:
        """``text`` with the documented addresses replaced by this server's."""
        ports = {GRPC_PORT: self.address.rsplit(":", 1)[1], METRICS_PORT: str(self.metrics_port)}
        if self.http_port is not None:
            ports[HTTP_PORT] = str(self.http_port)
        for port, actual in ports.items():
            for host in DOCUMENTED_HOSTS:
                text = text.replace(f"{host}:{port}", f"127.0.0.1:{actual}")
        for port in (GRPC_PORT, HTTP_PORT, METRICS_PORT):
            # Never a default port left over: it could reach another server on this machine.
            assert f":{port}" not in text, f"an address this server does not have: {text!r}"
        return text


def _free_port() -> int:
    """A port free a moment ago (``--http-port 0`` turns the HTTP API off, not ephemeral)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_flags(argv: Sequence[str], flags: Mapping[str, str]) -> list[str]:
    """``argv`` with each flag's value replaced, or the flag added where it is absent."""
    out = list(argv)
    for flag, value in flags.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def snippet_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def documented_server(argv: Sequence[str], log: Path, *, http: bool) -> Iterator[Server]:
    """Run the README's ``pagedserve serve`` command on loopback until SERVING; drained on exit."""
    assert is_pagedserve(argv) and argv[1] == "serve", argv
    http_port = _free_port() if http else None
    command = [str(PAGEDSERVE), *with_flags(argv[1:], {
        "--host": "127.0.0.1", "--port": "0", "--http-port": str(http_port or 0),
        "--metrics-host": "127.0.0.1", "--metrics-port": "0",
    })]
    with open(log, "wb") as out:
        popen = subprocess.Popen(command, cwd=REPO_ROOT, env=snippet_env(), stdout=out,
                                 stderr=subprocess.STDOUT)
    process = ServeProcess(popen, log)
    try:
        process.wait_listening()
        process.wait_serving()
        metrics = METRICS_LOGGED.search(process.log_text())
        assert metrics, f"no metrics address in the log:\n{process.log_text()}"
        yield Server(process, http_port, int(metrics.group(1)))
    finally:
        if process.running():
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The HTTP section's ``pagedserve serve``: the default model under its directory's name."""
    serve = shell_commands(block(HTTP_BLOCK).text)[0]
    log = tmp_path_factory.mktemp("readme") / "serve.log"
    with documented_server(serve, log, http=True) as started:
        yield started


@pytest.fixture(scope="module")
def triton_server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The Triton section's ``pagedserve serve --port 8001 --served-model-name smollm2``."""
    (serve,) = [argv for argv in shell_commands(block('pip install "tritonclient[grpc]"').text)
                if is_pagedserve(argv)]
    log = tmp_path_factory.mktemp("readme") / "serve-triton.log"
    with documented_server(serve, log, http=False) as started:
        yield started


def run_python(source: str, cwd: Path) -> str:
    """A snippet in a fresh interpreter, as a reader runs it; its stdout."""
    done = subprocess.run([sys.executable, "-c", source], cwd=cwd, env=snippet_env(),
                          capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def run_command(argv: Sequence[str], cwd: Path = REPO_ROOT) -> str:
    """A README command (``pagedserve`` the virtualenv's); its stdout."""
    command = [str(PAGEDSERVE), *argv[1:]] if is_pagedserve(argv) else list(argv)
    done = subprocess.run(command, cwd=cwd, env=snippet_env(), capture_output=True, text=True,
                          timeout=SNIPPET_TIMEOUT_S)
    assert done.returncode == 0, f"{shlex.join(argv)}: exit {done.returncode}:\n{done.stderr}"
    return done.stdout


# ---- the table ---------------------------------------------------------------------------------


def test_every_block_is_checked() -> None:
    owners = assign(readme_blocks(README.read_text()), list(BLOCKS))
    stale = {key: len(found) for key, found in owners.items() if len(found) != 1}
    assert not stale, f"BLOCKS keys that name no README block, or several: {stale}"
    tests = {name for name, value in globals().items()
             if name.startswith("test_") and callable(value)}
    missing = {name for names in BLOCKS.values() for name in names} - tests
    assert not missing, f"BLOCKS names tests this module lacks: {missing}"


def test_blocks_are_read_as_markdown_fences() -> None:
    text = "a\n```bash\nx \\\n  y\n```\n\n~~~~\n```\nz\n~~~~\n"
    assert readme_blocks(text) == [Block("bash", "x \\\n  y\n", 2), Block("", "```\nz\n", 7)]
    assert shell_commands("x \\\n  --a 1  # note\ny '{\n  \"k\": 1}'\n") == [
        ["x", "--a", "1"], ["y", '{\n  "k": 1}'],
    ]


# ---- commands that are parsed, not run ---------------------------------------------------------


@pytest.mark.parametrize("key", PARSED_ONLY)
def test_commands_parse(key: str) -> None:
    commands = shell_commands(block(key).text)
    assert commands
    for argv in commands:
        if is_pagedserve(argv):
            parses(argv)
        elif argv[0] == "export":
            (name,) = [a.split("=", 1)[0] for a in argv[1:]]
            assert name == SERVER_API_KEY_ENV == CLIENT_API_KEY_ENV, name
        else:
            raise AssertionError(f"no check for {shlex.join(argv)}")


def test_trace_commands_meet_on_one_port() -> None:
    """The viewer's default port is the one the serve line exports to."""
    traces, serve, generate = shell_commands(block("pagedserve traces  ").text)
    endpoint = parses(serve).otlp_traces_endpoint
    assert endpoint == f"http://127.0.0.1:{parses(traces).port}"
    assert parses(generate).server == f"127.0.0.1:{GRPC_PORT}"


def test_the_trace_sample_is_what_the_viewer_prints() -> None:
    """Each line of the sample is what ``TracePrinter`` prints for such a span: the tree of the
    sample's names, durations and attributes (the root's cut short with ``...``) printed anew
    equals it."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from pagedserve.backend.telemetry.trace_viewer import TracePrinter

    lines = block("trace f84650cfa9284e091015f0c085d090f6").text.splitlines()
    trace_id = bytes.fromhex(lines[0].removeprefix("trace "))
    spans = []
    for number, line in enumerate(lines[1:], start=1):
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name, *rest = line.strip().split("  ")
        kind = Span.SPAN_KIND_SERVER if rest[0] == "SERVER" else Span.SPAN_KIND_INTERNAL
        rest = rest[1:] if rest[0] == "SERVER" else rest
        ms = float(rest[0].removesuffix(" ms"))
        span = Span(name=name, trace_id=trace_id, span_id=number.to_bytes(8, "big"),
                    start_time_unix_nano=number, end_time_unix_nano=number + int(ms * 1e6),
                    kind=kind)
        if depth:
            span.parent_span_id = (1).to_bytes(8, "big")
        for pair in rest[1:]:
            if pair == "...":
                continue
            key, value = pair.split("=", 1)
            attribute = span.attributes.add(key=key)
            if value.isdigit():
                attribute.value.int_value = int(value)
            else:
                attribute.value.string_value = value
        spans.append(span)
    out = io.StringIO()
    assert TracePrinter(out).add(spans[1:] + spans[:1]) == 1
    printed = out.getvalue().splitlines()
    assert printed[0] == lines[0] and printed[2:] == lines[2:]
    assert lines[1].endswith("  ...") and printed[1].startswith(lines[1].removesuffix("  ..."))


def test_documented_ports_are_the_defaults() -> None:
    """The snippets' addresses are the servers' defaults, so rewriting them to the test servers'
    ports changes nothing else; the HTTP section's serve line says so in its comment."""
    serve = shell_commands(block(HTTP_BLOCK).text)[0]
    assert serve == ["pagedserve", "serve"]
    args = parses(serve)
    assert (args.port, args.http_port, args.metrics_port) == (GRPC_PORT, HTTP_PORT, METRICS_PORT)
    comment = block(HTTP_BLOCK).text.splitlines()[0]
    assert f"gRPC on {GRPC_PORT}, HTTP on {HTTP_PORT}, metrics on {METRICS_PORT}" in comment
    assert parses(["pagedserve", "generate", "hi"]).server is None
    from pagedserve.clients.cli import DEFAULT_SERVER

    assert DEFAULT_SERVER == f"127.0.0.1:{GRPC_PORT}"


def test_make_targets_run_the_documented_commands() -> None:
    """``make -n`` prints what a target would run: ``serve`` ends in the serve command,
    ``test`` runs ``make check``'s mypy and ruff, then the whole suite."""
    assert shell_commands(block("make serve   # install").text) == [
        ["make", "serve"], ["make", "test"],
    ]
    assert shell_commands(block("make serve").text) == [["make", "serve"]]
    # Not the flags of a make that may be running this suite (`make test`).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}

    def dry_run(target: str) -> list[str]:
        done = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=MAKE_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()

    serve = dry_run("serve")
    assert serve[-1] == ".venv/bin/pagedserve serve", serve
    parses(shlex.split(serve[-1]))
    test = dry_run("test")
    assert test[-1] == ".venv/bin/python -m pytest -q", test
    assert any(".venv/bin/mypy" in line for line in test), test
    assert any(".venv/bin/ruff check" in line for line in test), test


# ---- against the servers -----------------------------------------------------------------------


@pytest.mark.slow
def test_generate_prints_the_documented_answer(server: Server) -> None:
    generate = block(QUICK_START)
    (argv,) = shell_commands(server.at_server(generate.text))
    expected = block("The capital of France is Paris.").text
    assert run_command(argv).strip() == expected.strip()


@pytest.mark.slow
def test_python_client_streams_a_reply(server: Server, tmp_path: Path) -> None:
    out = run_python(server.at_server(block('GenerationClient("127.0.0.1:8001")').text), tmp_path)
    assert out.strip(), "the snippet printed no reply"


@pytest.mark.slow
def test_curl_chat_completion_answers(server: Server) -> None:
    """The curl command as written (urllib sends the same request where curl is missing)."""
    commands = shell_commands(server.at_server(block(HTTP_BLOCK).text))
    (curl,) = commands[1:]
    assert curl[0] == "curl", curl
    if shutil.which("curl"):
        done = subprocess.run(curl, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
        assert done.returncode == 0, done.stderr
        body = done.stdout
    else:
        url, headers, data = _curl_request(curl[1:])
        request = urllib.request.Request(url, data=data.encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as reply:
            body = reply.read().decode()
    reply_json = json.loads(body)
    assert "choices" in reply_json, reply_json
    assert "Paris" in reply_json["choices"][0]["message"]["content"], reply_json


def _curl_request(args: Sequence[str]) -> tuple[str, dict[str, str], str]:
    """URL, headers and body of a ``curl -s URL -H ... -d ...`` argument list."""
    url, headers, data = "", {}, ""
    rest = iter(args)
    for arg in rest:
        if arg == "-H":
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data = next(rest)
        elif arg == "-s":
            continue
        else:
            assert not url and not arg.startswith("-"), f"an option this reader lacks: {arg}"
            url = arg if "://" in arg else f"http://{arg}"
    return url, headers, data


@pytest.mark.slow
def test_openai_client_streams_a_reply(server: Server, tmp_path: Path) -> None:
    out = run_python(server.at_server(block("from openai import OpenAI").text), tmp_path)
    assert out.strip(), "the snippet printed no reply"


def promql_metric_names(text: str) -> set[str]:
    """The metric names a PromQL block selects: identifiers that are neither a function or an
    aggregation (followed by a parenthesis) nor a label (grouping lists, matchers)."""
    text = re.sub(r"#.*", "", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    keywords = {"and", "or", "unless", "bool", "offset"}
    return {match.group(1) for match in re.finditer(r"\b([A-Za-z_:][\w:]*)\s*(\()?", text)
            if not match.group(2) and match.group(1) not in keywords}


@pytest.mark.slow
def test_promql_names_exported_metrics(server: Server) -> None:
    queries = [line for line in block("# p95 time to first token").text.splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    per_query = {query: promql_metric_names(query) for query in queries}
    assert all(per_query.values()), f"queries that select no metric: {per_query}"
    queried = set().union(*per_query.values())
    # Labelled series appear once a request has been counted, so one is made first.
    with GenerationClient(server.address) as client:
        client.complete("Hello", max_tokens=4, temperature=0.0, timeout=CALL_TIMEOUT_S)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=CALL_TIMEOUT_S) as reply:
        scrape = reply.read().decode()
    exported = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines()
                if line and not line.startswith("#")}
    assert queried <= exported, f"not on /metrics: {sorted(queried - exported)}"


@pytest.mark.slow
def test_triton_client_streams_and_infers(triton_server: Server, tmp_path: Path) -> None:
    """Streamed, the completion then a newline; unary, the prompt and the same completion."""
    out = run_python(triton_server.at_server(block('MODEL = "smollm2"').text), tmp_path)
    prompt = "The capital of France is"
    with GenerationClient(triton_server.address) as client:
        completion = client.complete(prompt, max_tokens=32, temperature=0.0,
                                     timeout=CALL_TIMEOUT_S).text
    assert "Paris" in completion
    assert out == f"{completion}\n{prompt}{completion}\n"


def test_triton_client_package_is_installable() -> None:
    """The pip line names the installed distribution and an extra it declares."""
    (pip,) = [argv for argv in shell_commands(block('pip install "tritonclient[grpc]"').text)
              if argv[0] == "pip"]
    assert pip[:2] == ["pip", "install"]
    (requirement,) = pip[2:]
    match = re.fullmatch(r"([\w.-]+)\[([\w,-]+)\]", requirement)
    assert match, requirement
    extras = distribution(match.group(1)).metadata.get_all("Provides-Extra") or []
    assert set(match.group(2).split(",")) <= set(extras), extras


# ---- in-process, the default model -------------------------------------------------------------

# Runs the README's offline blocks in one interpreter (the chat block goes on from the generate
# block's ``llm``), each block's stdout and ``outputs`` kept apart.
OFFLINE_DRIVER = """
import contextlib, io, json, sys
namespace, results = {}, []
for source in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<README.md>", "exec"), namespace)
    texts = [o.text for o in namespace["outputs"]]
    results.append({"stdout": out.getvalue(), "texts": texts})
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


@pytest.mark.slow
def test_offline_llm_generates_and_chats(default_model_dir: Path, tmp_path: Path) -> None:
    sources = [block("from pagedserve import LLM, SamplingParams").text,
               block("outputs = llm.chat(").text]
    results_file = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_DRIVER, json.dumps(sources), str(results_file)],
        cwd=tmp_path, env=snippet_env(), capture_output=True, text=True,
        timeout=SNIPPET_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    generated, chatted = json.loads(results_file.read_text())
    assert len(generated["texts"]) == 2 and "Paris" in generated["texts"][0], generated
    assert all(text in generated["stdout"] for text in generated["texts"]), generated
    (reply,) = chatted["texts"]
    assert reply.strip() and chatted["stdout"] == reply + "\n", chatted


@pytest.mark.slow
def test_offline_generate_streams_an_answer(default_model_dir: Path) -> None:
    """The offline one-liner runs (sampled at the default temperature: any answer will do);
    the benchmark beside it only parses (test_commands_parse)."""
    key = 'pagedserve generate "What is the capital of France?"'
    (generate,) = [argv for argv in shell_commands(block(key).text) if argv[1] == "generate"]
    assert run_command(generate).strip(), "no answer"


# ---- deployment: the files the commands name ---------------------------------------------------


def test_docker_commands_name_validated_files() -> None:
    """No Docker engine runs here: the builds name the Dockerfiles tests/deploy lints and
    checks, from the repository root, and the run uses a built tag, a port the image exposes
    and its cache volume."""
    from tests.deploy.test_deploy_docker import DOCKERFILES

    built: dict[str, Path] = {}
    runs: list[list[str]] = []
    for argv in shell_commands(block("docker build -f deploy/docker/Dockerfile.cpu").text):
        assert argv[0] == "docker", argv
        if argv[1] == "build":
            options = _options(argv[2:-1])
            dockerfile = REPO_ROOT / options["-f"]
            assert dockerfile in DOCKERFILES.values() and dockerfile.is_file(), dockerfile
            assert argv[-1] == ".", "images build from the repository root"
            built[options["-t"]] = dockerfile
        else:
            assert argv[1] == "run", argv
            runs.append(argv)
    assert runs and len(built) == len(DOCKERFILES)
    for argv in runs:
        options = _options([a for a in argv[2:-1] if a != "--rm"])
        dockerfile = built[argv[-1]]
        text = dockerfile.read_text()
        container_port = options["-p"].rsplit(":", 1)[1]
        exposed = re.search(r"^EXPOSE\s+(.+)$", text, re.M)
        assert exposed and container_port in exposed.group(1).split(), (
            f"{dockerfile.name} does not expose {container_port}"
        )
        volume = options["-v"].split(":", 1)[1]
        declared = re.search(rf'^VOLUME\s+\["{re.escape(volume)}"\]', text, re.M)
        assert declared, f"{dockerfile.name} declares no VOLUME {volume}"


def _options(args: Sequence[str]) -> dict[str, str]:
    """``-f X -t Y`` as ``{"-f": "X", "-t": "Y"}``."""
    assert len(args) % 2 == 0, args
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert all(k.startswith("-") for k in pairs), args
    return pairs


def test_kubectl_commands_apply_validated_kustomizations() -> None:
    """No cluster here: the namespace is the one the manifests render into, and every
    ``apply -k`` directory is one tests/deploy renders with kustomize and validates."""
    from tests.deploy.kustomize_render import GATEWAY, NAMESPACE, TARGETS

    rendered = {target.directory for target in (*TARGETS, GATEWAY) if not target.components}
    applied = []
    for argv in shell_commands(block("kubectl apply -k deploy/k8s/overlays/cpu").text):
        assert argv[0] == "kubectl", argv
        if argv[1] == "create":
            assert argv[2:] == ["namespace", NAMESPACE], argv
            continue
        assert argv[1:3] == ["apply", "-k"] and len(argv) == 4, argv
        directory = REPO_ROOT / argv[3]
        assert (directory / "kustomization.yaml").is_file(), f"no kustomization in {argv[3]}"
        assert directory in rendered, f"{argv[3]} is not rendered by tests/deploy"
        applied.append(directory)
    assert len(applied) >= 1


# ---- the TLS client snippet --------------------------------------------------------------------


def test_tls_snippet_calls_match_the_signatures() -> None:
    """It names a host and files that exist only in a real deployment, so it is not run: every
    call in it must bind to the real callable's signature (a renamed keyword fails)."""
    calls = bound_calls(block('GenerationClient("llm.example:8001"').text)
    assert calls == ["GenerationClient", "InferenceServerClient", "is_server_live"], calls


def bound_calls(source: str) -> list[str]:
    """Bind every call of a snippet to its callee's signature; the callees' names, in order.
    Imports run; a name assigned from a class call stands for an instance of it."""
    tree = ast.parse(source)
    namespace: dict[str, Any] = {}
    instances: dict[str, type] = {}
    bound: list[str] = []
    for statement in tree.body:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([statement], []), "<README.md>", "exec"), namespace)
            continue
        for node in ast.walk(statement):
            if not isinstance(node, ast.Call):
                continue
            callee, self_arg = _callee(node.func, namespace, instances)
            positional = [None] * (len(node.args) + self_arg)
            try:
                inspect.signature(callee).bind(*positional, **{
                    k.arg: None for k in node.keywords if k.arg is not None
                })
            except TypeError as error:
                raise AssertionError(f"{ast.unparse(node)}: {error}") from None
            bound.append(callee.__name__)
        if (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call)):
            cls, _ = _callee(statement.value.func, namespace, instances)
            for target in statement.targets:
                if isinstance(cls, type) and isinstance(target, ast.Name):
                    instances[target.id] = cls
    return bound


def _callee(func: ast.expr, namespace: Mapping[str, Any],
            instances: Mapping[str, type]) -> tuple[Any, bool]:
    """The object a call's function expression names, and whether it is a method of an instance
    (its ``self`` then comes first)."""
    if isinstance(func, ast.Name) and func.id in namespace:
        return namespace[func.id], False
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner = func.value.id
        if owner in namespace:
            return getattr(namespace[owner], func.attr), False
        if owner in instances:
            return getattr(instances[owner], func.attr), True
    raise AssertionError(f"cannot tell what {ast.unparse(func)} calls")
