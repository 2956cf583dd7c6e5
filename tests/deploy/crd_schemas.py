"""Structural checks for the custom resources kubernetes-validate has no schema for.

These are NOT the upstream CRD schemas (those are not available offline here). They are our
own JSON schemas, written from the field names, types and enums of the upstream API
definitions (KEDA keda.sh/v1alpha1, Istio networking.istio.io/v1, KServe serving.kserve.io,
LeaderWorkerSet leaderworkerset.x-k8s.io/v1, the Inference Extension's InferencePool
inference.networking.k8s.io/v1, Gateway API HTTPRoute gateway.networking.k8s.io/v1 standard
channel): every object level we use is closed
(additionalProperties: false), so a misspelt or misplaced field fails. Parts of a custom
resource that are core Kubernetes types (pod templates, containers, HPA behavior) are pulled
out by ``embedded_core_objects`` and validated strictly by kubernetes-validate instead.
"""

from __future__ import annotations

import copy
from typing import Any

Schema = dict[str, Any]

_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_BOOL: Schema = {"type": "boolean"}
_OBJ: Schema = {"type": "object"}
_STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
_INT_OR_STR: Schema = {"type": ["integer", "string"]}
# Go/protobuf durations as Istio takes them: 10s, 1m30s, 250ms.
_DURATION: Schema = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms|us|µs|ns))+$"}
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _closed(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


def _resource(api_version: str, kind: str, spec: Schema) -> Schema:
    metadata = _closed(
        {
            "name": {"type": "string", "pattern": _DNS_LABEL, "maxLength": 63},
            "namespace": {"type": "string", "pattern": _DNS_LABEL},
            "labels": _STR_MAP,
            "annotations": _STR_MAP,
        },
        ("name",),
    )
    return _closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


# --- KEDA ----------------------------------------------------------------------------------

_NUMBER_STRING: Schema = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}

_KEDA_TRIGGER: Schema = {
    **_closed(
        {
            "type": _STR,
            "name": _STR,
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": _BOOL,
            "metadata": _STR_MAP,
            "authenticationRef": _closed({"name": _STR, "kind": _STR}, ("name",)),
        },
        ("type", "metadata"),
    ),
    # The prometheus scaler's own required metadata.
    "if": {"properties": {"type": {"const": "prometheus"}}},
    "then": {
        "properties": {
            "metadata": {
                "required": ["serverAddress", "query", "threshold"],
                "properties": {
                    "serverAddress": {"type": "string", "pattern": r"^https?://"},
                    "threshold": _NUMBER_STRING,
                    "activationThreshold": _NUMBER_STRING,
                },
            }
        }
    },
}

SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    _closed(
        {
            "scaleTargetRef": _closed(
                {"apiVersion": _STR, "kind": _STR, "name": _STR, "envSourceContainerName": _STR},
                ("name",),
            ),
            "pollingInterval": {"type": "integer", "minimum": 1},
            "initialCooldownPeriod": _INT,
            "cooldownPeriod": _INT,
            "idleReplicaCount": _INT,
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "fallback": _closed(
                {"failureThreshold": _INT, "replicas": _INT, "behavior": _STR},
                ("failureThreshold", "replicas"),
            ),
            "advanced": _closed(
                {
                    "restoreToOriginalReplicaCount": _BOOL,
                    # behavior is the core HPA type: checked by kubernetes-validate.
                    "horizontalPodAutoscalerConfig": _closed({"name": _STR, "behavior": _OBJ}),
                    "scalingModifiers": _OBJ,
                }
            ),
            "triggers": {"type": "array", "minItems": 1, "items": _KEDA_TRIGGER},
        },
        ("scaleTargetRef", "triggers"),
    ),
)

# --- Istio ---------------------------------------------------------------------------------

_OUTLIER_DETECTION = _closed(
    {
        "splitExternalLocalOriginErrors": _BOOL,
        "consecutiveLocalOriginFailures": _INT,
        "consecutiveGatewayErrors": _INT,
        "consecutive5xxErrors": _INT,
        "interval": _DURATION,
        "baseEjectionTime": _DURATION,
        "maxEjectionPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "minHealthPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    }
)

