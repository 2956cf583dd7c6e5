"""Views over rendered objects: the pod templates and server containers the checks look at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]

SERVER_CONTAINER_NAMES = ("pagedserve", "kserve-container")
GRPC_PORT = 8001
METRICS_PORT = 8002
# The OpenAI-compatible HTTP API.
HTTP_PORT = 8000
# The server's gauge of requests waiting for admission: the autoscaling signal.
QUEUE_METRIC = "pagedserve_num_requests_waiting"


@dataclass(frozen=True)
class PodTemplate:
    """A pod template and where it came from (Deployment, LWS leader/worker)."""

    owner: str
    labels: dict[str, str]
    spec: dict[str, Any]


def pod_templates(docs: list[Doc]) -> list[PodTemplate]:
    out = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "Deployment":
            template = doc["spec"]["template"]
            out.append(PodTemplate(name, template["metadata"]["labels"], template["spec"]))
        elif doc["kind"] == "LeaderWorkerSet":
            for role in ("leaderTemplate", "workerTemplate"):
                template = doc["spec"]["leaderWorkerTemplate"][role]
                out.append(
                    PodTemplate(f"{name}:{role}", template["metadata"]["labels"], template["spec"])
                )
    return out


def is_server(container: dict[str, Any]) -> bool:
    """Runs the image entrypoint (`pagedserve serve`) rather than another command."""
    return container["name"] in SERVER_CONTAINER_NAMES and "command" not in container


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` in an argument list (the only form the manifests use)."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    assert len(values) <= 1, f"{flag} given {len(values)} times"
    return values[0] if values else None


def prestop_sleep_seconds(container: dict[str, Any]) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    return int(command[1])


def env_value(container: dict[str, Any], name: str) -> str | None:
    values = [e.get("value") for e in container.get("env", []) if e["name"] == name]
    assert len(values) <= 1, f"{name} set {len(values)} times"
    return values[0] if values else None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Doc], kind: str) -> Doc:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
