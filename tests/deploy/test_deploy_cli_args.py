"""The arguments the manifests pass are accepted by the real `pagedserve` command line."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from pagedserve.backend.cli import build_parser
from tests.deploy.workloads import GRPC_PORT, Doc, by_kind, flag_value, is_server, pod_templates

# What kubelet ($(VAR)) and KServe ({{.Name}}) substitute before the process sees the arguments.
SUBSTITUTIONS = {r"\$\(LWS_GROUP_SIZE\)": "2", r"\{\{\.Name\}\}": "model"}

Rendered = dict[str, list[Doc]]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _substituted(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        for pattern, value in SUBSTITUTIONS.items():
            arg = re.sub(pattern, value, arg)
        out.append(arg)
    return out


def _parse(parser: argparse.ArgumentParser, where: str, args: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `{parser.prog}` rejects {args}")


def _container_args(rendered: Rendered, server: bool) -> Iterator[tuple[str, list[str]]]:
    for target, docs in rendered.items():
        for pod in pod_templates(docs):
            for container in pod.spec["containers"]:
                if is_server(container) == server:
                    yield f"{target}:{pod.owner}", container.get("args", [])
        if server:
            for runtime in by_kind(docs, "ServingRuntime"):
                for container in runtime["spec"]["containers"]:
                    yield f"{target}:ServingRuntime", container["args"]


def test_server_arguments_parse(rendered: Rendered) -> None:
    serve = _subcommands()["serve"]
    checked = 0
    for where, args in _container_args(rendered, server=True):
        parsed = _parse(serve, where, _substituted(args))
        assert parsed.port == GRPC_PORT, where
        assert parsed.drain_timeout_s == float(flag_value(args, "--drain-timeout") or "nan"), where
        checked += 1
    assert checked == len(rendered)  # one server per target


def test_worker_arguments_parse(rendered: Rendered) -> None:
    workers = list(_container_args(rendered, server=False))
    assert [where for where, _ in workers] == ["lws:LeaderWorkerSet/pagedserve-tp:workerTemplate"]
    worker = _subcommands()["worker"]
    for where, args in workers:
        _parse(worker, where, _substituted(args))
