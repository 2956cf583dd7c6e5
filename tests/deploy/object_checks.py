"""Schema checks of one rendered object: core kinds strictly by kubernetes-validate, custom
resources against crd_schemas (our structural schemas) plus strict checks of their core parts.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate

from tests.deploy.crd_schemas import CRD_SCHEMAS, embedded_core_objects

# The oldest Kubernetes the manifests support (grpc probes GA in 1.27, PDB
# unhealthyPodEvictionPolicy GA in 1.31) and the newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")

Doc = dict[str, Any]


def _core_validate(doc: Doc) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def check(doc: Doc) -> None:
    """Raise if `doc` is invalid, or if nothing here knows how to check its kind."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft202012Validator(CRD_SCHEMAS[key]).validate(doc)
        for core in embedded_core_objects(doc):
            _core_validate(core)
    else:
        _core_validate(doc)
