"""Render the kustomizations under deploy/ with the real kustomize.

kustomize ships inside kubectl (`kubectl kustomize`, v5 since kubectl 1.27) and stand-alone;
either is used, so the rendered objects are exactly what `kubectl apply -k` would send.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NAMESPACE = "pagedserve"


@dataclass(frozen=True)
class Target:
    """A kustomization to render: a directory, or a directory plus extra components."""

    name: str
    directory: Path
    components: tuple[Path, ...] = field(default=())


# Every kustomization a user applies, plus the documented recipe of swapping KEDA for an HPA.
TARGETS: tuple[Target, ...] = (
    Target("base", DEPLOY / "k8s/base"),
    Target("cpu", DEPLOY / "k8s/overlays/cpu"),
    Target("gpu", DEPLOY / "k8s/overlays/gpu"),
    Target("gpu-istio", DEPLOY / "k8s/overlays/gpu-istio"),
    Target("cpu-hpa", DEPLOY / "k8s/overlays/cpu", (DEPLOY / "k8s/components/hpa",)),
    Target("lws", DEPLOY / "k8s/lws"),
    Target("kserve", DEPLOY / "kserve"),
)
# The CPU overlay behind an inference gateway. Its endpoint picker is not a pagedserve workload,
# so it is checked by its own tests rather than the ones every target above goes through.
GATEWAY = Target("inference-gateway", DEPLOY / "k8s/inference-gateway")


def kustomize_command() -> list[str]:
    """The argv prefix of a kustomize build; fails loudly rather than skipping the checks."""
    standalone = shutil.which("kustomize")
    if standalone:
        return [standalone, "build"]
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    raise RuntimeError("neither `kustomize` nor `kubectl` is on PATH: cannot render deploy/")


def _build(directory: Path) -> str:
    result = subprocess.run(
        [*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"kustomize build {directory} failed:\n{result.stderr}")
    return result.stdout


def render(target: Target) -> list[dict[str, Any]]:
    """The objects of one target, in kustomize's output order."""
    if not target.components:
        text = _build(target.directory)
    else:
        # kustomize accepts only relative paths, so the wrapper lives in a temp dir and points back.
        with tempfile.TemporaryDirectory() as tmp:
            wrapper = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": NAMESPACE,
                "resources": [os.path.relpath(target.directory, tmp)],
                "components": [os.path.relpath(c, tmp) for c in target.components],
            }
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(wrapper))
            text = _build(Path(tmp))
    return [doc for doc in yaml.safe_load_all(text) if doc]
