"""deploy/k8s/inference-gateway: the InferencePool, its endpoint picker (EPP) and the route,
rendered with kustomize, schema-checked, and checked against each other, against the server
pods they front and against the metric names the server exports (imported from its code).
"""

from __future__ import annotations

import copy
from pathlib import PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pagedserve.backend.telemetry.metrics import (
    BLOCK_SIZE_LABEL,
    CACHE_CONFIG_INFO,
    KV_CACHE_USAGE_GAUGE,
    NUM_BLOCKS_LABEL,
    RUNNING_GAUGE,
    WAITING_GAUGE,
)
from tests.deploy.crd_schemas import CRD_SCHEMAS, ENDPOINT_PICKER_CONFIG
from tests.deploy.kustomize_render import GATEWAY, NAMESPACE, TARGETS, render
from tests.deploy.object_checks import check
from tests.deploy.workloads import (
    HTTP_PORT,
    METRICS_PORT,
    Doc,
    by_kind,
    flag_value,
    is_server,
    one,
    pod_templates,
    selects,
)

POOL_GROUP = "inference.networking.k8s.io"
EPP_CONTAINER = "epp"
# The ext_proc service the picker's health server answers for.
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
METRICS_SOURCE = "metrics-data-source"
METRICS_EXTRACTOR = "core-metrics-extractor"
CONFIG_FILE = "epp-config.yaml"

Docs = list[Doc]


@pytest.fixture(scope="module")
def docs() -> Docs:
    return render(GATEWAY)


