"""The unsplit tiny Llama's answers to the mixed workload, shared by the tensor-parallel tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve import LLM
from tests.backend.engine.reference import ReferenceOutput
from tests.backend.runner.tp_harness import (
    TP_ENGINE,
    generate_with_gaps,
    mixed_params,
    mixed_prompts,
)


@pytest.fixture(scope="session")
def llama_tp1_reference(tiny_llama_dir: Path) -> list[ReferenceOutput]:
    """TP=1 greedy tokens and top-two gaps for ``mixed_prompts()`` / ``mixed_params()``."""
    with LLM(str(tiny_llama_dir), **TP_ENGINE) as single:
        return generate_with_gaps(single, mixed_prompts(), mixed_params())
