"""How the served model describes itself over KServe: metadata, configuration, statistics.

The configuration is the one Triton's vLLM backend gives its models: a decoupled transaction
policy (any number of responses per request) and ``max_batch_size`` 0 (the engine batches
requests itself, so tensors carry no batch dimension).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve import __version__
from pagedserve.backend.engine.request import RequestTimes
from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.backend.server.kserve_convert import INPUTS, OUTPUTS

if TYPE_CHECKING:
    from pagedserve.inference import grpc_service_pb2 as gs

SERVER_NAME = "pagedserve"
# Models have one version; requests may name it or leave it empty.
MODEL_VERSION = "1"
PLATFORM = "pagedserve"
BACKEND = "pagedserve"
# Protocol extensions this server implements (as ServerMetadata lists them).
EXTENSIONS = ("model_configuration", "statistics", "parameters", "binary_tensor_data")

_NS_PER_S = 1_000_000_000
_MS_PER_S = 1000


def server_metadata() -> gs.ServerMetadataResponse:
    return kp.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)


def model_metadata(model_name: str) -> gs.ModelMetadataResponse:
    response = kp.ModelMetadataResponse(
        name=model_name, versions=[MODEL_VERSION], platform=PLATFORM
    )
    for spec in INPUTS:
        response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.dims)
    for spec in OUTPUTS:
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.dims)
    return response


def model_config(model_name: str, max_model_len: int) -> gs.ModelConfigResponse:
    config = kp.ModelConfig(name=model_name, platform=PLATFORM, backend=BACKEND, max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    data_type = kp.DATA_TYPE.values_by_name
    for spec in INPUTS:
        config.input.add(
            name=spec.name,
            data_type=data_type[spec.config_data_type].number,
            dims=spec.dims,
            optional=spec.optional,
        )
    for spec in OUTPUTS:
        config.output.add(
            name=spec.name, data_type=data_type[spec.config_data_type].number, dims=spec.dims
        )
    config.parameters["max_model_len"].string_value = str(max_model_len)
    return kp.ModelConfigResponse(config=config)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * _NS_PER_S))


@dataclass
class ModelStats:
    """Cumulative counts and durations of the model's requests (event-loop side only).

    ``success``/``fail`` time a request from arrival at the server to its last response;
    ``queue`` from arrival in the engine to its first scheduled step; ``compute_infer`` from
    then to the last token.
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    last_inference_ms: int = 0

    def record_success(self, elapsed_s: float, times: RequestTimes | None) -> None:
        self.success.add(elapsed_s)
        self.last_inference_ms = int(time.time() * _MS_PER_S)
        if times is not None and times.first_scheduled is not None:
            self.queue.add(times.first_scheduled - times.arrival)
            if times.finished is not None:
                self.compute_infer.add(times.finished - times.first_scheduled)

    def record_failure(self, elapsed_s: float) -> None:
        self.fail.add(elapsed_s)

    def to_proto(self, model_name: str) -> gs.ModelStatistics:
        stats = kp.ModelStatistics(
            name=model_name,
            version=MODEL_VERSION,
            last_inference=self.last_inference_ms,
            inference_count=self.success.count,
            execution_count=self.success.count,
        )
        for name in ("success", "fail", "queue", "compute_infer"):
            duration: Duration = getattr(self, name)
            target = getattr(stats.inference_stats, name)
            target.count = duration.count
            target.ns = duration.ns
        return stats
