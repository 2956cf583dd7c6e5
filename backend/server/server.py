"""The server: every gRPC service on one port, the OpenAI-compatible HTTP API on another
(``backend/server/openai/``), the model loaded after both are open.

``run_server`` is the whole life of a server: start listening (health NOT_SERVING, generation
UNAVAILABLE, HTTP 503), load and warm the engine in a worker thread, flip to SERVING, wait for a
stop signal, drain both ports, shut the engine down. ``BackgroundServer`` runs the same on a
thread of its own for tests and the in-process serving benchmark.

Other services join through ``SERVICE_PLUGINS``: modules whose
``add_<name>_service(server, state) -> list[str]`` registers on the server and returns the full
service names (they then show in reflection and follow the server's health). A module whose
descriptors live outside protobuf's default pool names that pool ``DESCRIPTOR_POOL``, so that
reflection describes its services and messages too.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from pagedserve.backend.config import DEFAULT_MODEL_NAME, EngineConfig, ServerConfig
from pagedserve.backend.server import security
from pagedserve.backend.server.generation_service import add_generation_service
from pagedserve.backend.server.health import add_health_service
from pagedserve.backend.server.state import ServerState
from pagedserve.backend.server.wire import UndecodableRequest, tolerant_deserializer
from pagedserve.backend.telemetry.server_telemetry import ServerTelemetry

if TYPE_CHECKING:
    from pagedserve.backend.engine.client import EngineClient
    from pagedserve.backend.server.openai.app import OpenAIServer

logger = logging.getLogger(__name__)

# (module, function) pairs added when the module exists; each follows add_generation_service.
SERVICE_PLUGINS: tuple[tuple[str, str], ...] = (
    ("pagedserve.backend.server.kserve_service", "add_kserve_service"),
)

_MS = 1000
_READY_POLL_S = 0.05
# After the drain deadline, how long streams get to send their final (abort) message.
_ABORT_FLUSH_S = 5.0
# Exit status after a second stop signal: the shell's convention for "killed by signal N".
_SIGNAL_EXIT_BASE = 128


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments: large messages, keepalive that tolerates common clients."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * _MS)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * _MS)),
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(config.min_client_ping_interval_s * _MS),
        ),
        # Never GOAWAY a client for pinging "too often": the interval above is the policy.
        ("grpc.http2.max_ping_strikes", 0),
        # A second server on a busy port must fail to bind, not silently share the traffic.
        ("grpc.so_reuseport", 0),
    ]


def served_model_name(config: EngineConfig) -> str:
    """The name clients address: --served-model-name, else the model directory's name."""
    if config.model.served_model_name:
        return config.model.served_model_name
    if config.model.model:
        return Path(config.model.model).name
    return DEFAULT_MODEL_NAME


@dataclass
class StartedServer:
    server: grpc.aio.Server
    state: ServerState
    port: int
    service_names: list[str]
    # The OpenAI-compatible HTTP API, unless ``http_port`` is None.
    http: OpenAIServer | None = None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None


