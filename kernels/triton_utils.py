"""Shared plumbing for the Triton kernels: an optional import and the dispatch rule.

Triton is an optional dependency (CPU-only installs run the torch references), so every kernel
module imports ``triton``/``tl`` from here. Without Triton, ``triton.jit`` leaves the kernel a
plain function that dispatch never reaches.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without Triton

    def _jit(fn: Callable[..., Any] | None = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit)
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton", "tl", "use_triton", "next_power_of_2", "cdiv"]


def use_triton(x: torch.Tensor) -> bool:
    """The dispatch rule of every op: Triton kernels for CUDA tensors, torch references otherwise."""
    return HAS_TRITON and x.is_cuda


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tl.arange extents must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
