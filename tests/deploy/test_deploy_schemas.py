"""Every rendered object is schema-checked: core kinds strictly by kubernetes-validate, custom
resources against crd_schemas (our structural schemas) plus strict checks of their core parts.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.crd_schemas import CRD_SCHEMAS
from tests.deploy.kustomize_render import DEPLOY, GATEWAY, TARGETS
from tests.deploy.object_checks import check

# Every kustomization under deploy/ must be rendered by some target, directly or through one.
KUSTOMIZATION_DIRS = {
    "k8s/base",
    "k8s/models",
    "k8s/components/keda",
    "k8s/components/hpa",
    "k8s/overlays/cpu",
    "k8s/overlays/gpu",
    "k8s/overlays/gpu-istio",
    "k8s/lws",
    "k8s/inference-gateway",
    "istio",
    "kserve",
}

Doc = dict[str, Any]


def _all_docs(rendered: dict[str, list[Doc]]) -> list[tuple[str, Doc]]:
    return [(name, doc) for name, docs in rendered.items() for doc in docs]


def test_every_kustomization_is_rendered() -> None:
    found = {p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("kustomization.yaml")}
    assert found == KUSTOMIZATION_DIRS
    # The inference gateway is rendered and checked on its own (test_deploy_inference_gateway).
    targets = (*TARGETS, GATEWAY)
    reached = {t.directory.relative_to(DEPLOY).as_posix() for t in targets} | {
        c.relative_to(DEPLOY).as_posix() for t in targets for c in t.components
    }
    # The rest are pulled in by the targets' own resources/components lists.
    assert reached == KUSTOMIZATION_DIRS - {"k8s/models", "k8s/components/keda", "istio"}


def test_targets_render_objects(rendered: dict[str, list[Doc]]) -> None:
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in rendered.items()}
    assert kinds["base"] == [
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceAccount",
    ]
    assert kinds["cpu"] == kinds["base"]
    assert kinds["gpu"] == sorted([*kinds["base"], "PersistentVolumeClaim", "ScaledObject"])
    assert kinds["gpu-istio"] == sorted([*kinds["gpu"], "DestinationRule", "VirtualService"])
    assert kinds["cpu-hpa"] == sorted([*kinds["cpu"], "HorizontalPodAutoscaler"])
    assert kinds["lws"] == ["LeaderWorkerSet", "PersistentVolumeClaim", "Service"]
    assert kinds["kserve"] == [
        "InferenceService",
        "PersistentVolumeClaim",
        "ScaledObject",
        "ServingRuntime",
    ]


def test_all_rendered_objects_are_valid(rendered: dict[str, list[Doc]]) -> None:
    failures = []
    for target, doc in _all_docs(rendered):
        try:
            check(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            failures.append(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_core_objects_are_checked_by_kubernetes_validate(rendered: dict[str, list[Doc]]) -> None:
    """The core kinds we ship really have schemas there (none falls through unchecked)."""
    core = {
        (d["apiVersion"], d["kind"])
        for _, d in _all_docs(rendered)
        if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS
    }
    assert core == {
        ("v1", "ServiceAccount"),
        ("v1", "Service"),
        ("v1", "PersistentVolumeClaim"),
        ("apps/v1", "Deployment"),
        ("policy/v1", "PodDisruptionBudget"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
    }


def test_unknown_kind_is_rejected() -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        check(doc)


def _mutated(rendered: dict[str, list[Doc]], target: str, kind: str) -> Doc:
    return copy.deepcopy(next(d for d in rendered[target] if d["kind"] == kind))


@pytest.mark.parametrize(
    ("target", "kind", "mutate"),
    [
        # Core kinds, strict: an unknown field and a wrong type.
        ("cpu", "Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGrace=60)),
        ("cpu", "Service", lambda d: d["spec"]["ports"][0].update(port="8001")),
        # Custom resources, our schema.
        ("gpu", "ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].pop("query")),
        ("gpu", "ScaledObject", lambda d: d["spec"].update(maxReplicas=3)),
        (
            "gpu-istio",
            "DestinationRule",
            lambda d: d["spec"]["trafficPolicy"]["loadBalancer"].update(simple="LEAST_REQUESTS"),
        ),
        (
            "gpu-istio",
            "VirtualService",
            lambda d: d["spec"]["http"][0]["retries"].update(retryOn="unavailble"),
        ),
        ("kserve", "ServingRuntime", lambda d: d["spec"].update(protocolVersions=["grpc-v3"])),
        (
            "kserve",
            "InferenceService",
            lambda d: d["spec"]["predictor"]["model"].pop("modelFormat"),
        ),
        ("lws", "LeaderWorkerSet", lambda d: d["spec"]["leaderWorkerTemplate"].update(size=0)),
        # Core parts embedded in custom resources, strict.
        (
            "lws",
            "LeaderWorkerSet",
            lambda d: d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][
                0
            ].update(imagePolicy="Always"),
        ),
        (
            "kserve",
            "ServingRuntime",
            lambda d: d["spec"]["containers"][0]["ports"][0].pop("containerPort"),
        ),
        (
            "kserve",
            "InferenceService",
            lambda d: d["spec"]["predictor"]["model"].update(resource={}),
        ),
        (
            "gpu",
            "ScaledObject",
            lambda d: d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
                "scaleDown"
            ].update(window=300),
        ),
    ],
)
def test_checks_catch_mistakes(
    rendered: dict[str, list[Doc]], target: str, kind: str, mutate: Any
) -> None:
    """Each kind of check rejects a realistic typo, so passing means something."""
    doc = _mutated(rendered, target, kind)
    check(doc)
    mutate(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        check(doc)