async def start_server(config: ServerConfig, state: ServerState) -> StartedServer:
    """Bind, register every service, start. Health says NOT_SERVING until ``mark_ready``."""
    credentials = security.server_credentials(config)  # TLS files checked before anything
    server = grpc.aio.server(
        options=grpc_options(config), interceptors=security.server_interceptors(config)
    )
    names = add_generation_service(server, state)
    default_pool = descriptor_pool.Default()
    pools = dict.fromkeys(names, default_pool)
    for module_name, function_name in SERVICE_PLUGINS:
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        add_service: Callable[[grpc.aio.Server, ServerState], Sequence[str]] = getattr(
            module, function_name
        )
        added = add_service(server, state)
        names.extend(added)
        pools.update(dict.fromkeys(added, getattr(module, "DESCRIPTOR_POOL", default_pool)))
    add_health_service(server, state.health)
    for name in names:
        await state.register_health_service(name)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    pools.update(dict.fromkeys([health_name, reflection.SERVICE_NAME], default_pool))
    add_reflection_service(server, pools)
    address = f"{config.host}:{config.port}"
    try:
        port = (
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
    except RuntimeError as error:  # grpc's "Failed to bind to address"
        raise OSError(f"cannot listen on {address}: {error}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use, or not this machine's address)")
    http = None
    if config.http_port is not None:
        from pagedserve.backend.server.openai.app import OpenAIServer

        # Bound before the gRPC server starts, so a busy HTTP port fails the start alike.
        http = OpenAIServer(config, state, config.drain_timeout_s + _ABORT_FLUSH_S)
        try:
            await http.start()
        except BaseException:
            await server.stop(None)  # gives the gRPC port back
            raise
    await server.start()
    logger.info("listening on %s:%d (%s)", config.host, port, ", ".join(names))
    return StartedServer(server, state, port, names, http)


def reflection_pool(
    pools: Mapping[str, descriptor_pool.DescriptorPool],
) -> descriptor_pool.DescriptorPool:
    """One pool holding the file of every service (``pools``: service name -> the pool its
    descriptors live in) and the files those import.

    grpc's reflection servicer answers from a single pool; the KServe classes live in a private
    one (``kserve_protocol``), so the default pool alone would list their service but answer
    NOT_FOUND for its file and messages, or, in a process that imported Triton's client too,
    describe Triton's copy of the file rather than the one served."""
    merged = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # a pool takes a file after its imports
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        merged.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for name, pool in pools.items():
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            raise LookupError(f"service {name} is not in its descriptor pool") from None
        add(service.file)
    return merged


def add_reflection_service(
    server: grpc.aio.Server, pools: Mapping[str, descriptor_pool.DescriptorPool]
) -> None:
    """grpc's reflection servicer for the services of ``pools`` (see ``reflection_pool``),
    behind the tolerant deserializer: a message that does not parse ends the call with
    INVALID_ARGUMENT, not the generated handler's UNKNOWN."""
    servicer = reflection.aio.ReflectionServicer(list(pools), pool=reflection_pool(pools))

    async def info(
        requests: AsyncIterator[reflection_pb2.ServerReflectionRequest | UndecodableRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async def parsed() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for request in requests:
                if isinstance(request, UndecodableRequest):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"{request.field}: {request.reason}"
                    )
                    raise AssertionError("context.abort returned")  # it raises
                yield request

        # An async generator; the stubs declare it as a coroutine returning an iterable.
        responses = cast(
            AsyncIterator[reflection_pb2.ServerReflectionResponse],
            servicer.ServerReflectionInfo(parsed(), context),
        )
        async for response in responses:
            yield response

    handler = grpc.stream_stream_rpc_method_handler(
        info,
        request_deserializer=tolerant_deserializer(reflection_pb2.ServerReflectionRequest),
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(reflection.SERVICE_NAME,
                                              {"ServerReflectionInfo": handler}),)
    )


async def warm_up(engine: EngineClient) -> None:
    """One short greedy generation through the whole path (prefill, decode, detokenize)."""
    from pagedserve.backend.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    async for _ in engine.generate(prompt="Hello", params=params):
        pass


def wants_engine_process(config: ServerConfig, engine_config: EngineConfig) -> bool:
    """``config.engine_process``, its default resolved: on when the engine runs on CUDA."""
    if config.engine_process is not None:
        return config.engine_process
    from pagedserve.backend.runner.model_runner import resolve_device

    return resolve_device(engine_config.model.device).type == "cuda"


async def load_engine(
    state: ServerState, engine_config: EngineConfig, config: ServerConfig, stop: asyncio.Event
) -> None:
    """Load in a worker thread (the event loop keeps answering), warm up, mark ready. A
    failure is one log line (the traceback at debug level) and, with ``exit_on_load_error``,
    the end of the server."""
    from pagedserve.backend.engine.client import EngineClient

    try:
        engine = await asyncio.to_thread(
            EngineClient.from_config,
            engine_config,
            stream_interval=config.stream_interval,
            engine_process=wants_engine_process(config, engine_config),
        )
        if config.warmup:
            await warm_up(engine)
    except Exception as error:
        cause = f"{type(error).__name__}: {error}"
        logger.debug("model failed to load", exc_info=error)
        await state.mark_failed(cause)
        if config.exit_on_load_error:
            state.fatal = f"the model failed to load: {cause}"
            logger.error("%s; exiting", state.fatal)
            stop.set()
        else:  # the server keeps answering UNAVAILABLE with the reason
            logger.error("the model failed to load: %s (still listening: --exit-on-load-error)", cause)
        return
    state.telemetry.attach(engine)
    await state.mark_ready(engine)
    logger.info("model %s ready", state.served_model_name)


async def run_server(
    config: ServerConfig,
    engine_config: EngineConfig,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[StartedServer], None] | None = None,
    handle_signals: bool = True,
    telemetry: ServerTelemetry | None = None,
) -> int:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT), then drain and shut down.

    ``telemetry`` defaults to what ``config.telemetry`` and the OTEL_* variables ask for.

    Returns the exit code: 0 after a drain (streams cut at its deadline included), 1 when the
    model failed to load or the engine died (``state.fatal`` says why). A second SIGTERM/SIGINT
    exits at once with 128 + the signal number.
    """
    stop = stop or asyncio.Event()
    if handle_signals:
        install_stop_signals(asyncio.get_running_loop(), stop)
    state = ServerState(
        served_model_name=served_model_name(engine_config),
        telemetry=telemetry or ServerTelemetry.from_config(config.telemetry),
    )
    state.telemetry.start()
    try:
        started = await start_server(config, state)
    except BaseException:
        state.telemetry.shutdown()
        raise
    if on_started is not None:
        on_started(started)
    loader = asyncio.create_task(load_engine(state, engine_config, config, stop))
    monitor = asyncio.create_task(watch_engine(state, config.engine_check_interval_s, stop))
    try:
        await stop.wait()
    finally:
        monitor.cancel()
        # Ending by itself, the server's last log line is the cause, not the drain's progress.
        await drain(started, loader, config.drain_timeout_s, quiet=state.fatal is not None)
    return 1 if state.load_error is not None or state.fatal is not None else 0


def install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """The first SIGTERM/SIGINT starts the drain; a second one ends the process at once."""

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            logger.warning("%s during the drain: exiting now", signum.name)
            logging.shutdown()
            os._exit(_SIGNAL_EXIT_BASE + signum)
        logger.info("%s: draining (a second signal exits at once)", signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def watch_engine(state: ServerState, interval_s: float, stop: asyncio.Event) -> None:
    """When the engine dies (its error has failed its requests already): health NOT_SERVING,
    one log line, and the server ends, so that whatever runs it starts a fresh one."""
    while True:
        await asyncio.sleep(interval_s)
        engine = state.engine
        if engine is not None and not engine.is_alive:
            state.fatal = f"the engine has stopped: {engine.failure or 'its loop ended'}"
            logger.error("%s; exiting", state.fatal)
            await state.refresh()
            stop.set()
            return


async def drain(
    started: StartedServer, loader: asyncio.Task[None], timeout_s: float, quiet: bool = False
) -> None:
    """NOT_SERVING, refuse new RPCs, give in-flight ones ``timeout_s``, stop the engine.

    Requests still running at the deadline are aborted in the engine, so each stream ends with
    a final FINISH_REASON_ABORT message (and Complete with its partial output) instead of being
    cut off mid-stream; only what has not finished ``_ABORT_FLUSH_S`` later is cancelled.
    """
    state = started.state
    progress = logger.debug if quiet else logger.info
    progress("draining: in-flight requests get up to %.0f s", timeout_s)
    await state.mark_draining()
    # Stopping closes the listeners and sends GOAWAY (closes idle HTTP connections) at once;
    # open RPCs and HTTP requests keep running.
    stopping = {asyncio.ensure_future(started.server.stop(grace=timeout_s + _ABORT_FLUSH_S))}
    if started.http is not None:
        stopping.add(asyncio.ensure_future(started.http.stop()))
    _, unfinished = await asyncio.wait(stopping, timeout=timeout_s)
    engine_stopped = False
    if unfinished and state.engine is not None:
        load = state.engine.get_load()
        logger.warning(
            "drain deadline: aborting %d running and %d waiting requests",
            load.num_running,
            load.num_waiting,
        )
        # Shutting the engine down aborts every request it holds and delivers their final deltas.
        await asyncio.to_thread(state.engine.shutdown)
        engine_stopped = True
    await asyncio.gather(*stopping)
    if not loader.done():
        # Loading runs in a thread that cannot be interrupted; wait so the engine is shut down.
        await asyncio.shield(loader)
    if state.engine is not None and not engine_stopped:
        await asyncio.to_thread(state.engine.shutdown)
    # Last: the engine's final deltas are in, so every request span can end and be exported.
    await asyncio.to_thread(state.telemetry.shutdown)
    progress("stopped")


class BackgroundServer:
    """``run_server`` on a thread with its own event loop (tests, in-process benchmark)."""

    def __init__(
        self,
        config: ServerConfig,
        engine_config: EngineConfig,
        telemetry: ServerTelemetry | None = None,
    ) -> None:
        self._config = config
        self._engine_config = engine_config
        self._telemetry = telemetry
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._info: StartedServer | None = None
        self._error: BaseException | None = None
        self.exit_code: int | None = None

    @property
    def port(self) -> int:
        assert self._info is not None, "server not started"
        return self._info.port

    @property
    def address(self) -> str:
        host = self._config.host if self._config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def http_port(self) -> int:
        assert self._info is not None and self._info.http_port is not None, "no HTTP API"
        return self._info.http_port

    @property
    def http_address(self) -> str:
        """``host:port`` of the OpenAI-compatible API (``http://`` + this + ``/v1``)."""
        return f"{self.address.rpartition(':')[0]}:{self.http_port}"

    @property
    def state(self) -> ServerState:
        assert self._info is not None, "server not started"
        return self._info.state

    def start(self, timeout_s: float = 30.0) -> str:
        """Start listening (the model loads afterwards); returns the address."""
        self._thread = threading.Thread(target=self._run, name="pagedserve-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError("server did not start listening")
        if self._error is not None:
            raise self._error
        return self.address

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until the model is loaded and warmed; raise if loading failed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state
            if state.load_error is not None:
                raise RuntimeError(f"model failed to load: {state.load_error}")
            if state.ready:
                return
            time.sleep(_READY_POLL_S)
        raise TimeoutError(f"model not ready after {timeout_s} s")

    def _run(self) -> None:
        async def main() -> int:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def started(info: StartedServer) -> None:
                self._info = info
                self._started.set()

            return await run_server(
                self._config,
                self._engine_config,
                stop=self._stop,
                on_started=started,
                handle_signals=False,
                telemetry=self._telemetry,
            )

        try:
            self.exit_code = asyncio.run(main())
        except BaseException as error:  # surfaced by start()/stop()
            self._error = error
            self._started.set()

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait for the server to end by itself (a failed load, a dead engine); its exit
        code, or None if it still runs after ``timeout_s``."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return None
        return self.exit_code

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
