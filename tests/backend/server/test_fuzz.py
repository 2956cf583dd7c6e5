"""Property-based fuzzing of every request the port answers, against a real server on loopback.

Hypothesis draws native ``GenerateRequest``s (every field, valid and invalid values: huge,
negative, NaN, infinite, empty), KServe v2 requests (random tensors, datatypes, shapes, raw and
typed contents, parameters, sampling JSON), metadata calls, and raw byte strings sent as the
body of every method. Whatever the call, it must end OK or with a documented status code
(README: INVALID_ARGUMENT naming the field, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED for
the KServe methods not served; DEADLINE_EXCEEDED where the call set a short deadline), never
INTERNAL or UNKNOWN, and the server must log no error (but grpc's own line for a stream write
that raced a short deadline). After every example all KV blocks are free again; after every
property the engine is alive, health says SERVING and a plain request succeeds.

Bounded by default (derandomized, ``DEFAULT_EXAMPLES`` examples in all, each call making at
most ``MAX_OUTPUT_TOKENS`` tokens). For a longer or a different run:

    PAGEDSERVE_FUZZ_EXAMPLES=50000 PAGEDSERVE_FUZZ_SEED=7 \\
        .venv/bin/python -m pytest -q -s tests/backend/server/test_fuzz.py
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.backend.server.kserve_convert import INPUTS, OUTPUTS, PROTOCOL_PARAMETERS
from pagedserve.backend.server.kserve_service import UNIMPLEMENTED_METHODS
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.backend.server.status import MAX_DETAILS_BYTES
from pagedserve.backend.server.translate import SAMPLING_FIELDS
from pagedserve.clients.client import GenerationClient
from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.harness import TINY_ENGINE, all_blocks_free, running_server, wait_for

# ---- scale --------------------------------------------------------------------------------------

DEFAULT_EXAMPLES = 2400
TOTAL_EXAMPLES = int(os.environ.get("PAGEDSERVE_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
SEED = os.environ.get("PAGEDSERVE_FUZZ_SEED")
# Each property's share of the examples. Every example makes at least one call.
SHARES: dict[str, float] = {
    "native_fields": 0.25,
    "native_valid": 0.09,
    "tokenize": 0.04,
    "raw_bytes": 0.17,
    "kserve_infer": 0.22,
    "kserve_valid": 0.07,
    "kserve_metadata": 0.06,
    "kserve_stream": 0.10,
}
# The acceptance bound for a CI run: at least this many calls at the default scale.
CI_MIN_CALLS = 2000


def examples(name: str) -> int:
    return max(1, round(TOTAL_EXAMPLES * SHARES[name]))


assert sum(round(DEFAULT_EXAMPLES * s) for s in SHARES.values()) >= CI_MIN_CALLS


def fuzz_settings(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings of one property: its examples, no deadline (a call's time is the
    server's), derandomized unless PAGEDSERVE_FUZZ_SEED is set, no example database."""

    def apply(test: Callable[..., None]) -> Callable[..., None]:
        test = settings(
            max_examples=examples(name),
            deadline=None,
            database=None,
            derandomize=SEED is None,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        )(test)
        return seed(int(SEED))(test) if SEED is not None else test

    return apply


# ---- the server under test ----------------------------------------------------------------------

# Tight bounds keep every call short (random bytes can decode to any max_tokens; a token costs
# a few milliseconds here) and put the limit checks in the path. The default max_tokens (16)
# is over the limit: a request must ask for few tokens to run.
MAX_OUTPUT_TOKENS = 8
MAX_PROMPT_TOKENS = 256
LIMITS = dict(max_output_tokens=MAX_OUTPUT_TOKENS, max_prompt_tokens=MAX_PROMPT_TOKENS)
VOCAB = 49152  # the tiny model's vocabulary
CALL_TIMEOUT_S = 30.0  # a call still open after this is a hang: DEADLINE_EXCEEDED fails it
SHORT_TIMEOUTS_S = (0.001, 0.01, 0.05)
FREE_TIMEOUT_S = 10.0

NATIVE = "pagedserve.v1.GenerationService"
KSERVE = kp.SERVICE_NAME
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"

Code = grpc.StatusCode
# What a client mistake may be answered with (README, "The API" and "Errors").
CLIENT_ERRORS = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED})
# In-band KServe stream errors carry no code; these words mean the server failed itself.
INTERNAL_MARKERS = ("internal error", "generation failed", "model step failed",
                    "output processing failed")


@dataclass
class Outcome:
    """How one call ended: its code, details and the raw response messages."""

    method: str
    code: grpc.StatusCode
    details: str
    responses: list[bytes]


class ErrorLog(logging.Handler):
    """Collects every ERROR the server process logs (a failed step, an unexpected exception in
    a handler, a request answered INTERNAL), so a failure hidden behind an OK status still
    fails the example that caused it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.append(record)

    def take(self) -> list[str]:
        with self._lock:
            taken, self.records = self.records, []
        return [f"{r.name}: {r.getMessage()}" for r in taken]


def _short(method: str) -> str:
    """"GenerationService/Generate" for the port's own services; other paths in full."""
    service = method.split("/", 1)[0]
    if service in (NATIVE, KSERVE, HEALTH, REFLECTION):
        return method.rsplit(".", 1)[-1]
    return method


