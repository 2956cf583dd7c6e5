"""The sparse mixture-of-experts MLP: a router picks each token's top-k experts, the experts'
gate/up/down MLPs run on the tokens routed to them (``pagedserve.kernels.fused_moe``), and the
weighted outputs are summed.

Routing follows transformers 5 (Mixtral, Qwen3-MoE): softmax over all experts in fp32, top-k,
then renormalise the k weights to sum to one when the family does (always for Mixtral,
``norm_topk_prob`` for Qwen3-MoE), in ``pagedserve.kernels.moe_routing``. Qwen3-MoE rounds the
weights to the model dtype before they scale the experts' outputs; Mixtral keeps them in fp32.

Tensor parallelism splits every expert's intermediate dimension over the ranks (gate and up by
rows, down by columns), so each rank holds a slice of every expert and routing needs no
communication; the block's output is all-reduced once. The router is whole on every rank.

Checkpoints store the experts one by one (``experts.{e}.gate_proj.weight`` and friends, which
``save_pretrained`` of transformers 5 writes too) or stacked (``experts.gate_up_proj``
``[E, 2 * inter, hidden]`` and ``experts.down_proj`` ``[E, hidden, inter]``, transformers'
in-memory layout); ``MoEWeightNames`` maps both onto this module's two stacked parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import FullShapes, _copy_checked, _divide, _shard
from pagedserve.backend.models.llama import LlamaForCausalLM
from pagedserve.backend.quantization.unquantized import UnquantizedLinearMethod, linear
from pagedserve.kernels.fused_moe import fused_moe
from pagedserve.kernels.moe_routing import route_top_k

# Called with (layer index, top-k expert ids [T, k]) by every MoE block's forward when set; a
# benchmark counts the experts each step reads with it. Off (None) it costs one comparison.
RoutingObserver = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # per expert, before tensor-parallel splitting
    renormalize: bool
    # Round the routing weights to the model dtype before they scale the experts' outputs.
    weights_in_model_dtype: bool

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(
                f"top-k {self.top_k} must be between 1 and the number of experts "
                f"({self.num_experts})"
            )


class Router(nn.Module):
    """The [num_experts, hidden] gate, whole on every rank and kept in the model dtype
    whatever the linear method (as the LM head is)."""

    def __init__(self, num_experts: int, hidden_size: int, ctx: LayerContext) -> None:
        super().__init__()
        self.weight = ctx.new_parameter((num_experts, hidden_size))

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"the router takes no shard id, got {shard_id!r}")
        _copy_checked(param, loaded_weight)

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        return {None: tuple(param.shape)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, None)


GATE, UP = 0, 1


class Experts(nn.Module):
    """Every expert's MLP weights stacked: ``w13`` [E, 2 * inter_local, hidden] (this rank's
    gate rows, then its up rows) and ``w2`` [E, hidden, inter_local].

    Shard ids name one expert's checkpoint tensor: ``(expert, GATE)`` and ``(expert, UP)`` for
    ``w13``, ``expert`` for ``w2``.
    """

    def __init__(self, config: MoEConfig, ctx: LayerContext) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.inter_local = _divide(config.intermediate_size, ctx.tp_size, "expert intermediate size")
        self.tp_rank = ctx.tp_rank
        e, h, i = config.num_experts, config.hidden_size, self.inter_local
        self.w13 = ctx.new_parameter((e, 2 * i, h))
        self.w2 = ctx.new_parameter((e, h, i))

    def _expert(self, shard_id: Any) -> int:
        expert = shard_id[0] if isinstance(shard_id, tuple) else shard_id
        if not isinstance(expert, int) or not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index must be 0..{self.num_experts - 1}, got {shard_id!r}")
        return expert

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        expert = self._expert(shard_id)
        i, start = self.inter_local, self.tp_rank * self.inter_local
        full = self.intermediate_size
        if param is self.w13:
            if not isinstance(shard_id, tuple) or shard_id[1] not in (GATE, UP):
                raise ValueError(f"w13 shard id must be (expert, 0 or 1), got {shard_id!r}")
            rows = _shard(loaded_weight, 0, full, start, i)
            _copy_checked(param.data[expert].narrow(0, shard_id[1] * i, i), rows)
        elif param is self.w2:
            if isinstance(shard_id, tuple):
                raise ValueError(f"w2 shard id must be an expert index, got {shard_id!r}")
            _copy_checked(param.data[expert], _shard(loaded_weight, 1, full, start, i))
        else:
            raise ValueError("not a parameter of these experts")

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        h, full = self.hidden_size, self.intermediate_size
        if param is self.w13:
            return {
                (e, part): (full, h) for e in range(self.num_experts) for part in (GATE, UP)
            }
        return {e: (h, full) for e in range(self.num_experts)}


class SparseMoEBlock(nn.Module):
    """Router plus experts; ``forward`` returns the block's full output on every rank."""

    observer: RoutingObserver | None = None

    def __init__(self, config: MoEConfig, layer_index: int, ctx: LayerContext) -> None:
        super().__init__()
        if not isinstance(ctx.linear_method, UnquantizedLinearMethod):
            raise NotImplementedError(
                f"MoE experts support unquantized weights only, not {type(ctx.linear_method).__name__}"
            )
        self.config = config
        self.layer_index = layer_index
        self.tp_size = ctx.tp_size
        self.gate = Router(config.num_experts, config.hidden_size, ctx)
        self.experts = Experts(config, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_top_k(self.gate(x), self.config.top_k, self.config.renormalize)
        if self.config.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        if self.observer is not None:
            self.observer(self.layer_index, ids)
        out = fused_moe(x, self.experts.w13, self.experts.w2, weights, ids)
        if self.tp_size > 1:
            dist.all_reduce(out)
        return out


def observe_routing(model: nn.Module, observer: RoutingObserver | None) -> int:
    """Set (or with None, clear) the routing observer of every MoE block of ``model``; returns
    how many blocks there are. Set it before CUDA graphs are captured, or run eagerly: a
    replayed graph does not call Python."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoEBlock)]
    for block in blocks:
        block.observer = observer
    return len(blocks)


@dataclass(frozen=True)
class MoEWeightNames:
    """How one family's checkpoints name an expert's projections.

    ``block``: the MoE block's name in the checkpoint (``mlp``, ``block_sparse_moe``);
    ``aliases``: other names it may carry (transformers 5 calls Mixtral's block ``mlp``);
    ``gate``, ``up``, ``down``: the per-expert projection names.
    """

    block: str
    gate: str
    up: str
    down: str
    aliases: tuple[str, ...] = ()

    def _pattern(self) -> re.Pattern[str]:
        blocks = "|".join(re.escape(b) for b in (self.block, *self.aliases))
        projections = "|".join(re.escape(p) for p in (self.gate, self.up, self.down))
        return re.compile(
            rf"^(?P<prefix>.*\.)(?:{blocks})\.experts\."
            rf"(?:(?P<expert>\d+)\.(?P<proj>{projections})\.weight|(?P<stacked>gate_up_proj|down_proj))$"
        )

    def unstack(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint names with stacked expert tensors cut into per-expert ones (views), and
        the block's aliases renamed to ``block``."""
        pattern = self._pattern()
        for name, tensor in weights:
            match = pattern.match(name)
            if match is None:
                for alias in self.aliases:
                    name = name.replace(f".{alias}.gate.", f".{self.block}.gate.")
                yield name, tensor
                continue
            base = f"{match['prefix']}{self.block}.experts"
            if match["expert"] is not None:
                yield f"{base}.{match['expert']}.{match['proj']}.weight", tensor
            elif match["stacked"] == "down_proj":
                for e, piece in enumerate(tensor):
                    yield f"{base}.{e}.{self.down}.weight", piece
            else:
                if tensor.dim() != 3 or tensor.shape[1] % 2:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has {tuple(tensor.shape)}; expected "
                        "[experts, 2 * intermediate, hidden]"
                    )
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    yield f"{base}.{e}.{self.gate}.weight", gate[e]
                    yield f"{base}.{e}.{self.up}.weight", up[e]

    def target(self, name: str) -> tuple[str, Any] | None:
        """A per-expert checkpoint name -> (our parameter, shard id); None for other names."""
        match = self._pattern().match(name)
        if match is None or match["expert"] is None:
            return None
        base = f"{match['prefix']}{self.block}.experts"
        expert, proj = int(match["expert"]), match["proj"]
        if proj == self.down:
            return f"{base}.w2", expert
        return f"{base}.w13", (expert, GATE if proj == self.gate else UP)


def expected_expert_loads(model: nn.Module) -> dict[str, set[str]]:
    """For each experts parameter of ``model``: the ``name:shard`` entries a complete
    checkpoint fills (the loader's bookkeeping format)."""
    expected: dict[str, set[str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Experts):
            for param_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}"
                expected[name] = {f"{name}:{shard}" for shard in module.full_shapes(param)}
    return expected


class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-shaped decoder whose layers hold MoE blocks: Llama's loading, with the experts'
    checkpoint tensors (per expert or stacked) routed to the stacked parameters."""

    expert_names: MoEWeightNames

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        try:
            super().load_weights(self.expert_names.unstack(weights))
        except ValueError as exc:  # a stacked tensor of the wrong shape
            raise ModelLoadError(str(exc)) from exc

    def _target(self, name: str) -> tuple[str, str | int | None]:  # type: ignore[override]
        expert = self.expert_names.target(name)
        if expert is not None:
            return expert
        return LlamaForCausalLM._target(name)

    def _expected_loads(self, params: dict[str, nn.Parameter]) -> set[str]:  # type: ignore[override]
        experts = expected_expert_loads(self)
        expected = LlamaForCausalLM._expected_loads(params) - set(experts)
        for shards in experts.values():
            expected |= shards
        return expected
