"""The default linear method: weights in the model dtype, one GEMM per call.

It lives here, beside the methods that will replace it (fp8), rather than in the layer module:
layers.py then holds only layers, and importing this module costs nothing but torch. The
LM head, which stays in the model dtype in every format, calls ``linear`` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from pagedserve.backend.models.layer_context import LayerContext


_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


class _OneDNNWeights:
    """oneDNN-packed copies of CPU fp32 weights, made on a weight's first GEMM.

    ``F.linear`` on CPU fp32 runs MKL's sgemm, which on non-Intel x86 takes a far slower code
    path than oneDNN's own AVX-512 GEMM; a weight reordered once into oneDNN's blocked layout
    also spares the per-call reorder. Same fp32 math, only the summation order differs. The
    copy costs the weights' size again in host memory (the plain parameter stays: loaders,
    the tied embedding and tensor-parallel slicing use it). Every weight loader drops the copy
    of the parameter it writes (``forget_packed``), so a reload is never served stale; copies
    die with their parameters.
    """

    # The GEMM row count the blocked layout is chosen for; any row count runs on it.
    BATCH_HINT = 32

    def __init__(self) -> None:
        self._packed: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @staticmethod
    def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            _HAS_ONEDNN_LINEAR
            and x.device.type == "cpu"
            and weight.device.type == "cpu"
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and weight.dim() == 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        )

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        packed = self._packed.get(weight)
        if packed is None:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.BATCH_HINT)
            self._packed[weight] = packed
        return packed

    def forget(self, weight: torch.Tensor) -> None:
        self._packed.pop(weight, None)


_onednn_weights = _OneDNNWeights()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias in the weights' dtype (oneDNN with a packed weight on CPU fp32)."""
    if _OneDNNWeights.applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(
            x, _onednn_weights.get(weight), bias, "none", [], ""
        )
    return F.linear(x, weight, bias)


def forget_packed(weight: torch.Tensor) -> None:
    """Drop the packed copy of ``weight``: its loader is about to write new values into it."""
    _onednn_weights.forget(weight)


class UnquantizedLinearMethod:
    """``layer.weight`` in the model dtype, multiplied as it is."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: Sequence[int], ctx: LayerContext
    ) -> None:
        layer.weight = ctx.new_parameter((sum(output_sizes), input_size))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing to convert: the checkpoint's tensors are already what ``apply`` reads."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, cast(torch.Tensor, layer.weight), bias)
