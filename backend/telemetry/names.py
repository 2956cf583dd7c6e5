"""Span names and attribute keys: the OpenTelemetry GenAI, RPC and HTTP conventions, then ours.

Kept as plain strings rather than imported from opentelemetry-semantic-conventions, whose GenAI
names live in an unstable (``_incubating``) module.
"""

from __future__ import annotations

# -- OpenTelemetry GenAI conventions ----------------------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_PRESENCE_PENALTY = "gen_ai.request.presence_penalty"
GEN_AI_REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"

OPERATION_TEXT_COMPLETION = "text_completion"
OPERATION_CHAT = "chat"
PROVIDER = "pagedserve"

# -- RPC and error conventions ----------------------------------------------------------------
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
ERROR_TYPE = "error.type"

# -- HTTP conventions (the OpenAI-compatible API) -----------------------------------------------
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
URL_SCHEME = "url.scheme"
# error.type of an HTTP request whose client went away before its response was complete.
ERROR_CLIENT_DISCONNECTED = "client_disconnected"

# -- ours ---------------------------------------------------------------------------------------
QUEUE_SPAN = "queue"
PREFILL_SPAN = "prefill"
DECODE_SPAN = "decode"
STEP_SPAN = "engine.step"
PREEMPTION_EVENT = "preempted"

REQUEST_ID = "pagedserve.request.id"
TIME_TO_FIRST_TOKEN = "pagedserve.time_to_first_token"  # seconds, arrival -> first token
TIME_IN_QUEUE = "pagedserve.time_in_queue"  # seconds, arrival -> first scheduled
PREEMPTIONS = "pagedserve.preemptions"
PREFILL_CHUNKS = "pagedserve.prefill.chunks"
STEP_BATCH_SIZE = "pagedserve.step.batch_size"
STEP_PREFILL_TOKENS = "pagedserve.step.prefill_tokens"
STEP_DECODE_TOKENS = "pagedserve.step.decode_tokens"
STEP_PREEMPTED = "pagedserve.step.preempted"
KV_CACHE_USAGE = "pagedserve.kv_cache.usage"  # 0..1
