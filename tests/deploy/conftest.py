"""Fixtures shared by the deployment tests: each kustomization rendered once per session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.kustomize_render import TARGETS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Target name -> its rendered objects."""
    return {target.name: render(target) for target in TARGETS}
