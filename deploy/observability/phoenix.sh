#!/usr/bin/env bash
# Start Arize Phoenix (an OpenTelemetry trace viewer that accepts OTLP) and point a
# `pagedserve serve` at it:
#
#   deploy/observability/phoenix.sh [pagedserve serve flags...]
#
# Phoenix lives in a venv of its own (PHOENIX_VENV, default .phoenix-venv): its dependencies
# must not touch the server's pins. The UI is http://127.0.0.1:${PHOENIX_PORT}; spans arrive
# over OTLP/gRPC on ${PHOENIX_GRPC_PORT}, in the Phoenix project ${PHOENIX_PROJECT}.
# Ctrl-C stops both.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PHOENIX_VENV="${PHOENIX_VENV:-${REPO}/.phoenix-venv}"
PHOENIX_VERSION="${PHOENIX_VERSION:-20.26.1}"
PHOENIX_HOST="${PHOENIX_HOST:-127.0.0.1}"
PHOENIX_PORT="${PHOENIX_PORT:-6006}"
PHOENIX_GRPC_PORT="${PHOENIX_GRPC_PORT:-4317}"
PHOENIX_PROJECT="${PHOENIX_PROJECT:-pagedserve}"
PHOENIX_WORKING_DIR="${PHOENIX_WORKING_DIR:-${REPO}/.phoenix}"
PAGEDSERVE="${PAGEDSERVE:-${REPO}/.venv/bin/pagedserve}"
START_TIMEOUT_S="${START_TIMEOUT_S:-120}"

if [[ ! -x "${PHOENIX_VENV}/bin/phoenix" ]]; then
    echo "installing arize-phoenix ${PHOENIX_VERSION} into ${PHOENIX_VENV}" >&2
    python3 -m venv "${PHOENIX_VENV}"
    "${PHOENIX_VENV}/bin/pip" install --quiet "arize-phoenix==${PHOENIX_VERSION}"
fi

mkdir -p "${PHOENIX_WORKING_DIR}"
PHOENIX_HOST="${PHOENIX_HOST}" PHOENIX_PORT="${PHOENIX_PORT}" \
    PHOENIX_GRPC_PORT="${PHOENIX_GRPC_PORT}" PHOENIX_WORKING_DIR="${PHOENIX_WORKING_DIR}" \
    "${PHOENIX_VENV}/bin/phoenix" serve &
phoenix_pid=$!
server_pid=""
cleanup() {
    [[ -n "${server_pid}" ]] && kill "${server_pid}" 2>/dev/null || true
    kill "${phoenix_pid}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

deadline=$((SECONDS + START_TIMEOUT_S))
until curl -fsS "http://${PHOENIX_HOST}:${PHOENIX_PORT}/healthz" >/dev/null 2>&1; do
    if ((SECONDS > deadline)) || ! kill -0 "${phoenix_pid}" 2>/dev/null; then
        echo "Phoenix did not come up on ${PHOENIX_HOST}:${PHOENIX_PORT}" >&2
        exit 1
    fi
    sleep 1
done
echo "Phoenix UI: http://${PHOENIX_HOST}:${PHOENIX_PORT} (project ${PHOENIX_PROJECT})" >&2

# Phoenix files spans under the project named by this resource attribute.
OTEL_RESOURCE_ATTRIBUTES="openinference.project.name=${PHOENIX_PROJECT}${OTEL_RESOURCE_ATTRIBUTES:+,${OTEL_RESOURCE_ATTRIBUTES}}" \
    "${PAGEDSERVE}" serve \
    --otlp-traces-endpoint "http://${PHOENIX_HOST}:${PHOENIX_GRPC_PORT}" \
    --otlp-traces-protocol grpc "$@" &
server_pid=$!
wait "${server_pid}"
