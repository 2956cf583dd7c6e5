"""What the schemas cannot see: the rendered objects agree with each other and with the server.

Probes speak grpc.health.v1 on the serving port, the grace period covers the drain, Services
and budgets select the pods, autoscalers target what exists and read the queue gauge, the
mesh routes to the Service, LWS ranks find their leader, KServe speaks gRPC v2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import pytest
import yaml

from tests.deploy.kustomize_render import DEPLOY, NAMESPACE
from tests.deploy.workloads import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    QUEUE_METRIC,
    Doc,
    PodTemplate,
    by_kind,
    env_value,
    flag_value,
    is_server,
    one,
    pod_templates,
    prestop_sleep_seconds,
    selects,
)

Rendered = dict[str, list[Doc]]
GPU_TARGETS = ("gpu", "gpu-istio", "lws", "kserve")
CPU_TARGETS = ("base", "cpu", "cpu-hpa")
# SIGKILL must not land in the last instant of the drain.
GRACE_MARGIN_S = 5
# Liveness must not restart a pod that is only slow to answer under load.
LIVENESS_WINDOW_S = 30
CACHE_ENV = "PAGEDSERVE_CACHE_DIR"
LWS_LABEL = "leaderworkerset.sigs.k8s.io/"


def _servers(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(where, server container, its pod's grace period) for every server."""
    for target, docs in rendered.items():
        for pod in pod_templates(docs):
            for container in pod.spec["containers"]:
                if is_server(container):
                    grace = pod.spec["terminationGracePeriodSeconds"]
                    yield f"{target}:{pod.owner}", container, grace
        for runtime in by_kind(docs, "ServingRuntime"):
            predictor = one(docs, "InferenceService")["spec"]["predictor"]
            for container in runtime["spec"]["containers"]:
                grace = predictor["terminationGracePeriodSeconds"]
                yield f"{target}:ServingRuntime/{runtime['metadata']['name']}", container, grace