@dataclass
class Fuzz:
    server: BackgroundServer
    channel: grpc.Channel
    client: GenerationClient
    model: str
    errors: ErrorLog
    greedy_baseline: list[int]
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    ran: set[str] = field(default_factory=set)  # the properties that ran to their end
    _callables: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def _callable(self, method: str, kind: str) -> Any:
        key = (method, kind)
        if key not in self._callables:
            # No serializers: requests and responses stay bytes.
            make = {
                "unary": self.channel.unary_unary,
                "server_stream": self.channel.unary_stream,
                "bidi": self.channel.stream_stream,
            }[kind]
            self._callables[key] = make(f"/{method}")
        return self._callables[key]

    def call(
        self, method: str, kind: str, body: bytes | Sequence[bytes], timeout: float = CALL_TIMEOUT_S
    ) -> Outcome:
        """One call of ``method`` ("service/Method") with raw request bytes; never raises."""
        target = self._callable(method, kind)
        self.errors.take()  # what an earlier, failed example left
        responses: list[bytes] = []
        try:
            if kind == "unary":
                responses.append(target(body, timeout=timeout))
            elif kind == "server_stream":
                responses.extend(target(body, timeout=timeout))
            else:
                assert not isinstance(body, bytes)
                responses.extend(target(iter(body), timeout=timeout))
            code, details = Code.OK, ""
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
        self.calls[(_short(method), code.name)] += 1
        return Outcome(method, code, details, responses)

    def settle(self, timeout: float = CALL_TIMEOUT_S) -> None:
        """After an example: nothing of it left in the engine, nothing logged as an error."""
        wait_for(lambda: all_blocks_free(self.client), FREE_TIMEOUT_S, "every KV block free")
        errors = self.errors.take()
        if timeout < CALL_TIMEOUT_S:
            # grpc's own line for a stream's write that raced the deadline: the call has ended
            # (DEADLINE_EXCEEDED, checked) and the server goes on.
            errors = [e for e in errors if "ExecuteBatchError raised in core" not in e]
        assert not errors, "the server logged errors:\n" + "\n".join(errors)

    def assert_sound(self, name: str, calls_before: int) -> None:
        """After property ``name``: the engine loop is alive, the server serves, no block
        leaked, and it made a call for each of its examples at least."""
        min_calls = examples(name)
        engine = self.server.state.engine
        assert engine is not None and engine.is_alive, engine and engine.failure
        assert self.client.health() == health_pb2.HealthCheckResponse.SERVING
        reply = self.client.complete("Still serving", max_tokens=3, ignore_eos=True)
        assert reply.usage.completion_tokens == 3
        self.settle()
        load = self.client.load()
        assert load.num_free_blocks == load.num_total_blocks and load.kv_cache_usage == 0.0
        made = self.total_calls - calls_before
        assert made >= min_calls, f"{made} calls, fewer than the {min_calls} examples"
        self.ran.add(name)


@pytest.fixture(scope="module")
def fuzz(tiny_llama_dir: Path) -> Iterator[Fuzz]:
    errors = ErrorLog()
    root = logging.getLogger()
    root.addHandler(errors)
    try:
        with running_server(tiny_llama_dir, **TINY_ENGINE, **LIMITS) as server:
            with grpc.insecure_channel(server.address) as channel, GenerationClient(
                server.address
            ) as client:
                info = client.model_info()
                assert info.vocab_size == VOCAB
                baseline = client.complete(
                    "The same words", max_tokens=6, temperature=0.0, ignore_eos=True
                )
                errors.take()  # start-up and warm-up
                state = Fuzz(
                    server, channel, client, info.model_name, errors, list(baseline.token_ids)
                )
                yield state
                print("\nfuzz calls by method and status:")
                for (method, code), n in sorted(state.calls.items()):
                    print(f"  {method:24} {code:20} {n:6}")
                print(f"  {'total':45} {state.total_calls:6}")
    finally:
        root.removeHandler(errors)


# ---- strategies: values -------------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
BOUNDARY_INTS = st.sampled_from(
    [0, 1, -1, 2, 15, 16, 17, 20, 21, 255, 256, 1023, 1024, 1025, VOCAB - 1, VOCAB,
     2**31 - 1, -(2**31)]
)
BOUNDARY_FLOATS = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 2.0000001, 0.5, 1e-45, 1e-320, 1e-7, 3.4e38, 3.5e38,
     1e39, 1.7976931348623157e308, -1e39, math.inf, -math.inf, math.nan]
)
ANY_FLOAT = st.one_of(
    BOUNDARY_FLOATS, st.floats(-3.0, 3.0), st.floats(allow_nan=True, allow_infinity=True)
)
ANY_INT32 = st.one_of(BOUNDARY_INTS, st.integers(-3, 40), INT32)
# max_tokens: mostly few (each token costs time), sometimes anything.
MAX_TOKENS = st.one_of(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), ANY_INT32)
SHORT_TEXT = st.text(max_size=24)
# Strings far longer than any name: an error that echoes one must still reach the client.
LONG_TEXT = st.builds(
    lambda piece, n: piece * n, st.sampled_from(["m", "\u00e9", "ab"]),
    st.sampled_from([1000, 20_000, 200_000]),
)
NAMES = st.one_of(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, LONG_TEXT)
# Control characters: text that tokenizes to no tokens at all.
CONTROL_TEXT = st.text(st.characters(categories=["Cc"]), min_size=1, max_size=4)
# Text that tokenizes to something: letters and spaces.
WORDS = st.text(st.sampled_from("abcdefghij klmnopqrstuvwxyz"), min_size=1, max_size=40).filter(
    lambda s: s.strip()
)
TOKEN_ID = st.integers(0, VOCAB - 1)
SAMPLING_NAMES = sorted(SAMPLING_FIELDS)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """None (the field left unset) or a value."""
    return st.one_of(st.none(), strategy)


