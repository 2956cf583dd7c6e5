"""Building blocks of Llama-family decoders, shaped for tensor parallelism.

Every linear layer, the embedding and the LM head hold only their rank's slice of the full
weight (``tp_rank`` of ``tp_size``) and have a ``weight_loader(param, loaded_weight, shard_id)``
that cuts that slice out of a full checkpoint tensor, so splitting a model over GPUs changes
sizes, not loading code. ``full_shapes(param)`` names the full checkpoint tensors a parameter is
cut from (dummy weights are drawn at full size and sliced, so they do not depend on the split).

Layers take one ``LayerContext`` (dtype, device, split, linear method) rather than each of
those positionally. A linear layer's weight and GEMM belong to the context's linear method
(``pagedserve.backend.quantization``); the layer keeps the sharding, the bias and the
all-reduce. ``Attention`` reads its KV cache and the step's metadata from the forward context
(``pagedserve.backend.runner.attention.forward_context``), so the model's forward threads
neither through its layers.

Device dispatch lives in one place per op: the kernels' dispatchers
(``pagedserve.kernels.rmsnorm.rms_norm`` and friends pick Triton on CUDA, the torch reference
elsewhere), and GEMMs in the linear method. Layers call those, never a kernel variant directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.quantization.unquantized import forget_packed, linear
from pagedserve.backend.runner.attention import AttentionBackend, get_forward_context
from pagedserve.kernels import rmsnorm as rmsnorm_ops
from pagedserve.kernels import rotary as rotary_ops
from pagedserve.kernels.triton_utils import use_triton

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tp_size ({denominator})")
    return numerator // denominator


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy with an explicit shape check: a silent broadcast would hide a wrong checkpoint."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded)


def _shard(loaded: torch.Tensor, dim: int, full_size: int, start: int, size: int) -> torch.Tensor:
    """This rank's slice of a full checkpoint tensor, after checking it really is full-size
    (a wrong size could otherwise slice cleanly and load the wrong numbers)."""
    if loaded.dim() <= dim or loaded.shape[dim] != full_size:
        raise ValueError(
            f"shape mismatch: checkpoint {tuple(loaded.shape)}, expected size {full_size} "
            f"along dim {dim}"
        )
    return loaded.narrow(dim, start, size)


# Shard id -> shape of the full checkpoint tensor that shard is cut from.
FullShapes = dict[Any, tuple[int, ...]]


class _VocabShard:
    """This rank's contiguous slice of the vocabulary: ``ceil(vocab / tp_size)`` rows per rank,
    the last rank's tail padded with zero rows (their logits are cut off after the gather)."""

    def __init__(self, vocab_size: int, ctx: LayerContext) -> None:
        self.vocab_size = vocab_size
        self.tp_rank = ctx.tp_rank
        self.tp_size = ctx.tp_size
        self.num_local = -(-vocab_size // self.tp_size)
        self.start = self.tp_rank * self.num_local
        self.num_valid = max(0, min(vocab_size - self.start, self.num_local))

    def load(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        rows = _shard(loaded, 0, self.vocab_size, self.start, self.num_valid)
        _copy_checked(param.data.narrow(0, 0, self.num_valid), rows)
        with torch.no_grad():
            param.data[self.num_valid :].zero_()


# --------------------------------------------------------------------------------------------
# Embedding, norm, rotary
# --------------------------------------------------------------------------------------------


class _VocabParallel(nn.Module):
    """A [vocab_size, hidden_size] matrix split over ranks by vocabulary rows (``self.shard``).

    The embedding and the LM head take dtype, device and split as plain arguments rather than
    a LayerContext: neither has a linear method to choose (the head stays in the model dtype
    in every format), and callers outside the model code build them on their own.
    """

    vocab_size: int
    hidden_size: int
    shard: _VocabShard

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        forget_packed(param)  # the LM head's GEMM may have packed it (tied or not)
        self.shard.load(param, loaded_weight)

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        return {None: (self.vocab_size, self.hidden_size)}


class VocabEmbedding(_VocabParallel):
    """Token embedding split over ranks by vocabulary rows.

    Each rank looks up the ids in its slice (others give zero rows) and the partial results are
    all-reduced, so every rank ends with the full embedding of every token.
    """

    def __init__(self, vocab_size: int, hidden_size: int, ctx: LayerContext) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.shard = _VocabShard(vocab_size, ctx)
        self.weight = ctx.new_parameter((self.shard.num_local, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Fixed shapes and no host syncs, so this also runs inside a CUDA graph.
        local = input_ids - self.shard.start
        mine = (local >= 0) & (local < self.shard.num_local)
        out = F.embedding(local.clamp(0, self.shard.num_local - 1), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        dist.all_reduce(out)
        return out


class RMSNorm(nn.Module):
    """RMSNorm that also takes the residual stream, so the add and the norm can fuse."""

    # The weight a model starts training with (dummy weights start there too): the weight is
    # the scale itself here; families that scale by (1 + weight) start at zero.
    initial_value: float = 1.0

    def __init__(self, hidden_size: int, eps: float, ctx: LayerContext) -> None:
        super().__init__()
        self.eps = eps
        self.weight = ctx.new_parameter((hidden_size,))

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        _copy_checked(param, loaded_weight)

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        return {None: tuple(param.shape)}

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); without a residual, (norm(x), x)."""
        if residual is None:
            return rmsnorm_ops.rms_norm(x, self.weight, self.eps), x
        return rmsnorm_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


# transformers' default base when a config names none.
_DEFAULT_ROPE_THETA = 10000.0


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The model's RoPE settings as one dict with ``rope_theta`` and ``rope_type``.

    transformers 5 keeps them in ``config.rope_parameters``; older releases in
    ``config.rope_theta`` plus an optional ``config.rope_scaling`` (and Phi-3's
    ``partial_rotary_factor`` beside them). LongRoPE, first named ``su``, gets its pretraining
    length and stretch ``factor`` filled in the way transformers fills them. Models whose layer
    types rotate differently (Gemma 3: local and global bases) keep one dict per type in
    ``config.rope_parameters``; ``layer_type`` picks one.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if layer_type is not None:
        if not params or not isinstance(params.get(layer_type), dict):
            raise NotImplementedError(
                f"the config has no RoPE settings for {layer_type!r} layers "
                "(per-layer-type settings are read in transformers 5's rope_parameters format)"
            )
        params = params[layer_type]
    if params:
        params = dict(params)
    else:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", _DEFAULT_ROPE_THETA))
    partial = getattr(hf_config, "partial_rotary_factor", None)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] == "su":
        params["rope_type"] = "longrope"
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
    if params["rope_type"] == "longrope":
        # Phi-3 keeps the pretraining length beside max_position_embeddings, and transformers
        # prefers it there to any copy inside the RoPE settings.
        original = getattr(hf_config, "original_max_position_embeddings", None)
        if original:
            params["original_max_position_embeddings"] = original
        params.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
        if params.get("factor") is None:
            params["factor"] = (
                hf_config.max_position_embeddings / params["original_max_position_embeddings"]
            )
    return params


def _rope_frequencies(
    rotary_dim: int, params: dict[str, Any], max_model_len: int
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, the factor cos and sin are scaled by) for ``params``.

    LongRoPE has two sets of rescale factors, short and long. transformers picks one per
    forward, by the longest position in it: the long set once a sequence outgrows the
    pretraining length. A paged engine rotates every key once, when it is cached, and shares
    cached keys between requests, so here the set is chosen once for the model, by the longest
    sequence the engine will run: long factors when ``max_model_len`` exceeds the pretraining
    length, short ones otherwise. transformers' generate computes the same numbers for every
    sequence when ``max_model_len`` is within the pretraining length, and otherwise for every
    sequence whose prompt alone is longer than it. Where they differ (a longer
    ``max_model_len``, and a prompt within the pretraining length) transformers' own keys mix
    the two sets, by the forward that happened to compute each token.
    """
    theta = float(params["rope_theta"])
    if params["rope_type"] == "linear":
        # Positions interpolated by the factor, as transformers divides its frequencies.
        return rotary_ops.rope_inv_freq(rotary_dim, theta, None) / float(params["factor"]), 1.0
    if params["rope_type"] != "longrope":
        return rotary_ops.rope_inv_freq(rotary_dim, theta, params), 1.0
    original = int(params["original_max_position_embeddings"])
    which = "long_factor" if max_model_len > original else "short_factor"
    factors = params[which]
    if len(factors) != rotary_dim // 2:
        raise ModelLoadError(
            f"LongRoPE {which} has {len(factors)} entries; a rotary dim of {rotary_dim} "
            f"needs {rotary_dim // 2}"
        )
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = rotary_ops.longrope_attention_factor(float(params["factor"]), original)
    inv_freq = rotary_ops.longrope_inv_freq(rotary_dim, theta, [float(f) for f in factors])
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Rotary embedding with a precomputed fp32 cos/sin table for every position.

    ``rotary_dim`` rotates only the first dims of each head and passes the rest through, for
    the families whose transformers code honours ``partial_rotary_factor`` (Phi-3); left out,
    whole heads rotate and a partial factor in ``params`` is refused rather than ignored.
    """

    cos_sin_cache: torch.Tensor  # a buffer: [max_position, rotary_dim] (cos | sin halves)

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        params: dict[str, Any],
        ctx: LayerContext,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        if rotary_dim is None:
            if params.get("partial_rotary_factor", 1.0) != 1.0:
                raise NotImplementedError(
                    "partial rotary embeddings are not supported for this model family"
                )
            rotary_dim = head_dim
        if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
            raise NotImplementedError(
                f"a rotary dim of {rotary_dim} is not supported (even, at most head_dim {head_dim})"
            )
        self.rotary_dim = rotary_dim
        self.head_dim = head_dim
        inv_freq, scale = _rope_frequencies(rotary_dim, params, ctx.max_model_len or max_position)
        cache = rotary_ops.cos_sin_cache(inv_freq, max_position)
        if scale != 1.0:
            cache = cache * scale  # in fp32, where transformers scales its cos and sin
        self.register_buffer("cos_sin_cache", cache.to(ctx.device), persistent=False)
        # The reference path's per-token cos/sin for the positions of the forward in progress:
        # every layer rotates at the same positions, so they are gathered once, not per layer.
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, head_dim], k [T, kv_heads, head_dim] -> rotated (q, k)."""
        if self.rotary_dim == self.head_dim:
            return self._rotate(positions, q, k)
        d = self.rotary_dim
        q_rot, k_rot = self._rotate(positions, q[..., :d], k[..., :d])
        return torch.cat([q_rot, q[..., d:]], dim=-1), torch.cat([k_rot, k[..., d:]], dim=-1)

    def _rotate(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if use_triton(q):
            return rotary_ops.apply_rotary(q, k, positions, self.cos_sin_cache)
        memo = self._memo
        if memo is None or memo[0] is not positions or memo[1].dtype != q.dtype:
            cos, sin = rotary_ops.rotary_cos_sin(positions, self.cos_sin_cache, q.dtype)
            memo = self._memo = (positions, cos, sin)
        return rotary_ops.apply_rotary_cos_sin(q, k, memo[1], memo[2])


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def layer_sliding_window(hf_config: Any, layer_index: int) -> int | None:
    """The number of keys layer ``layer_index`` attends to (its own included), None when it
    attends to the whole context, as transformers decides it.

    transformers 5 names each layer's kind in ``layer_types`` (Gemma 2/3 alternate local and
    global layers; Qwen2/3 window the layers from ``max_window_layers`` on), and a
    ``sliding_attention`` layer uses ``sliding_window``. Configs without layer kinds (Mistral,
    Phi-3) window every layer when ``sliding_window`` is set, unless ``use_sliding_window``
    (Qwen's older configs) turns it off.
    """
    window = getattr(hf_config, "sliding_window", None)
    if not window or not getattr(hf_config, "use_sliding_window", True):
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return int(window) if layer_types[layer_index] == "sliding_attention" else None
    return int(window)


class Attention(nn.Module):
    """One decoder layer's attention over its slice of the paged KV cache.

    Holds what is fixed per layer (which cache is its own, this rank's head counts, the
    scale, the sliding window and logit cap if any, the backend) and reads what changes per
    step, the caches and the metadata, from the forward context the runner opens around the
    model call.
    """

    def __init__(
        self,
        layer_index: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        backend: AttentionBackend,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, head_dim], k and v [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        step = get_forward_context()
        kv_cache = step.kv_caches[self.layer_index]
        out = self.backend.forward(
            q, k, v, kv_cache, step.metadata, self.scale, self.sliding_window, self.softcap
        )
        return out.reshape(-1, self.num_heads * self.head_dim)


def kv_attention_window(model: nn.Module) -> int | None:
    """The widest sliding window of the model's attention layers when every one has a
    window, else None: below ``position - window + 1`` no layer reads a key of that position's
    sequence again, so the block manager can release those blocks."""
    windows = [m.sliding_window for m in model.modules() if isinstance(m, Attention)]
    if not windows or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)


# --------------------------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------------------------


class ShardedLinear(nn.Module):
    """A linear layer holding this rank's ``[sum(output_sizes), input_size]`` slice of the
    weight, created and multiplied by the context's linear method.

    ``output_sizes`` are this rank's rows of each projection fused in the layer (one entry
    unless fused), in the order they are stacked.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool, ctx: LayerContext
    ) -> None:
        super().__init__()
        self.tp_rank = ctx.tp_rank
        self.tp_size = ctx.tp_size
        self.linear_method = ctx.linear_method
        self.linear_method.create_weights(self, input_size, output_sizes, ctx)
        self.bias = ctx.new_parameter((sum(output_sizes),)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)


class ColumnParallelLinear(ShardedLinear):
    """y = x W^T + b with W split along its output rows: each rank computes a slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: LayerContext) -> None:
        local = _divide(output_size, ctx.tp_size, "output size")
        super().__init__(input_size, [local], bias, ctx)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        forget_packed(param)
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        size = param.shape[0]
        shard = _shard(loaded_weight, 0, size * self.tp_size, self.tp_rank * size, size)
        _copy_checked(param, shard)

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        return {None: (param.shape[0] * self.tp_size, *param.shape[1:])}


class MergedColumnParallelLinear(ShardedLinear):
    """Several column-parallel projections of one input in one GEMM (gate and up).

    The local weight is ``[shard_0 | shard_1 | ...]``, each shard being this rank's slice of
    that projection; ``shard_id`` is the index of the projection a checkpoint tensor belongs to.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool, ctx: LayerContext
    ) -> None:
        self.output_sizes = list(output_sizes)
        self.local_sizes = [_divide(s, ctx.tp_size, "output size") for s in self.output_sizes]
        super().__init__(input_size, self.local_sizes, bias, ctx)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        forget_packed(param)
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.local_sizes):
            raise ValueError(f"shard id must be 0..{len(self.local_sizes) - 1}, got {shard_id!r}")
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        full = self.output_sizes[shard_id]
        source = _shard(loaded_weight, 0, full, self.tp_rank * size, size)
        _copy_checked(param.data.narrow(0, offset, size), source)

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        return {i: (full, *param.shape[1:]) for i, full in enumerate(self.output_sizes)}


class QKVParallelLinear(ShardedLinear):
    """Fused q/k/v projection; the local weight is ``[q | k | v]`` for this rank's heads.

    Query heads are split over ranks. KV heads are split too when there are at least as many
    as ranks; with fewer (GQA at high TP) each KV head is replicated on the ranks whose query
    heads use it.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        ctx: LayerContext,
    ) -> None:
        tp_rank, tp_size = ctx.tp_rank, ctx.tp_size
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = _divide(num_heads, tp_size, "number of attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "number of KV heads")
            self.kv_head_start = tp_rank * self.num_kv_heads
        else:
            if tp_size % num_kv_heads != 0:
                raise ValueError(
                    f"tp_size ({tp_size}) is not a multiple of the KV heads ({num_kv_heads})"
                )
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank // (tp_size // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias, ctx)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        forget_packed(param)
        kv_start = self.kv_head_start * self.head_dim
        kv_full = self.total_num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
            full = self.total_num_heads * self.head_dim
        elif shard_id == "k":
            offset, size, start, full = self.q_size, self.kv_size, kv_start, kv_full
        elif shard_id == "v":
            offset, size, start, full = self.q_size + self.kv_size, self.kv_size, kv_start, kv_full
        else:
            raise ValueError(f"shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        source = _shard(loaded_weight, 0, full, start, size)
        _copy_checked(param.data.narrow(0, offset, size), source)

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        q_full = self.total_num_heads * self.head_dim
        kv_full = self.total_num_kv_heads * self.head_dim
        rest = tuple(param.shape[1:])
        return {"q": (q_full, *rest), "k": (kv_full, *rest), "v": (kv_full, *rest)}

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, local_out] -> q [T, heads, d], k and v [T, kv_heads, d] (views)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
        )


class RowParallelLinear(ShardedLinear):
    """y = x W^T + b with W split along its input columns; partial sums are all-reduced.

    The input is expected already split (the output of a column-parallel layer). The bias is
    added by rank 0 only, so the all-reduced sum holds it once.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        ctx: LayerContext,
        reduce_results: bool = True,
    ) -> None:
        local = _divide(input_size, ctx.tp_size, "input size")
        super().__init__(local, [output_size], bias, ctx)
        self.reduce_results = reduce_results

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None:
        forget_packed(param)
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard id, got {shard_id!r}")
        if param.dim() == 2:
            size = param.shape[1]
            loaded_weight = _shard(loaded_weight, 1, size * self.tp_size, self.tp_rank * size, size)
        _copy_checked(param, loaded_weight)

    def full_shapes(self, param: nn.Parameter) -> FullShapes:
        if param.dim() == 2:
            return {None: (param.shape[0], param.shape[1] * self.tp_size)}
        return {None: tuple(param.shape)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        out = self.linear_method.apply(self, x, bias)
        if self.tp_size > 1 and self.reduce_results:
            dist.all_reduce(out)
        return out


class LMHead(_VocabParallel):
    """Hidden states to fp32 logits; shares the embedding matrix when the model ties them.

    Split over ranks by vocabulary rows like the embedding: each rank computes the logits of
    its slice and an all-gather gives every rank the full ``[rows, vocab_size]`` logits. Its
    GEMM is the plain one whatever the linear method: the head stays in the model dtype.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        ctx: LayerContext,
        tied_embedding: VocabEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.shard = _VocabShard(vocab_size, ctx)
        self.tied = tied_embedding is not None
        if tied_embedding is not None:
            shard = tied_embedding.shard
            if shard.tp_size != ctx.tp_size or shard.tp_rank != ctx.tp_rank:
                raise ValueError("a tied LM head must be split like its embedding")
            self.weight = tied_embedding.weight
        else:
            self.weight = ctx.new_parameter((self.shard.num_local, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, None)
        tp = self.shard.tp_size
        if tp == 1:
            return logits.float()
        # Gathered in the model's dtype (half the bytes of fp32, the same values once upcast).
        rows, local = logits.shape
        gathered = torch.empty((tp * rows, local), dtype=logits.dtype, device=logits.device)
        _all_gather_single(gathered, logits.contiguous())
        # [rank, row, local vocab] -> [row, rank * local vocab], then drop the padding rows.
        full = gathered.view(tp, rows, local).permute(1, 0, 2).reshape(rows, tp * local)
        return full[:, : self.vocab_size].float()
