"""pagedserve: a gRPC inference backend for large language models.

The offline API lives at the top of the namespace::

    from pagedserve import LLM, SamplingParams

They are imported lazily, so ``pagedserve.clients`` (and the generated protocol modules under
``pagedserve.v1``) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from pagedserve.backend.llm import LLM
    from pagedserve.backend.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pagedserve.backend.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pagedserve.backend.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