def timeouts() -> st.SearchStrategy[float]:
    """Mostly the normal call timeout; sometimes a deadline that expires mid-call."""
    return st.one_of(
        st.just(CALL_TIMEOUT_S), st.just(CALL_TIMEOUT_S), st.just(CALL_TIMEOUT_S),
        st.sampled_from(SHORT_TIMEOUTS_S),
    )


def allowed(timeout: float, *codes: grpc.StatusCode) -> set[grpc.StatusCode]:
    result = {Code.OK, *codes}
    if timeout < CALL_TIMEOUT_S:
        # A deadline the server cannot meet; a call cancelled before it left the client
        # reports the same.
        result.add(Code.DEADLINE_EXCEEDED)
    return result


# ---- strategies: native messages ----------------------------------------------------------------

_NATIVE_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
_NATIVE_INT32S = ("top_k", "min_tokens", "logprobs")
_NATIVE_BOOLS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
# What an INVALID_ARGUMENT from the native service may name.
NATIVE_FIELDS = frozenset(
    {"input", "prompt", "prompt_token_ids", "messages", "messages.content", "messages.role",
     "request_id", "model", "request", "text", *SAMPLING_NAMES}
)


@st.composite
def native_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """A GenerateRequest with any combination of fields and values."""
    request = pb.GenerateRequest()
    request.request_id = draw(st.one_of(st.just(""), NAMES))
    request.model = draw(st.one_of(*[st.just("")] * 6, st.just("tiny-llama"), NAMES))
    form = draw(st.sampled_from(["prompt", "prompt", "ids", "messages", "none"]))
    if form == "prompt":
        request.prompt = draw(st.one_of(WORDS, st.text(max_size=64), CONTROL_TEXT, st.just("")))
    elif form == "ids":
        request.prompt_token_ids.SetInParent()
        ids = st.one_of(TOKEN_ID, ANY_INT32)
        request.prompt_token_ids.ids.extend(draw(st.lists(ids, max_size=300)))
    elif form == "messages":
        request.messages.SetInParent()
        roles = st.sampled_from(["system", "user", "assistant", "", "tool", "wizard"])
        contents = st.one_of(SHORT_TEXT, CONTROL_TEXT)
        for role, content in draw(st.lists(st.tuples(roles, contents), max_size=4)):
            request.messages.messages.add(role=role, content=content)
    for name in _NATIVE_FLOATS:
        value = draw(optional(ANY_FLOAT))
        if value is not None:
            setattr(request, name, value)
    for name in _NATIVE_INT32S:
        value = draw(optional(ANY_INT32))
        if value is not None:
            setattr(request, name, value)
    value = draw(st.one_of(MAX_TOKENS, MAX_TOKENS, MAX_TOKENS, st.none()))
    if value is not None:
        request.max_tokens = value
    for name in _NATIVE_BOOLS:
        value = draw(optional(st.booleans()))
        if value is not None:
            setattr(request, name, value)
    value = draw(optional(st.one_of(st.integers(0, 2**63 - 1), INT64)))
    if value is not None:
        request.seed = value
    stop = st.one_of(st.text(min_size=1, max_size=8), st.just(""), st.text(max_size=300), LONG_TEXT)
    request.stop.extend(draw(st.lists(stop, max_size=draw(st.sampled_from([3, 20])))))
    request.stop_token_ids.extend(draw(st.lists(st.one_of(TOKEN_ID, ANY_INT32), max_size=8)))
    return request


@st.composite
def valid_native_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """A GenerateRequest every field of which is within its documented range."""
    request = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), WORDS)))
    form = draw(st.sampled_from(["prompt", "ids", "messages"]))
    if form == "prompt":
        request.prompt = draw(WORDS)
    elif form == "ids":
        request.prompt_token_ids.ids.extend(draw(st.lists(TOKEN_ID, min_size=1, max_size=40)))
    else:
        request.messages.messages.add(role="user", content=draw(WORDS))
    ranges: dict[str, st.SearchStrategy[Any]] = {
        "temperature": st.one_of(st.just(0.0), st.floats(0.1, 2.0)),
        "top_p": st.floats(0.05, 1.0),
        "top_k": st.one_of(st.just(-1), st.integers(1, 100)),
        "min_p": st.floats(0.0, 0.5),
        "repetition_penalty": st.floats(0.5, 2.0),
        "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "seed": st.integers(0, 2**63 - 1),
        "logprobs": st.integers(0, 20),
        "ignore_eos": st.booleans(),
        "include_stop_str_in_output": st.booleans(),
        "skip_special_tokens": st.booleans(),
    }
    for name, strategy in ranges.items():
        value = draw(optional(strategy))
        if value is not None:
            setattr(request, name, value)
    request.max_tokens = draw(st.integers(1, 4))
    min_tokens = draw(optional(st.integers(0, request.max_tokens)))
    if min_tokens is not None:
        request.min_tokens = min_tokens
    request.stop.extend(draw(st.lists(st.text(min_size=1, max_size=6), max_size=3)))
    request.stop_token_ids.extend(draw(st.lists(TOKEN_ID, max_size=4)))
    return request