_CONNECTION_POOL = _closed(
    {
        "tcp": _closed(
            {
                "maxConnections": _INT,
                "connectTimeout": _DURATION,
                "tcpKeepalive": _OBJ,
                "maxConnectionDuration": _DURATION,
                "idleTimeout": _DURATION,
            }
        ),
        "http": _closed(
            {
                "http1MaxPendingRequests": _INT,
                "http2MaxRequests": _INT,
                "maxRequestsPerConnection": _INT,
                "maxRetries": _INT,
                "idleTimeout": _DURATION,
                "h2UpgradePolicy": {"enum": ["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"]},
                "useClientProtocol": _BOOL,
                "maxConcurrentStreams": _INT,
            }
        ),
    }
)

_TRAFFIC_POLICY = _closed(
    {
        "loadBalancer": _closed(
            {
                "simple": {
                    "enum": [
                        "UNSPECIFIED",
                        "RANDOM",
                        "PASSTHROUGH",
                        "ROUND_ROBIN",
                        "LEAST_REQUEST",
                        "LEAST_CONN",
                    ]
                },
                "consistentHash": _OBJ,
                "localityLbSetting": _OBJ,
                "warmupDurationSecs": _DURATION,
            }
        ),
        "connectionPool": _CONNECTION_POOL,
        "outlierDetection": _OUTLIER_DETECTION,
        "tls": _OBJ,
        "portLevelSettings": {"type": "array"},
        "tunnel": _OBJ,
        "proxyProtocol": _OBJ,
    }
)

DESTINATION_RULE = _resource(
    "networking.istio.io/v1",
    "DestinationRule",
    _closed(
        {
            "host": _STR,
            "trafficPolicy": _TRAFFIC_POLICY,
            "subsets": {"type": "array"},
            "exportTo": {"type": "array", "items": _STR},
            "workloadSelector": _OBJ,
        },
        ("host",),
    ),
)

# Envoy's retry conditions (x-envoy-retry-on and x-envoy-retry-grpc-on) as Istio accepts them,
# or a bare HTTP status code.
_RETRY_CONDITION = (
    r"(5xx|gateway-error|reset|reset-before-request|connect-failure|envoy-ratelimited"
    r"|retriable-4xx|refused-stream|retriable-status-codes|retriable-headers"
    r"|http3-post-connect-failure|cancelled|deadline-exceeded|internal|resource-exhausted"
    r"|unavailable|[1-5][0-9][0-9])"
)

_HTTP_ROUTE = _closed(
    {
        "name": _STR,
        "match": {"type": "array"},
        "route": {
            "type": "array",
            "minItems": 1,
            "items": _closed(
                {
                    "destination": _closed(
                        {
                            "host": _STR,
                            "subset": _STR,
                            "port": _closed({"number": {"type": "integer", "minimum": 1}}),
                        },
                        ("host",),
                    ),
                    "weight": _INT,
                    "headers": _OBJ,
                },
                ("destination",),
            ),
        },
        "timeout": _DURATION,
        "retries": _closed(
            {
                "attempts": {"type": "integer", "minimum": 0},
                "perTryTimeout": _DURATION,
                "retryOn": {
                    "type": "string",
                    "pattern": f"^{_RETRY_CONDITION}(,{_RETRY_CONDITION})*$",
                },
                "retryRemoteLocalities": _BOOL,
                "retryIgnorePreviousHosts": _BOOL,
                "backoff": _DURATION,
            }
        ),
        "headers": _OBJ,
        "fault": _OBJ,
        "mirror": _OBJ,
        "mirrors": {"type": "array"},
        "mirrorPercentage": _OBJ,
        "corsPolicy": _OBJ,
        "rewrite": _OBJ,
        "redirect": _OBJ,
        "directResponse": _OBJ,
        "delegate": _OBJ,
    }
)

VIRTUAL_SERVICE = _resource(
    "networking.istio.io/v1",
    "VirtualService",
    _closed(
        {
            "hosts": {"type": "array", "minItems": 1, "items": _STR},
            "gateways": {"type": "array", "items": _STR},
            "http": {"type": "array", "items": _HTTP_ROUTE},
            "tcp": {"type": "array"},
            "tls": {"type": "array"},
            "exportTo": {"type": "array", "items": _STR},
        }
    ),
)

# --- KServe --------------------------------------------------------------------------------

_PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]
# ServingRuntime fields that are core pod-spec types, checked by kubernetes-validate.
SERVING_RUNTIME_POD_FIELDS = (
    "containers",
    "volumes",
    "nodeSelector",
    "affinity",
    "tolerations",
    "imagePullSecrets",
)

