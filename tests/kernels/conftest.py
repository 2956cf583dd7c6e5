"""Kernel tests run on CUDA when there is one, else on CPU under Triton's interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates a kernel, so it is set here,
before anything below imports the kernel modules; modules another test package imported
earlier are reloaded so their kernels are decorated again, now as interpreted functions.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [n for n in sys.modules if n.startswith("pagedserve.kernels.")]:
        importlib.reload(sys.modules[_name])

    # Triton 3.6's interpreter turns scalars into Python ints with int() on a 1-element array,
    # which numpy >= 2.4 rejects (triton-lang/triton#9171, fixed upstream by #9172); loops with
    # a bound read from memory hit it. Squeeze first, as the upstream fix does.
    from triton.runtime import interpreter as _interpreter

    _patch_lang_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor_numpy24(tensor: type, scope: _interpreter._LangPatchScope) -> None:
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _interpreter._patch_lang_tensor = _patch_lang_tensor_numpy24


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (compiled kernels), else CPU (interpreted kernels)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