# ---- strategies: KServe messages ----------------------------------------------------------------

_INPUT_NAMES = [spec.name for spec in INPUTS]
_OUTPUT_NAMES = [spec.name for spec in OUTPUTS]
_DATATYPES = ["BYTES", "BOOL", "INT32", "UINT32", "FP32", "FP64", "", "bytes"]
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), BOUNDARY_INTS, ANY_FLOAT, SHORT_TEXT,
    st.sampled_from(["0", "0.5", "1e400", "-1", "true", "false", "[1, 2]", "nan", " 8 ", "2" * 30]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(SHORT_TEXT, children, max_size=3)
    ),
    max_leaves=8,
)


def nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * depth + "1" + "}" * depth


NESTED_JSON = st.one_of(
    st.builds(
        nested, st.sampled_from([10, 900, 2000, 50_000]), st.sampled_from(["list", "object"])
    ),
    # Numbers beyond what Python converts from text (4300 digits).
    st.builds(lambda n: "9" * n, st.sampled_from([4000, 5000, 100_000])),
    st.builds(lambda n: "[" + "1" * n + "]", st.sampled_from([5000])),
)


@st.composite
def sampling_json(draw: st.DrawFn) -> bytes:
    """The sampling_parameters tensor's element: JSON of any shape, or not JSON at all."""
    kind = draw(st.sampled_from(["object", "object", "object", "nested", "value", "text", "bytes"]))
    if kind == "object":
        keys = st.one_of(st.sampled_from(SAMPLING_NAMES), SHORT_TEXT)
        obj = draw(st.dictionaries(keys, JSON_VALUES, max_size=6))
        if draw(st.booleans()):
            obj.setdefault("max_tokens", draw(st.integers(1, 3)))
        return json.dumps(obj).encode()
    if kind == "nested":  # as a value of a known field, or the whole document
        text = draw(NESTED_JSON)
        key = draw(st.sampled_from(["stop_token_ids", "stop", "temperature", None]))
        return (text if key is None else f'{{"{key}": {text}}}').encode()
    if kind == "value":
        return json.dumps(draw(JSON_SCALARS)).encode()
    if kind == "text":
        return draw(st.text(max_size=40)).encode()
    return draw(st.binary(max_size=40))


@st.composite
def infer_parameters(draw: st.DrawFn) -> Any:
    parameter = kp.InferParameter()
    choice = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "unset"]))
    if choice == "bool":
        parameter.bool_param = draw(st.booleans())
    elif choice == "int64":
        parameter.int64_param = draw(st.one_of(BOUNDARY_INTS, INT64))
    elif choice == "uint64":
        parameter.uint64_param = draw(st.one_of(BOUNDARY_INTS.filter(lambda v: v >= 0),
                                                st.integers(0, 2**64 - 1)))
    elif choice == "double":
        parameter.double_param = draw(ANY_FLOAT)
    elif choice == "string":
        text = st.one_of(
            JSON_SCALARS.map(lambda v: v if isinstance(v, str) else json.dumps(v)),
            NESTED_JSON, NAMES,
        )
        parameter.string_param = draw(text)
    return parameter


def _bytes_element(raw: bytes) -> bytes:
    return struct.pack("<I", len(raw)) + raw


@dataclass
class Tensor:
    """One input before it is written into a request: its datatype, shape and elements."""

    name: str
    datatype: str
    shape: list[int]
    values: list[bytes] | list[bool]
    contents_field: str = ""  # where typed contents go; "" for the datatype's own field


def _encode_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BOOL" and all(isinstance(v, bool) for v in tensor.values):
        return bytes(int(v) for v in tensor.values)
    return b"".join(_bytes_element(v) if isinstance(v, bytes) else b"\x01" for v in tensor.values)


def _write(request: Any, tensors: list[Tensor], raw_mode: bool) -> None:
    for tensor in tensors:
        written = request.inputs.add(name=tensor.name, datatype=tensor.datatype)
        written.shape.extend(tensor.shape)
        if raw_mode:
            request.raw_input_contents.append(_encode_raw(tensor))
        elif tensor.contents_field:
            getattr(written.contents, tensor.contents_field).extend([1, 2][: len(tensor.values)])
        elif all(isinstance(v, bool) for v in tensor.values):
            written.contents.bool_contents.extend(tensor.values)
        else:
            written.contents.bytes_contents.extend(v for v in tensor.values if isinstance(v, bytes))


PERTURBATIONS = (
    "model", "version", "datatype", "shape", "unknown_input", "drop_input", "duplicate_input",
    "two_elements", "wrong_contents", "raw_entries", "raw_garbage", "outputs", "parameters",
    "wild_json", "prompt",
)