def _all_containers(rendered: Rendered) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod-level fields) for every container, servers and workers alike."""
    for target, docs in rendered.items():
        for pod in pod_templates(docs):
            for container in pod.spec["containers"]:
                yield f"{target}:{pod.owner}:{container['name']}", container, pod.spec
        for runtime in by_kind(docs, "ServingRuntime"):
            for container in runtime["spec"]["containers"]:
                yield f"{target}:ServingRuntime:{container['name']}", container, {}


def test_there_are_servers_in_every_target(rendered: Rendered) -> None:
    targets = {where.split(":")[0] for where, *_ in _servers(rendered)}
    assert targets == set(rendered)


def test_probes_are_grpc_health_on_the_serving_port(rendered: Rendered) -> None:
    for where, container, _ in _servers(rendered):
        assert GRPC_PORT in [p["containerPort"] for p in container["ports"]], where
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[probe_name]
            handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(probe)
            assert handlers == {"grpc"}, f"{where}: {probe_name} is {handlers}"
            # Service "" asks for the whole server's status.
            assert probe["grpc"] == {"port": GRPC_PORT}, f"{where}: {probe_name}"
        liveness = container["livenessProbe"]
        window = liveness["failureThreshold"] * liveness["periodSeconds"]
        assert window >= LIVENESS_WINDOW_S, where


def test_grace_period_covers_prestop_and_drain(rendered: Rendered) -> None:
    for where, container, grace in _servers(rendered):
        drain = flag_value(container["args"], "--drain-timeout")
        assert drain is not None, f"{where}: no --drain-timeout"
        needed = prestop_sleep_seconds(container) + int(drain) + GRACE_MARGIN_S
        assert grace >= needed, f"{where}: grace {grace}s < preStop + drain + margin {needed}s"


def test_server_flags_match_declared_ports(rendered: Rendered) -> None:
    for where, container, _ in _servers(rendered):
        assert flag_value(container["args"], "--port") == str(GRPC_PORT), where
        assert flag_value(container["args"], "--metrics-port") == str(METRICS_PORT), where
        http = flag_value(container["args"], "--http-port")
        assert http in (None, "0", str(HTTP_PORT)), where
    for target, docs in rendered.items():
        for pod in pod_templates(docs):
            servers = [c for c in pod.spec["containers"] if is_server(c)]
            if not servers:
                continue
            ports = {p["name"]: p["containerPort"] for p in servers[0]["ports"]}
            assert ports["metrics"] == METRICS_PORT, f"{target}:{pod.owner}"
            if flag_value(servers[0]["args"], "--http-port") == str(HTTP_PORT):
                assert ports["http"] == HTTP_PORT, f"{target}:{pod.owner}"
        for runtime in by_kind(docs, "ServingRuntime"):
            assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == str(
                METRICS_PORT
            )


def test_prometheus_scrapes_the_metrics_port(rendered: Rendered) -> None:
    for target, docs in rendered.items():
        for doc in docs:
            if doc["kind"] == "Deployment":
                annotations = doc["spec"]["template"]["metadata"]["annotations"]
            elif doc["kind"] == "LeaderWorkerSet":
                annotations = doc["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"][
                    "annotations"
                ]
            else:
                continue
            assert annotations["prometheus.io/scrape"] == "true", target
            assert annotations["prometheus.io/port"] == str(METRICS_PORT), target


def test_cache_dir_is_a_mounted_volume(rendered: Rendered) -> None:
    for where, container, _ in _all_containers(rendered):
        cache = env_value(container, CACHE_ENV)
        assert cache, f"{where}: {CACHE_ENV} unset"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert cache in mounts and not mounts[cache].get("readOnly"), where
        # The root filesystem is read-only: every cache and scratch path must be on a volume.
        assert "/tmp" in mounts, where
        for name in ("HF_HOME", "TRITON_CACHE_DIR"):
            assert (env_value(container, name) or "").startswith(cache + "/"), f"{where}: {name}"


def test_containers_run_unprivileged(rendered: Rendered) -> None:
    for where, container, pod_spec in _all_containers(rendered):
        pod_ctx = pod_spec.get("securityContext", {})
        ctx = container["securityContext"]
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 0)) != 0, where
        assert ctx["allowPrivilegeEscalation"] is False, where
        assert ctx["readOnlyRootFilesystem"] is True, where
        assert ctx["capabilities"]["drop"] == ["ALL"], where
        if pod_spec:
            assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault", where
            assert pod_spec["automountServiceAccountToken"] is False, where
            # Service links would inject PAGEDSERVE_* variables into the server's environment.
            assert pod_spec["enableServiceLinks"] is False, where


_QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {None: 1.0, "m": 1e-3, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}


def _quantity(value: str | int) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"unparsed quantity {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def _resources(where: str, container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    resources = container["resources"]
    for resource in ("cpu", "memory"):
        request, limit = resources["requests"][resource], resources["limits"][resource]
        assert _quantity(request) <= _quantity(limit), f"{where}: {resource} request > limit"
    return resources


def test_resources_and_gpus(rendered: Rendered) -> None:
    for where, container, _ in _all_containers(rendered):
        target = where.split(":")[0]
        if target == "kserve":
            continue  # the runtime leaves sizing to each InferenceService, checked below
        resources = _resources(where, container)
        gpus = (
            resources["requests"].get("nvidia.com/gpu"),
            resources["limits"].get("nvidia.com/gpu"),
        )
        if target in GPU_TARGETS:
            assert gpus[0] == gpus[1] and int(gpus[1]) >= 1, f"{where}: gpus {gpus}"
        else:
            assert target in CPU_TARGETS and gpus == (None, None), f"{where}: gpus {gpus}"
    model = one(rendered["kserve"], "InferenceService")["spec"]["predictor"]["model"]
    resources = _resources("kserve:InferenceService", model)
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1


def test_gpu_pods_tolerate_gpu_taints(rendered: Rendered) -> None:
    for target in GPU_TARGETS:
        docs = rendered[target]
        specs = [p.spec for p in pod_templates(docs)] + [
            d["spec"]["predictor"] for d in by_kind(docs, "InferenceService")
        ]
        assert specs, target
        for spec in specs:
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
                "tolerations"
            ], target


@pytest.mark.parametrize(
    ("target", "image"),
    [
        ("cpu", "pagedserve-cpu"),
        ("cpu-hpa", "pagedserve-cpu"),
        ("gpu", "pagedserve-cuda"),
        ("gpu-istio", "pagedserve-cuda"),
        ("lws", "pagedserve-cuda"),
        ("kserve", "pagedserve-cuda"),
    ],
)
def test_overlays_pick_the_image_of_this_version(
    rendered: Rendered, target: str, image: str
) -> None:
    images = {c["image"] for _, c, _ in _all_containers({target: rendered[target]})}
    assert images == {f"{image}:{version('pagedserve')}"}


def _deployments(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}


def test_services_select_server_pods_and_ports(rendered: Rendered) -> None:
    for target, docs in rendered.items():
        pods = pod_templates(docs)
        for service in by_kind(docs, "Service"):
            where = f"{target}:Service/{service['metadata']['name']}"
            # LWS labels are put on the pods by its controller, not in the templates.
            selector = {
                k: v for k, v in service["spec"]["selector"].items() if not k.startswith(LWS_LABEL)
            }
            chosen = [p for p in pods if selects(selector, p.labels)]
            servers = [c for p in chosen for c in p.spec["containers"] if is_server(c)]
            assert servers, f"{where} selects no server pod"
            for port in service["spec"]["ports"]:
                for container in servers:
                    names = {p["name"] for p in container["ports"]}
                    assert port["targetPort"] in names, f"{where}: {port['targetPort']}"
                if port["port"] == GRPC_PORT:
                    # A mesh balances per RPC only when it knows the port speaks gRPC.
                    assert port["appProtocol"] == "grpc", where


def test_selectors_and_budgets_match_pods(rendered: Rendered) -> None:
    for target, docs in rendered.items():
        deployments = _deployments(docs)
        for deployment in deployments.values():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert selects(deployment["spec"]["selector"]["matchLabels"], labels), target
        for pdb in by_kind(docs, "PodDisruptionBudget"):
            selector = pdb["spec"]["selector"]["matchLabels"]
            matched = [
                d
                for d in deployments.values()
                if selects(selector, d["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(matched) == 1, target
            # minAvailable on a single replica would block every node drain.
            assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"], target


def _autoscaled_names(docs: list[Doc]) -> list[str]:
    return [
        d["spec"]["scaleTargetRef"]["name"]
        for d in docs
        if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
    ]


def test_autoscalers_target_existing_deployments(rendered: Rendered) -> None:
    for target, docs in rendered.items():
        names = _autoscaled_names(docs)
        assert len(names) == len(set(names)), f"{target}: two autoscalers on one target"
        deployments = _deployments(docs)
        isvc_deployments = {
            f"{d['metadata']['name']}-predictor" for d in by_kind(docs, "InferenceService")
        }
        for name in names:
            assert name in deployments or name in isvc_deployments, f"{target}: {name}"
            if name in deployments:
                # A fixed replica count would be reset by every `kubectl apply`.
                assert "replicas" not in deployments[name]["spec"], f"{target}: {name}"
        for doc in by_kind(docs, "ScaledObject") + by_kind(docs, "HorizontalPodAutoscaler"):
            ref = doc["spec"]["scaleTargetRef"]
            assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment"), target
    assert _autoscaled_names(rendered["gpu"]) == ["pagedserve"]
    assert _autoscaled_names(rendered["cpu-hpa"]) == ["pagedserve"]
    assert _autoscaled_names(rendered["cpu"]) == []


def test_autoscalers_read_the_queue_gauge(rendered: Rendered) -> None:
    scaled = [(t, d) for t, docs in rendered.items() for d in by_kind(docs, "ScaledObject")]
    assert {t for t, _ in scaled} == {"gpu", "gpu-istio", "kserve"}
    for target, doc in scaled:
        spec = doc["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], target
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        assert re.search(rf"\b{QUEUE_METRIC}\{{", query), query
        # The query filters on the namespace the objects are rendered into.
        assert f'namespace="{doc["metadata"]["namespace"]}"' in query, target
    hpa = one(rendered["cpu-hpa"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_METRIC


def test_prometheus_adapter_rule_serves_the_hpa_metric() -> None:
    values = yaml.safe_load(
        (DEPLOY / "k8s/components/hpa/prometheus-adapter-values.yaml").read_text()
    )
    (rule,) = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{")
    assert rule["name"]["as"] == QUEUE_METRIC
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_everything_lands_in_one_namespace(rendered: Rendered) -> None:
    for target, docs in rendered.items():
        expected = None if target == "base" else NAMESPACE
        for doc in docs:
            assert doc["metadata"].get("namespace") == expected, f"{target}: {doc['kind']}"


def test_istio_policy_applies_to_the_grpc_service(rendered: Rendered) -> None:
    docs = rendered["gpu-istio"]
    service = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["appProtocol"] == "grpc")
    rule, virtual = one(docs, "DestinationRule"), one(docs, "VirtualService")
    assert rule["spec"]["host"] == service["metadata"]["name"]
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["simple"] == "LEAST_REQUEST"
    assert rule["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] >= 1
    assert virtual["spec"]["hosts"] == [service["metadata"]["name"]]
    (route,) = virtual["spec"]["http"]
    (destination,) = route["route"]
    assert destination["destination"] == {
        "host": service["metadata"]["name"],
        "port": {"number": grpc_port},
    }
    retry_on = route["retries"]["retryOn"].split(",")
    assert "unavailable" in retry_on and "reset" not in retry_on
    # A timeout would cut long generation streams.
    assert "timeout" not in route and "perTryTimeout" not in route["retries"]
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    proxy = yaml.safe_load(annotations["proxy.istio.io/config"])
    assert proxy["proxyMetadata"]["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"] == "true"


def test_lws_ranks_find_their_leader(rendered: Rendered) -> None:
    docs = rendered["lws"]
    lws = one(docs, "LeaderWorkerSet")
    spec = lws["spec"]
    # LeaderReady would deadlock: rank 0 is ready only once every rank has joined.
    assert spec["startupPolicy"] == "LeaderCreated"
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert spec["leaderWorkerTemplate"]["size"] >= 2
    pods: dict[str, PodTemplate] = {p.owner.split(":")[1]: p for p in pod_templates(docs)}
    (leader,) = pods["leaderTemplate"].spec["containers"]
    (worker,) = pods["workerTemplate"].spec["containers"]
    assert is_server(leader) and worker["command"] == ["pagedserve", "worker"]
    for container in (leader, worker):
        assert env_value(container, "MASTER_ADDR") == "$(LWS_LEADER_ADDRESS)"
        assert env_value(container, "WORLD_SIZE") == "$(LWS_GROUP_SIZE)"
        assert env_value(container, "RANK") == "$(LWS_WORKER_INDEX)"
        assert flag_value(container["args"], "--tensor-parallel-size") == "$(LWS_GROUP_SIZE)"
    assert env_value(leader, "MASTER_PORT") == env_value(worker, "MASTER_PORT")
    dist = {p["containerPort"] for p in leader["ports"] if p["name"] == "dist"}
    assert dist == {int(env_value(leader, "MASTER_PORT") or 0)}
    model = flag_value(leader["args"], "--model")
    assert model is not None and flag_value(worker["args"], "--model") == model
    # Workers stay in the collective for as long as rank 0 may drain.
    assert (
        pods["workerTemplate"].spec["terminationGracePeriodSeconds"]
        >= pods["leaderTemplate"].spec["terminationGracePeriodSeconds"]
    )
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"] == {
        f"{LWS_LABEL}name": lws["metadata"]["name"],
        f"{LWS_LABEL}worker-index": "0",
    }
    # LWS owns a headless Service named after the set; ours must not collide with it.
    assert service["metadata"]["name"] != lws["metadata"]["name"]


def test_kserve_runtime_speaks_grpc_v2(rendered: Rendered) -> None:
    docs = rendered["kserve"]
    runtime, isvc = one(docs, "ServingRuntime"), one(docs, "InferenceService")
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["ports"] == [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    assert flag_value(container["args"], "--model") == "/mnt/models"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {
        f["name"] for f in runtime["spec"]["supportedModelFormats"]
    }
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    # KServe must not also create its CPU-based HPA next to the ScaledObject.
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    assert _autoscaled_names(docs) == [f"{isvc['metadata']['name']}-predictor"]
    pvc = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"].startswith(f"pvc://{pvc}/")
