"""yamllint (strict: warnings fail) over every YAML file under deploy/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.deploy.kustomize_render import DEPLOY

CONFIG = DEPLOY / ".yamllint.yaml"


def _yamllint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", str(CONFIG), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deploy_yaml_is_lint_clean() -> None:
    result = _yamllint(str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_covers_every_yaml_file() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "yamllint", "--list-files", "-c", str(CONFIG), str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    on_disk = {p for pattern in ("*.yaml", "*.yml") for p in DEPLOY.rglob(pattern)}
    assert on_disk and {Path(line) for line in listed.stdout.split()} == on_disk


def test_lint_rejects_bad_yaml(tmp_path: Path) -> None:
    """The configuration really fails files: a duplicate key and a `yes` boolean."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nenabled: yes\n")
    result = _yamllint(str(bad))
    assert result.returncode != 0
    assert "key-duplicates" in result.stdout and "truthy" in result.stdout