@st.composite
def kserve_requests(draw: st.DrawFn, model: str) -> Any:
    """A ModelInferRequest with any inputs, datatypes, shapes, contents and parameters: a
    well-formed request with a few of its parts broken, so that each check is reached."""
    request = kp.ModelInferRequest(model_name=model, id=draw(st.one_of(st.just(""), NAMES)))
    tensors = [Tensor("text_input", "BYTES", [1], [draw(WORDS).encode()])]
    for name in draw(st.lists(st.sampled_from(_INPUT_NAMES[1:]), max_size=4, unique=True)):
        if name == "sampling_parameters":
            tensors.append(Tensor(name, "BYTES", [1], [draw(sampling_json())]))
        else:
            tensors.append(Tensor(name, "BOOL", [1], [draw(st.booleans())]))
    raw_mode = draw(st.booleans())
    broken = draw(st.lists(st.sampled_from(PERTURBATIONS), max_size=3))
    for part in broken:
        index = draw(st.integers(0, len(tensors) - 1)) if tensors else 0
        if part == "model":
            request.model_name = draw(st.one_of(st.sampled_from(["", model.upper()]), NAMES))
        elif part == "version":
            request.model_version = draw(st.sampled_from(["1", "2", "latest", "-1"]))
        elif part == "datatype" and tensors:
            tensors[index].datatype = draw(st.sampled_from(_DATATYPES))
        elif part == "shape" and tensors:
            tensors[index].shape = draw(st.lists(st.one_of(st.integers(-2, 3), INT64), max_size=3))
        elif part == "unknown_input":
            tensors.append(Tensor(draw(NAMES), draw(st.sampled_from(_DATATYPES)), [1], [b"x"]))
        elif part == "drop_input" and tensors:
            del tensors[index]
        elif part == "duplicate_input" and tensors:
            tensors.append(tensors[index])
        elif part == "two_elements" and tensors:
            tensors[index].values = [*tensors[index].values, *tensors[index].values]  # type: ignore[list-item]
        elif part == "wrong_contents" and tensors:
            tensors[index].contents_field = draw(
                st.sampled_from(["int_contents", "fp32_contents", "uint64_contents"])
            )
        elif part == "prompt" and tensors and tensors[0].name == "text_input":
            tensors[0].values = [draw(st.one_of(
                st.text(max_size=30).map(str.encode), st.binary(max_size=20), st.just(b"")
            ))]
        elif part == "wild_json":
            tensors = [t for t in tensors if t.name != "sampling_parameters"]
            tensors.append(Tensor("sampling_parameters", "BYTES", [1], [draw(sampling_json())]))
        elif part == "parameters":
            keys = st.one_of(
                st.sampled_from(SAMPLING_NAMES), st.sampled_from(sorted(PROTOCOL_PARAMETERS)),
                st.just("triton_custom"), NAMES,
            )
            for key in draw(st.lists(keys, min_size=1, max_size=5, unique=True)):
                request.parameters[key].CopyFrom(draw(infer_parameters()))
        elif part == "outputs":
            names = st.one_of(st.sampled_from(_OUTPUT_NAMES), NAMES)
            for name in draw(st.lists(names, min_size=1, max_size=3)):
                request.outputs.add(name=name)
    if "max_tokens" not in request.parameters and draw(st.integers(0, 5)):
        request.parameters["max_tokens"].int64_param = draw(st.integers(1, 3))
    _write(request, tensors, raw_mode)
    if raw_mode and "raw_entries" in broken:  # one entry too few or too many
        if draw(st.booleans()) and request.raw_input_contents:
            del request.raw_input_contents[-1]
        else:
            request.raw_input_contents.append(b"")
    if raw_mode and "raw_garbage" in broken and request.raw_input_contents:
        at = draw(st.integers(0, len(request.raw_input_contents) - 1))
        request.raw_input_contents[at] = draw(st.binary(max_size=12))
    return request


@st.composite
def valid_kserve_requests(draw: st.DrawFn, model: str, stream: bool = False) -> Any:
    """A ModelInferRequest the generation model must answer OK."""
    request = kp.ModelInferRequest(model_name=model, model_version=draw(st.sampled_from(["", "1"])))
    request.id = draw(st.one_of(st.just(""), WORDS))
    text = draw(WORDS).encode()
    values: dict[str, Any] = {"max_tokens": draw(st.integers(1, 4))}
    for name, strategy in {
        "temperature": st.one_of(st.just(0.0), st.floats(0.1, 2.0)),
        "top_p": st.floats(0.05, 1.0),
        "top_k": st.one_of(st.just(-1), st.integers(1, 100)),
        "seed": st.integers(0, 2**63 - 1),
        "ignore_eos": st.booleans(),
        "stop": st.lists(st.text(min_size=1, max_size=6), max_size=2),
    }.items():
        value = draw(optional(strategy))
        if value is not None:
            values[name] = value
    as_text = draw(st.booleans())  # values as strings, as the vLLM backend's clients send them
    if as_text:
        values = {k: v if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else
                  str(v) for k, v in values.items()}
    flags = {"stream": stream, "exclude_input_in_output": True if stream else draw(optional(
        st.booleans()))}
    for name in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
        flags[name] = draw(optional(st.booleans()))
    raw_mode = draw(st.booleans())
    tensors: list[tuple[str, str, bytes | bool]] = [("text_input", "BYTES", text)]
    via_tensor = draw(st.booleans())
    if via_tensor:
        tensors.append(("sampling_parameters", "BYTES", json.dumps(values).encode()))
    else:
        for key, value in values.items():
            if isinstance(value, list):
                if value:
                    request.parameters[key].string_param = value[0]
            elif isinstance(value, str):
                request.parameters[key].string_param = value
            elif isinstance(value, bool):
                request.parameters[key].bool_param = value
            elif isinstance(value, int):
                request.parameters[key].int64_param = value
            else:
                request.parameters[key].double_param = value
    for name, flag in flags.items():
        if flag is not None:
            tensors.append((name, "BOOL", flag))
    for name, datatype, value in tensors:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[1])
        if raw_mode:
            request.raw_input_contents.append(
                _bytes_element(value) if isinstance(value, bytes) else bytes([int(value)])
            )
        elif isinstance(value, bytes):
            tensor.contents.bytes_contents.append(value)
        else:
            tensor.contents.bool_contents.append(value)
    return request