SERVING_RUNTIME = _resource(
    "serving.kserve.io/v1alpha1",
    "ServingRuntime",
    _closed(
        {
            "supportedModelFormats": {
                "type": "array",
                "minItems": 1,
                "items": _closed(
                    {"name": _STR, "version": _STR, "autoSelect": _BOOL, "priority": _INT},
                    ("name",),
                ),
            },
            "protocolVersions": {"type": "array", "minItems": 1, "items": {"enum": _PROTOCOLS}},
            "multiModel": _BOOL,
            "disabled": _BOOL,
            "grpcEndpoint": _STR,
            "grpcDataEndpoint": _STR,
            "httpDataEndpoint": _STR,
            "replicas": _INT,
            "storageHelper": _OBJ,
            "builtInAdapter": _OBJ,
            "labels": _STR_MAP,
            "annotations": _STR_MAP,
            "workerSpec": _OBJ,
            "containers": {"type": "array", "minItems": 1},
            "volumes": {"type": "array"},
            "nodeSelector": _STR_MAP,
            "affinity": _OBJ,
            "tolerations": {"type": "array"},
            "imagePullSecrets": {"type": "array"},
        },
        ("containers",),
    ),
)

# InferenceService component fields that are KServe's own; every other predictor field is a
# core PodSpec field and goes to kubernetes-validate.
ISVC_EXTENSION_FIELDS: dict[str, Schema] = {
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": _INT,
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": _INT,
    "timeout": _INT,
    "canaryTrafficPercent": _INT,
    "logger": _OBJ,
    "batcher": _OBJ,
    "labels": _STR_MAP,
    "annotations": _STR_MAP,
    "deploymentStrategy": _OBJ,
    "autoScaling": _OBJ,
}
# ModelSpec fields of KServe's own; the rest of `model` is a core Container.
ISVC_MODEL_FIELDS: dict[str, Schema] = {
    "modelFormat": _closed({"name": _STR, "version": _STR}, ("name",)),
    "runtime": _STR,
    "protocolVersion": {"enum": _PROTOCOLS},
    "storageUri": {"type": "string", "pattern": r"^(pvc|s3|gs|hf|oci|https?|hdfs|webhdfs)://"},
}

INFERENCE_SERVICE = _resource(
    "serving.kserve.io/v1beta1",
    "InferenceService",
    _closed(
        {
            "predictor": {
                "type": "object",
                # Open here on purpose: the PodSpec remainder is checked strictly as a Pod.
                "properties": {
                    **ISVC_EXTENSION_FIELDS,
                    "model": {
                        "type": "object",
                        "properties": ISVC_MODEL_FIELDS,
                        "required": ["modelFormat"],
                    },
                },
                "required": ["model"],
            },
            "transformer": _OBJ,
            "explainer": _OBJ,
        },
        ("predictor",),
    ),
)

# --- LeaderWorkerSet -----------------------------------------------------------------------

LEADER_WORKER_SET = _resource(
    "leaderworkerset.x-k8s.io/v1",
    "LeaderWorkerSet",
    _closed(
        {
            "replicas": {"type": "integer", "minimum": 0},
            "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
            "rolloutStrategy": _closed(
                {
                    "type": {"enum": ["RollingUpdate"]},
                    "rollingUpdateConfiguration": _closed(
                        {"partition": _INT, "maxUnavailable": _INT_OR_STR, "maxSurge": _INT_OR_STR}
                    ),
                },
                ("type",),
            ),
            "networkConfig": _closed(
                {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}},
                ("subdomainPolicy",),
            ),
            "leaderWorkerTemplate": _closed(
                {
                    # Pod templates: checked by kubernetes-validate.
                    "leaderTemplate": _OBJ,
                    "workerTemplate": _OBJ,
                    "size": {"type": "integer", "minimum": 1},
                    "restartPolicy": {
                        "enum": [
                            "Default",
                            "RecreateGroupOnPodRestart",
                            "RecreateGroupAfterStart",
                            "None",
                        ]
                    },
                    "subGroupPolicy": _OBJ,
                    "volumeClaimTemplates": {"type": "array"},
                },
                ("workerTemplate",),
            ),
        },
        ("leaderWorkerTemplate",),
    ),
)

# --- Gateway API Inference Extension --------------------------------------------------------