def _named(docs: Docs, kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pods(docs: Docs, selector: dict[str, str]) -> list[Any]:
    return [p for p in pod_templates(docs) if selects(selector, p.labels)]


def _epp(docs: Docs) -> tuple[Doc, dict[str, Any]]:
    """The picker's Deployment and its container."""
    (deployment,) = [
        d
        for d in by_kind(docs, "Deployment")
        if any(c["name"] == EPP_CONTAINER for c in d["spec"]["template"]["spec"]["containers"])
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def _server_container(docs: Docs) -> dict[str, Any]:
    pool = one(docs, "InferencePool")
    (pod,) = _pods(docs, pool["spec"]["selector"]["matchLabels"])
    (server,) = [c for c in pod.spec["containers"] if is_server(c)]
    return server


def _epp_config(docs: Docs) -> Doc:
    """The configuration file the picker reads, from the ConfigMap its --config-file is in."""
    deployment, container = _epp(docs)
    path = PurePosixPath(flag_value(container["args"], "--config-file") or "")
    (mount,) = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    config_map = _named(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    config: Doc = yaml.safe_load(config_map["data"][path.name])
    return config


def _plugin_parameters(config: Doc, plugin_type: str) -> dict[str, Any]:
    (plugin,) = [p for p in config["plugins"] if p["type"] == plugin_type]
    parameters: dict[str, Any] = plugin.get("parameters", {})
    return parameters


def test_renders_the_cpu_overlay_plus_the_gateway_objects(docs: Docs) -> None:
    """The server side is the CPU overlay unchanged, so every check of that target holds here."""
    cpu = render(next(t for t in TARGETS if t.name == "cpu"))
    ours = [d for d in docs if d not in cpu]
    assert [d for d in docs if d in cpu] == cpu
    assert sorted(d["kind"] for d in ours) == [
        "ConfigMap",
        "Deployment",
        "HTTPRoute",
        "InferencePool",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


def test_every_object_is_valid(docs: Docs) -> None:
    for doc in docs:
        check(doc)
    jsonschema.Draft202012Validator(ENDPOINT_PICKER_CONFIG).validate(_epp_config(docs))
    checked_by_schema = {d["kind"] for d in docs if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS}
    assert checked_by_schema == {"InferencePool", "HTTPRoute"}


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("InferencePool", lambda d: d["spec"].update(targetPort=[{"number": 8000}])),
        ("InferencePool", lambda d: d["spec"]["targetPorts"].append({"number": 8000})),
        ("InferencePool", lambda d: d["spec"]["endpointPickerRef"].pop("port")),
        ("InferencePool", lambda d: d["spec"]["endpointPickerRef"].update(failureMode="Open")),
        ("InferencePool", lambda d: d["spec"]["selector"].update(matchExpressions=[])),
        ("HTTPRoute", lambda d: d["spec"]["rules"][0]["matches"][0]["path"].update(value="v1")),
        ("HTTPRoute", lambda d: d["spec"]["rules"][0]["timeouts"].update(request="1.5s")),
        ("HTTPRoute", lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(group=None)),
        ("Role", lambda d: d["rules"][0].update(verb=["get"])),
        ("RoleBinding", lambda d: d["roleRef"].pop("kind")),
    ],
)
def test_schema_checks_catch_mistakes(docs: Docs, kind: str, mutate: Any) -> None:
    doc = copy.deepcopy(one(docs, kind))
    check(doc)
    mutate(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        check(doc)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["plugins"][3]["parameters"].update(port=8002),
        lambda c: c["plugins"][4]["parameters"]["engineConfigs"][0].update(kvUsage="x"),
        lambda c: c["plugins"][4]["parameters"]["engineConfigs"][0].update(kvUsageSpec="a b"),
        lambda c: c["dataLayer"]["sources"][0].update(extractor=[]),
        lambda c: c.update(apiVersion="inference.networking.x-k8s.io/v1alpha1"),
    ],
)
def test_picker_config_schema_catches_mistakes(docs: Docs, mutate: Any) -> None:
    """v0.9.0's picker refuses unknown fields; so does the schema (its port parameter is newer)."""
    config = _epp_config(docs)
    assert [p["type"] for p in config["plugins"]][3:5] == [METRICS_SOURCE, METRICS_EXTRACTOR]
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(ENDPOINT_PICKER_CONFIG).validate(config)


def test_pool_selects_the_server_pods_on_their_http_port(docs: Docs) -> None:
    pool = one(docs, "InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    pods = _pods(docs, selector)
    assert [p.owner for p in pods] == ["Deployment/pagedserve"]
    server = _server_container(docs)
    assert pool["spec"]["targetPorts"] == [{"number": HTTP_PORT}]
    assert flag_value(server["args"], "--http-port") == str(HTTP_PORT)
    assert {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"} in server["ports"]
    assert pool["spec"]["appProtocol"] == "http"


def test_pool_points_at_the_picker(docs: Docs) -> None:
    ref = one(docs, "InferencePool")["spec"]["endpointPickerRef"]
    assert ref["kind"] == "Service" and ref.get("group", "") == ""
    service = _named(docs, "Service", ref["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    deployment, container = _epp(docs)
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == int(flag_value(container["args"], "--grpc-port") or 0)
    # ext_proc is gRPC: the gateway must speak HTTP/2 to it.
    assert port["appProtocol"] == "http2"


def test_route_sends_to_the_pool(docs: Docs) -> None:
    pool = one(docs, "InferencePool")
    (rule,) = one(docs, "HTTPRoute")["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        POOL_GROUP,
        "InferencePool",
        pool["metadata"]["name"],
    )
    assert "namespace" not in backend
    assert backend.get("port", HTTP_PORT) == HTTP_PORT
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    # "0s" disables the request timeout: generation streams can outlast any fixed one.
    assert rule["timeouts"] == {"request": "0s"}


def test_picker_reads_the_metric_names_the_server_exports(docs: Docs) -> None:
    extractor = _plugin_parameters(_epp_config(docs), METRICS_EXTRACTOR)
    engines = {e["name"]: e for e in extractor["engineConfigs"]}
    engine = engines[extractor["defaultEngine"]]
    assert engine == {
        "name": extractor["defaultEngine"],
        "queuedRequestsSpec": WAITING_GAUGE,
        "runningRequestsSpec": RUNNING_GAUGE,
        "kvUsageSpec": KV_CACHE_USAGE_GAUGE,
        "loraSpec": "",
        "cacheInfoSpec": CACHE_CONFIG_INFO,
        "cacheBlockSizeLabelName": BLOCK_SIZE_LABEL,
        "cacheNumBlocksLabelName": NUM_BLOCKS_LABEL,
    }


def test_picker_scrapes_the_servers_metrics_port(docs: Docs) -> None:
    config = _epp_config(docs)
    source = _plugin_parameters(config, METRICS_SOURCE)
    assert (source["scheme"], source["path"]) == ("http", "/metrics")
    assert config["dataLayer"]["sources"] == [
        {"pluginRef": METRICS_SOURCE, "extractors": [{"pluginRef": METRICS_EXTRACTOR}]}
    ]
    plugins = {p.get("name", p["type"]) for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} <= plugins
    _, container = _epp(docs)
    server = _server_container(docs)
    metrics_port = flag_value(container["args"], "--model-server-metrics-port")
    assert metrics_port == flag_value(server["args"], "--metrics-port") == str(METRICS_PORT)


def test_picker_watches_its_pool(docs: Docs) -> None:
    pool = one(docs, "InferencePool")
    deployment, container = _epp(docs)
    args = container["args"]
    assert flag_value(args, "--pool-name") == pool["metadata"]["name"]
    assert flag_value(args, "--pool-group") == POOL_GROUP
    # Its namespace comes from the pod (the flag would not follow kustomize's namespace).
    assert flag_value(args, "--pool-namespace") is None
    (env,) = [e for e in container["env"] if e["name"] == "NAMESPACE"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    health = int(flag_value(args, "--grpc-health-port") or 0)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": health, "service": EXT_PROC_SERVICE}, probe
    pod = deployment["spec"]["template"]["spec"]
    server_pod = _pods(docs, pool["spec"]["selector"]["matchLabels"])[0].spec
    assert pod["terminationGracePeriodSeconds"] >= server_pod["terminationGracePeriodSeconds"]


def test_picker_may_read_the_pool_and_its_pods(docs: Docs) -> None:
    deployment, _ = _epp(docs)
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert _named(docs, "ServiceAccount", account)
    binding = one(docs, "RoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    assert binding["roleRef"]["kind"] == "Role"
    rules = _named(docs, "Role", binding["roleRef"]["name"])["rules"]
    granted = {
        (group, resource)
        for rule in rules
        if {"get", "list", "watch"} <= set(rule["verbs"])
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {(POOL_GROUP, "inferencepools"), ("", "pods")} <= granted
    # Read-only: the picker changes nothing in the cluster.
    assert {v for rule in rules for v in rule["verbs"]} == {"get", "list", "watch"}


def test_picker_runs_unprivileged(docs: Docs) -> None:
    deployment, container = _epp(docs)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["enableServiceLinks"] is False
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
    # A pinned release, not a moving tag.
    assert container["image"].rsplit(":", 1)[1].startswith("v")