def _json_keys(request: Any) -> set[str]:
    """The keys of the request's sampling_parameters JSON object(s), where they parse."""
    keys: set[str] = set()
    for index, tensor in enumerate(request.inputs):
        if tensor.name != "sampling_parameters":
            continue
        elements = list(tensor.contents.bytes_contents)
        if index < len(request.raw_input_contents):
            elements.append(bytes(request.raw_input_contents[index][4:]))
        for element in elements:
            try:
                value = json.loads(element)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                keys.update(value)
    return keys


def kserve_named(request: Any) -> set[str]:
    """What an INVALID_ARGUMENT for ``request`` may name: its own inputs, outputs, parameters
    and sampling JSON keys, and the protocol's fixed names."""
    return {
        *_INPUT_NAMES, *_OUTPUT_NAMES, *SAMPLING_NAMES, "raw_input_contents", "request",
        *(t.name for t in request.inputs), *(o.name for o in request.outputs),
        *request.parameters.keys(), *_json_keys(request),
    }


def _names_a_field(details: str, names: set[str] | frozenset[str]) -> bool:
    """Does ``details`` start with one of ``names`` and a colon (or with as much of a long name
    as the server's cut of its details kept)?"""
    head = details.encode()[: MAX_DETAILS_BYTES // 2]
    return any(f"{name}:".encode().startswith(head) or details.startswith(f"{name}:")
               for name in names)


# ---- checks -------------------------------------------------------------------------------------


def check_outcome(outcome: Outcome, codes: set[grpc.StatusCode]) -> None:
    # The client's own transport refusing the server's answer (its trailers too large) is not
    # an answer: the code is the client's.
    assert "metadata size exceeds" not in outcome.details, outcome.details[:300]
    assert outcome.code in codes, (
        f"{outcome.method} ended {outcome.code.name}: {outcome.details[:500]!r} (allowed: "
        f"{sorted(c.name for c in codes)})"
    )


def generate_responses(outcome: Outcome) -> list[pb.GenerateResponse]:
    return [pb.GenerateResponse.FromString(raw) for raw in outcome.responses]


def check_generated(request: pb.GenerateRequest, responses: list[pb.GenerateResponse]) -> None:
    """What every successful generation satisfies, whatever its parameters."""
    assert responses, "an OK generation sent no message"
    final = responses[-1]
    tokens = [t for r in responses for t in r.token_ids]
    assert final.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH), final
    assert final.usage.completion_tokens == len(tokens) >= 1
    max_tokens = request.max_tokens if request.HasField("max_tokens") else 16
    assert len(tokens) <= max_tokens
    if final.finish_reason == pb.FINISH_REASON_LENGTH:
        assert len(tokens) == max_tokens or (
            final.usage.prompt_tokens + len(tokens) >= 1024  # the model's context
        )
    if request.HasField("min_tokens"):
        assert len(tokens) >= request.min_tokens
    assert all(0 <= t < VOCAB for t in tokens)
    if request.request_id:
        assert all(r.request_id == request.request_id for r in responses)
    if request.HasField("logprobs"):
        logprobs = [lp for r in responses for lp in r.logprobs]
        assert [lp.token_id for lp in logprobs] == tokens
        assert all(len(lp.top) == request.logprobs for lp in logprobs)
    else:
        assert not any(r.logprobs for r in responses)


def native_call(fuzz: Fuzz, request: pb.GenerateRequest, method: str, timeout: float) -> Outcome:
    kind = "server_stream" if method == "Generate" else "unary"
    return fuzz.call(f"{NATIVE}/{method}", kind, request.SerializeToString(), timeout)


# ---- properties: native -------------------------------------------------------------------------


def test_native_requests_with_any_fields(fuzz: Fuzz) -> None:
    @fuzz_settings("native_fields")
    @given(native_requests(), st.sampled_from(["Generate", "Complete"]), timeouts())
    def run(request: pb.GenerateRequest, method: str, timeout: float) -> None:
        outcome = native_call(fuzz, request, method, timeout)
        codes = allowed(timeout, Code.INVALID_ARGUMENT)
        if request.model not in ("", fuzz.model):
            codes.add(Code.NOT_FOUND)
        check_outcome(outcome, codes)
        if outcome.code == Code.INVALID_ARGUMENT:
            assert _names_a_field(outcome.details, NATIVE_FIELDS), outcome.details
        elif outcome.code == Code.OK:
            check_generated(request, generate_responses(outcome))
        fuzz.settle(timeout)

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("native_fields", before)