_PORT_NUMBER: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}
_PORT: Schema = _closed({"number": _PORT_NUMBER}, ("number",))
_GROUP: Schema = {
    "type": "string",
    "maxLength": 253,
    "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}
_KIND: Schema = {"type": "string", "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
_REF_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": 253}
_LABEL_VALUE: Schema = {
    "type": "string",
    "maxLength": 63,
    "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
}

INFERENCE_POOL = _resource(
    "inference.networking.k8s.io/v1",
    "InferencePool",
    _closed(
        {
            # Labels only (no matchExpressions), so a gateway can turn it into a Service.
            "selector": _closed(
                {
                    "matchLabels": {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": 64,
                        "additionalProperties": _LABEL_VALUE,
                    }
                },
                ("matchLabels",),
            ),
            "targetPorts": {
                "type": "array",
                "minItems": 1,
                "maxItems": 8,
                "uniqueItems": True,
                "items": _PORT,
            },
            "appProtocol": {"enum": ["http", "kubernetes.io/h2c"]},
            "endpointPickerRef": {
                **_closed(
                    {
                        "group": _GROUP,
                        "kind": _KIND,
                        "name": _REF_NAME,
                        "port": _PORT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                    ("name",),
                ),
                # The CRD's rule: a Service (the default kind) needs its port.
                "if": {
                    "anyOf": [
                        {"not": {"required": ["kind"]}},
                        {"properties": {"kind": {"const": "Service"}}},
                    ]
                },
                "then": {"required": ["port"]},
            },
        },
        ("selector", "targetPorts"),
    ),
)

# --- Gateway API (standard channel) ----------------------------------------------------------

_GATEWAY_DURATION: Schema = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
_NAMESPACE: Schema = {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL}
_SECTION_NAME: Schema = {
    "type": "string",
    "maxLength": 253,
    "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
}

_HTTP_PATH_MATCH: Schema = {
    **_closed(
        {
            "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
            "value": {"type": "string", "maxLength": 1024},
        }
    ),
    # Exact and prefix matches are absolute paths.
    "if": {"properties": {"type": {"enum": ["Exact", "PathPrefix"]}}},
    "then": {"properties": {"value": {"pattern": r"^/"}}},
}

HTTP_ROUTE = _resource(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    _closed(
        {
            "parentRefs": {
                "type": "array",
                "maxItems": 32,
                "items": _closed(
                    {
                        "group": _GROUP,
                        "kind": _KIND,
                        "namespace": _NAMESPACE,
                        "name": _REF_NAME,
                        "sectionName": _SECTION_NAME,
                        "port": _PORT_NUMBER,
                    },
                    ("name",),
                ),
            },
            "hostnames": {"type": "array", "maxItems": 16, "items": _STR},
            "rules": {
                "type": "array",
                "minItems": 1,
                "maxItems": 16,
                "items": _closed(
                    {
                        "name": _SECTION_NAME,
                        "matches": {
                            "type": "array",
                            "maxItems": 64,
                            "items": _closed(
                                {
                                    "path": _HTTP_PATH_MATCH,
                                    "headers": {"type": "array"},
                                    "queryParams": {"type": "array"},
                                    "method": {
                                        "enum": [
                                            "GET", "HEAD", "POST", "PUT", "DELETE",
                                            "CONNECT", "OPTIONS", "TRACE", "PATCH",
                                        ]
                                    },
                                }
                            ),
                        },
                        "filters": {"type": "array"},
                        "backendRefs": {
                            "type": "array",
                            "maxItems": 16,
                            "items": _closed(
                                {
                                    "group": _GROUP,
                                    "kind": _KIND,
                                    "name": _REF_NAME,
                                    "namespace": _NAMESPACE,
                                    "port": _PORT_NUMBER,
                                    "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
                                    "filters": {"type": "array"},
                                },
                                ("name",),
                            ),
                        },
                        "timeouts": _closed(
                            {"request": _GATEWAY_DURATION, "backendRequest": _GATEWAY_DURATION}
                        ),
                    }
                ),
            },
        }
    ),
)

# --- The endpoint picker's configuration file (llm-d-router v0.9.0) ---------------------------
# Not a cluster object: the file the picker reads from its ConfigMap. The picker decodes it
# strictly (unknown fields fail its start), plugin parameters included, so it is closed too.

# A Prometheus metric name with optional {label="value"} filters; "" turns a metric off.
_METRIC_SPEC: Schema = {"type": "string", "pattern": r"^([a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})?)?$"}
_LABEL_NAME: Schema = {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}

_METRICS_SOURCE_PARAMETERS = _closed(
    {"scheme": {"enum": ["http", "https"]}, "path": {"type": "string", "pattern": r"^/"},
     "insecureSkipVerify": _BOOL}
)
_ENGINE_CONFIG = _closed(
    {
        "name": {"type": "string", "minLength": 1},
        "queuedRequestsSpec": _METRIC_SPEC,
        "runningRequestsSpec": _METRIC_SPEC,
        "kvUsageSpec": _METRIC_SPEC,
        "loraSpec": _METRIC_SPEC,
        "cacheInfoSpec": _METRIC_SPEC,
        "cacheBlockSizeLabelName": _LABEL_NAME,
        "cacheNumBlocksLabelName": _LABEL_NAME,
        "cacheBlockSizeSpec": _METRIC_SPEC,
        "cacheNumBlocksSpec": _METRIC_SPEC,
        "customMetrics": {
            "type": "array",
            "items": _closed({"attributeKey": _STR, "metricSpec": _METRIC_SPEC},
                             ("attributeKey", "metricSpec")),
        },
    },
    ("name",),
)
_METRICS_EXTRACTOR_PARAMETERS = _closed(
    {
        "engineLabelKey": _STR,
        "defaultEngine": _STR,
        "engineConfigs": {"type": "array", "items": _ENGINE_CONFIG},
    }
)


def _parameters_of(plugin_type: str, parameters: Schema) -> Schema:
    return {
        "if": {"properties": {"type": {"const": plugin_type}}, "required": ["type"]},
        "then": {"properties": {"parameters": parameters}},
    }


_PLUGIN_REF: Schema = _closed({"pluginRef": _STR}, ("pluginRef",))

ENDPOINT_PICKER_CONFIG = _closed(
    {
        "apiVersion": {"const": "llm-d.ai/v1alpha1"},
        "kind": {"const": "EndpointPickerConfig"},
        "featureGates": {"type": "array", "items": _STR},
        "plugins": {
            "type": "array",
            "minItems": 1,
            "items": {
                **_closed({"name": _STR, "type": _STR, "parameters": _OBJ}, ("type",)),
                "allOf": [
                    _parameters_of("metrics-data-source", _METRICS_SOURCE_PARAMETERS),
                    _parameters_of("core-metrics-extractor", _METRICS_EXTRACTOR_PARAMETERS),
                ],
            },
        },
        "schedulingProfiles": {
            "type": "array",
            "items": _closed(
                {
                    "name": _STR,
                    "plugins": {
                        "type": "array",
                        "items": _closed(
                            {"pluginRef": _STR, "weight": {"type": "number"}}, ("pluginRef",)
                        ),
                    },
                },
                ("name",),
            ),
        },
        "dataLayer": _closed(
            {
                "injectDefaults": _BOOL,
                "sources": {
                    "type": "array",
                    "items": _closed(
                        {"pluginRef": _STR, "extractors": {"type": "array", "items": _PLUGIN_REF}},
                        ("pluginRef", "extractors"),
                    ),
                },
                "discovery": _OBJ,
            }
        ),
        "flowControl": _OBJ,
        "requestHandler": _OBJ,
        "saturationDetector": _OBJ,
        "parser": _OBJ,
    },
    ("apiVersion", "kind", "plugins"),
)

CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("networking.istio.io/v1", "DestinationRule"): DESTINATION_RULE,
    ("networking.istio.io/v1", "VirtualService"): VIRTUAL_SERVICE,
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): SERVING_RUNTIME,
    ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): LEADER_WORKER_SET,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
}


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def embedded_core_objects(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Core Kubernetes objects wrapped around the core-typed parts of a custom resource."""
    kind, name, spec = doc["kind"], doc["metadata"]["name"], doc["spec"]
    if kind == "LeaderWorkerSet":
        templates = spec["leaderWorkerTemplate"]
        return [
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{name}-{role}"},
                "template": templates[role],
            }
            for role in ("leaderTemplate", "workerTemplate")
            if role in templates
        ]
    if kind == "ServingRuntime":
        return [_pod(name, {k: spec[k] for k in SERVING_RUNTIME_POD_FIELDS if k in spec})]
    if kind == "InferenceService":
        predictor = copy.deepcopy(spec["predictor"])
        model = predictor.pop("model")
        container = {k: v for k, v in model.items() if k not in ISVC_MODEL_FIELDS}
        pod_spec = {k: v for k, v in predictor.items() if k not in ISVC_EXTENSION_FIELDS}
        return [_pod(name, {**pod_spec, "containers": [{"name": "kserve-container", **container}]})]
    if kind == "ScaledObject":
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is None:
            return []
        return [
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": name},
                # Only `behavior` is under test; the target is a stand-in the HPA schema requires.
                "spec": {
                    "scaleTargetRef": {"kind": "Deployment", "name": name},
                    "maxReplicas": 1,
                    "behavior": behavior,
                },
            }
        ]
    return []