def test_native_requests_in_range_succeed(fuzz: Fuzz) -> None:
    @fuzz_settings("native_valid")
    @given(valid_native_requests(), st.sampled_from(["Generate", "Complete"]))
    def run(request: pb.GenerateRequest, method: str) -> None:
        outcome = native_call(fuzz, request, method, CALL_TIMEOUT_S)
        check_outcome(outcome, {Code.OK})
        check_generated(request, generate_responses(outcome))
        fuzz.settle()

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("native_valid", before)


def test_tokenize_with_any_text(fuzz: Fuzz) -> None:
    @fuzz_settings("tokenize")
    @given(st.text(max_size=200), st.sampled_from(["", fuzz.model, "other"]),
           optional(st.booleans()))
    def run(text: str, model: str, add_special_tokens: bool | None) -> None:
        request = pb.TokenizeRequest(text=text, model=model)
        if add_special_tokens is not None:
            request.add_special_tokens = add_special_tokens
        outcome = fuzz.call(f"{NATIVE}/Tokenize", "unary", request.SerializeToString())
        check_outcome(outcome, {Code.OK, Code.NOT_FOUND} if model == "other" else {Code.OK})
        if outcome.code == Code.OK:
            ids = pb.TokenizeResponse.FromString(outcome.responses[0]).token_ids
            assert all(0 <= t < VOCAB for t in ids)
        fuzz.settle()

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("tokenize", before)


# ---- properties: bytes on every method ----------------------------------------------------------

_KSERVE_STREAMING = {"ModelStreamInfer"}
# Every method of the port, its kind, and the codes a body of arbitrary bytes may get.
METHODS: list[tuple[str, str, frozenset[grpc.StatusCode]]] = [
    (f"{NATIVE}/Generate", "server_stream", CLIENT_ERRORS),
    (f"{NATIVE}/Complete", "unary", CLIENT_ERRORS),
    (f"{NATIVE}/Tokenize", "unary", CLIENT_ERRORS),
    (f"{NATIVE}/GetModelInfo", "unary", CLIENT_ERRORS),
    (f"{NATIVE}/GetLoad", "unary", CLIENT_ERRORS),
    (f"{HEALTH}/Check", "unary", CLIENT_ERRORS),
    (f"{REFLECTION}/ServerReflectionInfo", "bidi", CLIENT_ERRORS),
    *(
        (
            f"{KSERVE}/{m.name}",
            "bidi" if m.name in _KSERVE_STREAMING else "unary",
            CLIENT_ERRORS | ({Code.UNIMPLEMENTED} if m.name in UNIMPLEMENTED_METHODS else set()),
        )
        for m in kp.service_descriptor().methods
    ),
    (f"{NATIVE}/NoSuchMethod", "unary", frozenset({Code.UNIMPLEMENTED})),
    ("pagedserve.v2.GenerationService/Generate", "unary", frozenset({Code.UNIMPLEMENTED})),
]


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 6))]
        else:
            del data[at:]
    return bytes(data)


def well_formed_bodies(method: str, model: str) -> st.SearchStrategy[bytes]:
    """Serialized requests of the method's own type, to mutate."""
    name = method.rsplit("/", 1)[1]
    if name in ("Generate", "Complete"):
        return valid_native_requests().map(lambda r: r.SerializeToString())
    if name == "Tokenize":
        return WORDS.map(lambda t: pb.TokenizeRequest(text=t).SerializeToString())
    if name in ("ModelInfer", "ModelStreamInfer"):
        return valid_kserve_requests(model).map(lambda r: r.SerializeToString())
    if name in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"):
        return st.just(kp.ModelMetadataRequest(name=model, version="1").SerializeToString())
    return st.just(b"")


def test_any_bytes_on_every_method(fuzz: Fuzz) -> None:
    @fuzz_settings("raw_bytes")
    @given(st.sampled_from(METHODS), st.data())
    def run(target: tuple[str, str, frozenset[grpc.StatusCode]], data: st.DataObject) -> None:
        method, kind, codes = target
        body = st.one_of(
            st.binary(max_size=64),
            well_formed_bodies(method, fuzz.model).flatmap(mutated),
        )
        if kind == "bidi":
            outcome = fuzz.call(method, kind, data.draw(st.lists(body, min_size=1, max_size=3)))
        else:
            outcome = fuzz.call(method, kind, data.draw(body))
        check_outcome(outcome, {Code.OK, *codes})
        if method.endswith("/ModelStreamInfer"):
            check_stream_errors(outcome)
        fuzz.settle()

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("raw_bytes", before)


# ---- properties: KServe -------------------------------------------------------------------------


def kserve_infer(fuzz: Fuzz, request: Any, timeout: float = CALL_TIMEOUT_S) -> Outcome:
    return fuzz.call(f"{KSERVE}/ModelInfer", "unary", request.SerializeToString(), timeout)


def text_output(response: Any) -> bytes:
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents[names.index("text_output")]
    (length,) = struct.unpack_from("<I", raw)
    assert len(raw) == 4 + length
    return bytes(raw[4:])


def test_kserve_infer_with_any_tensors(fuzz: Fuzz) -> None:
    @fuzz_settings("kserve_infer")
    @given(kserve_requests(fuzz.model), timeouts())
    def run(request: Any, timeout: float) -> None:
        outcome = kserve_infer(fuzz, request, timeout)
        check_outcome(outcome, allowed(timeout, Code.INVALID_ARGUMENT, Code.NOT_FOUND))
        if outcome.code == Code.INVALID_ARGUMENT:
            assert _names_a_field(outcome.details, kserve_named(request)), outcome.details
        elif outcome.code == Code.NOT_FOUND:
            assert outcome.details.startswith("Request for unknown model:"), outcome.details
        elif outcome.code == Code.OK:
            response = kp.ModelInferResponse.FromString(outcome.responses[0])
            assert response.model_name == fuzz.model
            assert len(response.raw_output_contents) == len(response.outputs)
        fuzz.settle(timeout)

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("kserve_infer", before)


def test_kserve_infer_in_range_succeeds(fuzz: Fuzz) -> None:
    @fuzz_settings("kserve_valid")
    @given(valid_kserve_requests(fuzz.model))
    def run(request: Any) -> None:
        outcome = kserve_infer(fuzz, request)
        check_outcome(outcome, {Code.OK})
        response = kp.ModelInferResponse.FromString(outcome.responses[0])
        assert response.id == request.id
        text_output(response)  # present and well encoded
        fuzz.settle()

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("kserve_valid", before)


METADATA_METHODS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                    "ModelConfig", "ModelStatistics"]


def test_kserve_metadata_with_any_names(fuzz: Fuzz) -> None:
    @fuzz_settings("kserve_metadata")
    @given(
        st.sampled_from(METADATA_METHODS),
        st.one_of(st.just(fuzz.model), st.just(""), SHORT_TEXT),
        st.sampled_from(["", "1", "2", "latest"]),
    )
    def run(method: str, name: str, version: str) -> None:
        request_class = kp.message_class(f"{method}Request")
        fields = request_class.DESCRIPTOR.fields_by_name
        request = request_class(**{k: v for k, v in (("name", name), ("version", version))
                                   if k in fields})
        outcome = fuzz.call(f"{KSERVE}/{method}", "unary", request.SerializeToString())
        ours = name == fuzz.model and version in ("", "1")
        if method.startswith("Server") or method == "ModelReady":
            check_outcome(outcome, {Code.OK})
        elif method == "ModelStatistics" and name == "":
            check_outcome(outcome, {Code.OK})
        else:
            check_outcome(outcome, {Code.OK} if ours else {Code.NOT_FOUND})
        if method == "ModelReady":
            assert kp.ModelReadyResponse.FromString(outcome.responses[0]).ready == ours
        fuzz.settle()

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("kserve_metadata", before)


def check_stream_errors(outcome: Outcome) -> list[Any]:
    """The stream's responses; none of its in-band errors is the server's own failure."""
    responses = [kp.ModelStreamInferResponse.FromString(raw) for raw in outcome.responses]
    for response in responses:
        message = response.error_message.lower()
        assert not any(marker in message for marker in INTERNAL_MARKERS), response.error_message
    return responses


def test_kserve_stream_with_any_requests(fuzz: Fuzz) -> None:
    @fuzz_settings("kserve_stream")
    @given(
        st.lists(
            st.one_of(kserve_requests(fuzz.model), valid_kserve_requests(fuzz.model, stream=True)),
            min_size=1, max_size=4,
        ),
        timeouts(),
    )
    def run(requests: list[Any], timeout: float) -> None:
        for index, request in enumerate(requests):
            request.id = f"s{index}"
        bodies = [r.SerializeToString() for r in requests]
        outcome = fuzz.call(f"{KSERVE}/ModelStreamInfer", "bidi", bodies, timeout)
        check_outcome(outcome, allowed(timeout))
        responses = check_stream_errors(outcome)
        if outcome.code == Code.OK:
            finals = Counter(
                r.infer_response.id for r in responses
                if r.infer_response.parameters["triton_final_response"].bool_param
            )
            assert finals == Counter(r.id for r in requests), finals
            for r in responses:
                if r.error_message:
                    prefix = f"[request id: {r.infer_response.id}] "
                    assert r.error_message.startswith(prefix), r.error_message
                    request = requests[int(r.infer_response.id[1:])]
                    details = r.error_message.removeprefix(prefix)
                    assert details.startswith("Request for unknown model:") or _names_a_field(
                        details, kserve_named(request)
                    ), details
        fuzz.settle(timeout)

    before = fuzz.total_calls
    run()
    fuzz.assert_sound("kserve_stream", before)


def test_the_server_is_unharmed_after_the_run(fuzz: Fuzz) -> None:
    """Whatever ran before in this module: the engine is alive, its blocks are free, and
    greedy output is what it was before the first call."""
    engine = fuzz.server.state.engine
    assert engine is not None and engine.is_alive
    first = fuzz.client.complete("The same words", max_tokens=6, temperature=0.0, ignore_eos=True)
    again = fuzz.client.complete("The same words", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert list(first.token_ids) == list(again.token_ids)
    assert list(first.token_ids) == fuzz.greedy_baseline
    fuzz.settle()
    if fuzz.ran == set(SHARES):  # the whole module ran (not a -k selection)
        assert fuzz.total_calls >= sum(examples(name) for name in SHARES)
        if TOTAL_EXAMPLES == DEFAULT_EXAMPLES:
            assert fuzz.total_calls >= CI_MIN_CALLS
