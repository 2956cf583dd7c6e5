"""Everything the GPU path must show, in one device call: ceilings, parity, throughput.

    python tests/gpu/device_bench.py --tokenizer DIR --out DIR [--stages parity-fp32,parity-bf16,bench-1b,bench-8b]
        [--trained-gguf FILE]

- ceilings: device-to-device copy bandwidth and the bf16 matmul rate (the roofline's terms);
- parity: fp32 (no TF32) greedy tokens vs transformers for 16 mixed requests on a random-weight
  Llama-3.2-1B (near-tie rule), and bf16 teacher-forced next-token argmax agreement;
- parity-bf16-trained: the same bf16 agreement on a trained checkpoint (the default model's GGUF,
  given by ``--trained-gguf``) over the English passages in ``parity_passages.txt``: random
  weights give near-uniform logits, so there the argmax mostly measures rounding noise;
- bench-1b / bench-8b: ``bench offline`` on dummy Llama-3.2-1B / Llama-3-8B, 256 requests of 512
  prompt / 256 output tokens, ignore_eos, beside transformers' continuous batching, with the
  roofline fraction; bench-1b-serial / bench-8b-serial: the same without overlapped scheduling
  and without the peer (the ablation); profile-1b / profile-8b: throughput at two token budgets
  and a kernel-time profile; profile-decode-1b / profile-decode-8b: the bench workload's steady
  decode steps alone, wall time per step beside kernel time per step and the host's Python
  profile (what bounds a decode step: the device or the host); profile-decode-qwen3-30b-a3b the
  same for the mixture of experts.
- bench-qwen3-30b-a3b: the same ``bench offline`` workload on a dummy Qwen3-30B-A3B (128
  experts, top-8), beside transformers, with a roofline whose weight term counts, per decode
  step, the experts the step's tokens route to (recorded in an untimed eager pass of the same
  workload through ``observe_routing``); bench-qwen3-8b: the dense Qwen3-8B, whose roofline
  fraction is compared with bench-8b's (Llama-3-8B) when both run.
- ``--smoke``: bench-qwen3-30b-a3b's code path on the CPU with a tiny Qwen3-MoE config and a
  small workload (fp32, CPU ceilings), to check the stage runs before device time is spent.

``--tokenizer`` is a directory of tokenizer files (the dummy models need one to build requests).
Prints a short table per stage and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # for tests.backend.engine.reference

CONFIGS = Path(__file__).resolve().parent / "configs"
BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT = 256, 512, 256
# Tokens per engine step: 16384 keeps prefill GEMMs large and needs half the mixed
# prefill/decode steps of 8192 (the profile stage measures both).
BENCH_TOKEN_BUDGET = 16384
BENCH_DTYPE = "bfloat16"
BENCH_MAX_MODEL_LEN = 4096
DEVICE = "cuda"
GIB = 1 << 30
SMOKE_MOE_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 49152,
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}


def use_smoke_settings() -> None:
    """A CPU run of the MoE bench stage: tiny model, small workload, fp32."""
    global BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT, BENCH_TOKEN_BUDGET, BENCH_DTYPE, DEVICE
    global BENCH_MAX_MODEL_LEN
    BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT, BENCH_TOKEN_BUDGET = 6, 40, 6, 64
    BENCH_DTYPE, DEVICE, BENCH_MAX_MODEL_LEN = "float32", "cpu", 512


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def timed(fn: Any, reps: int = 20) -> float:
    """Median seconds of fn() over reps, timed with CUDA events after two warm-ups (with the
    host clock on the CPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def stage_ceilings() -> dict[str, float]:
    on_cuda = DEVICE == "cuda"
    src = torch.randn(GIB // 2 if on_cuda else 1 << 22, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * src.element_size() / copy_s
    n = 8192 if on_cuda else 512
    dtype = torch.bfloat16 if on_cuda else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    mm_s = timed(lambda: a @ b, reps=10)
    del src, dst, a, b
    release()
    result = {"copy_bandwidth_gbs": copy_bw / 1e9, "bf16_matmul_tflops": 2 * n**3 / mm_s / 1e12}
    print(f"ceilings: copy {result['copy_bandwidth_gbs']:.0f} GB/s (read+write), "
          f"bf16 matmul {result['bf16_matmul_tflops']:.0f} TFLOP/s")
    return result


def model_dir_with_tokenizer(
    name: str, tokenizer: Path, work: Path, config: dict[str, Any] | None = None
) -> Path:
    target = work / name
    target.mkdir(parents=True, exist_ok=True)
    if config is None:
        shutil.copy(CONFIGS / name / "config.json", target / "config.json")
    else:
        (target / "config.json").write_text(json.dumps(config))
    for f in tokenizer.iterdir():
        if f.is_file() and not f.name.startswith(("config", "model")):
            shutil.copy(f, target / f.name)
    return target


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_llama_1b(tokenizer: Path, work: Path) -> tuple[Any, Path, Any]:
    """A random-weight Llama-3.2-1B saved as an fp32 checkpoint; returns (hf model, dir, config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dir = model_dir_with_tokenizer("llama-3.2-1b", tokenizer, work)
    weights = work / "llama-3.2-1b-random"
    config = AutoConfig.from_pretrained(cfg_dir)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda().eval()
    hf.save_pretrained(weights)
    for f in cfg_dir.iterdir():
        if f.name != "config.json":
            shutil.copy(f, weights / f.name)
    return hf, weights, config


def parity_prompts() -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 3, 7, 16, 17, 31, 64, 100, 128, 200, 255, 256, 300, 400, 511, 600]
    return [[rng.randrange(1000, 100_000) for _ in range(n)] for n in lengths]


def stage_parity_fp32(hf: Any, weights: Path, config: Any) -> dict[str, Any]:
    """fp32 without TF32: greedy tokens identical to transformers up to near-ties."""
    from pagedserve import LLM, SamplingParams
    from tests.backend.engine.reference import compare_greedy, hf_greedy

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prompts, max_new = parity_prompts(), 32
    refs = [hf_greedy(hf, p, max_new, [config.eos_token_id]) for p in prompts]
    llm = LLM(str(weights), dtype="float32", max_model_len=2048, gpu_memory_utilization=0.5,
              max_num_batched_tokens=1024)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=max_new, temperature=0.0))
    ties = compare_greedy([o.token_ids for o in outs], refs)
    print(f"parity fp32: 16 mixed requests identical to transformers (near-ties met: {ties})")
    del llm, outs
    release()
    return {"fp32_near_ties": ties}


def stage_parity_bf16(hf: Any, weights: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """bf16 teacher-forced next-token argmax against transformers' bf16, with the fp32 model as
    the common truth: how often each bf16 implementation keeps fp32's argmax, and agreement
    restricted to positions whose fp32 top-two gap exceeds a bf16 near-tie tolerance.

    The bf16 reference is loaded as a transformers user loads it (``dtype=torch.bfloat16``):
    casting the fp32 model with ``.to(torch.bfloat16)`` would also round RoPE's ``inv_freq``
    buffer to bf16, which transformers itself never does, and move every position's angles.
    bf16 logits tie exactly at the top at a few percent of positions (an ulp is 1/16 at 16);
    ``torch.argmax`` then returns the lower token id, so agreement is also reported as "our
    argmax is one of transformers' tied maxima"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface, AutoModelForCausalLM

    from pagedserve import LLM

    with torch.inference_mode():
        fp32 = [hf(torch.tensor([ids], device="cuda")).logits[0].float() for ids in prompts]
    del hf
    release()
    AttentionInterface.register(EXACT_ATTENTION, exact_attention)
    hf = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(str(weights), dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5,
              enable_cuda_graphs=False)
    runner = llm.engine.runner
    columns: dict[str, list[torch.Tensor]] = {}
    gaps = []
    for ids, ref32 in zip(prompts, fp32):
        batch = torch.tensor([ids], device="cuda")
        with torch.inference_mode():
            hf.set_attn_implementation("sdpa")
            hf16 = hf(batch).logits[0].float()
            # The same bf16 weights through other attention code, transformers' eager path and
            # PyTorch's FlashAttention (the default SDPA kernel may be another, cuDNN's on an
            # H100): how well two correct bf16 implementations can agree on these logits.
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                hf16_flash = hf(batch).logits[0].float()
            hf.set_attn_implementation("eager")
            hf16_eager = hf(batch).logits[0].float()
            # Attention computed in float64 and rounded once to bf16, everything else as
            # transformers' bf16: what an implementation with exact attention would agree.
            hf.set_attn_implementation(EXACT_ATTENTION)
            hf16_exact = hf(batch).logits[0].float()
            ours = teacher_forced_logits(runner, ids).float()
        row = {
            "ours_vs_transformers_bf16": ours.argmax(-1) == hf16.argmax(-1),
            "transformers_bf16_vs_fp32": hf16.argmax(-1) == ref32.argmax(-1),
            "ours_bf16_vs_fp32": ours.argmax(-1) == ref32.argmax(-1),
            "transformers_bf16_eager_vs_sdpa": hf16_eager.argmax(-1) == hf16.argmax(-1),
            "transformers_sdpa_flash_vs_default": hf16_flash.argmax(-1) == hf16.argmax(-1),
            "ours_in_transformers_bf16_argmax_set": in_argmax_set(ours, hf16),
            "transformers_eager_in_sdpa_argmax_set": in_argmax_set(hf16_eager, hf16),
            "transformers_sdpa_flash_in_default_argmax_set": in_argmax_set(hf16_flash, hf16),
            "transformers_exact_attention_vs_sdpa": hf16_exact.argmax(-1) == hf16.argmax(-1),
            "transformers_exact_attention_in_sdpa_argmax_set": in_argmax_set(hf16_exact, hf16),
            "ours_vs_transformers_exact_attention": ours.argmax(-1) == hf16_exact.argmax(-1),
            "transformers_sdpa_flash_vs_exact_attention": hf16_flash.argmax(-1) == hf16_exact.argmax(-1),
            "transformers_bf16_top_tied": (hf16 == hf16.amax(-1, keepdim=True)).sum(-1) > 1,
            "transformers_sdpa_flash_row_identical_to_default": (hf16_flash == hf16).all(-1),
            "ours_row_identical_to_transformers_bf16": (ours == hf16).all(-1),
        }
        for name, values in row.items():
            columns.setdefault(name, []).append(values.float())
        top2 = ref32.topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    table = {name: torch.cat(values) for name, values in columns.items()}
    gap = torch.cat(gaps)
    result: dict[str, Any] = {"positions": int(gap.numel())}
    result.update({name: float(values.mean()) for name, values in table.items()})
    for tol in (0.05, 0.1, 0.2, 0.5):
        decisive = gap >= tol
        agree = table["ours_vs_transformers_bf16"]
        result[f"ours_vs_transformers_bf16_gap_ge_{tol}"] = float(agree[decisive].mean())
        result[f"share_gap_ge_{tol}"] = float(decisive.float().mean())
    hf.set_attn_implementation("sdpa")
    with torch.inference_mode():
        result["layer0_ops_bitwise_mismatch"] = op_mismatch(hf, runner, max(prompts, key=len))
    print("parity bf16:", json.dumps(result, indent=1))
    del llm, hf
    release()
    return result


EXACT_ATTENTION = "float64_reference"


def exact_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, scaling: float | None = None, **_: Any) -> tuple[torch.Tensor, None]:
    """Causal attention of one unpadded sequence in float64, rounded once to the input dtype;
    registered with transformers' attention interface as ``EXACT_ATTENTION``."""
    group = query.shape[1] // key.shape[1]
    q = query.double()
    k = key.double().repeat_interleave(group, 1)
    v = value.double().repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    n = q.shape[2]
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


def in_argmax_set(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row: whether ``ours``' argmax token has the reference row's maximum logit."""
    picked = reference.gather(-1, ours.argmax(-1, keepdim=True))[:, 0]
    return picked == reference.amax(-1)


def op_mismatch(hf: Any, runner: Any, ids: list[int]) -> dict[str, float]:
    """Share of bf16 output elements that differ bitwise between each of our layer-0 ops and
    transformers' op on the same inputs (the real prompt's embeddings): where end-to-end
    differences start. Each op gets transformers' output of the op before it as input."""
    import torch.nn.functional as F
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from pagedserve.backend.runner.attention import AttentionMetadata
    from pagedserve.kernels.activation import silu_and_mul

    theirs, ours = hf.model.layers[0], runner.model.model.layers[0]
    n = len(ids)
    positions = torch.arange(n, device="cuda")
    x = hf.model.embed_tokens(torch.tensor(ids, device="cuda"))

    def differ(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.reshape(b.shape) != b).float().mean())

    out: dict[str, float] = {}
    normed = theirs.input_layernorm(x)
    out["rms_norm"] = differ(ours.input_layernorm(x)[0], normed)
    attn = theirs.self_attn
    q, k, v = (proj(normed) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    fused_q, fused_k, fused_v = ours.self_attn.qkv_proj.split(ours.self_attn.qkv_proj(normed))
    out["qkv_proj"] = differ(torch.cat([t.reshape(n, -1) for t in (fused_q, fused_k, fused_v)], -1),
                             torch.cat([q, k, v], -1))
    heads, kv_heads, d = fused_q.shape[1], fused_k.shape[1], fused_q.shape[2]
    cos, sin = hf.model.rotary_emb(x[None], positions[None])
    q4 = q.view(1, n, heads, d).transpose(1, 2)
    k4 = k.view(1, n, kv_heads, d).transpose(1, 2)
    rq4, rk4 = apply_rotary_pos_emb(q4, k4, cos, sin)
    rq, rk = ours.self_attn.rotary_emb(positions, q.view(n, heads, d), k.view(n, kv_heads, d))
    out["rotary"] = differ(torch.cat([rq.reshape(n, -1), rk.reshape(n, -1)], -1),
                           torch.cat([rq4.transpose(1, 2).reshape(n, -1), rk4.transpose(1, 2).reshape(n, -1)], -1))
    v4 = v.view(1, n, kv_heads, d).transpose(1, 2)
    group = heads // kv_heads
    ref_attn = F.scaled_dot_product_attention(
        rq4, rk4.repeat_interleave(group, 1), v4.repeat_interleave(group, 1),
        is_causal=True, scale=ours.self_attn.attn.scale,
    ).transpose(1, 2).reshape(n, -1)
    metadata = AttentionMetadata.single_prefill(n, runner.block_size, "cuda")
    ours_attn = ours.self_attn.attn.backend.forward(
        rq4.transpose(1, 2)[0].contiguous(), rk4.transpose(1, 2)[0].contiguous(),
        v.view(n, kv_heads, d), runner.kv_caches[0], metadata, ours.self_attn.attn.scale,
    )
    out["attention"] = differ(ours_attn, ref_attn)
    out["fused_add_rms_norm"] = differ(
        ours.post_attention_layernorm(ref_attn, x)[0], theirs.post_attention_layernorm(ref_attn + x)
    )
    mlp = theirs.mlp
    gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
    out["gate_up_proj"] = differ(ours.mlp.gate_up_proj(normed), torch.cat([gate, up], -1))
    out["silu_and_mul"] = differ(silu_and_mul(torch.cat([gate, up], -1)), mlp.act_fn(gate) * up)
    return out


def trained_model(gguf: Path, work: Path) -> tuple[Any, Path, list[list[int]]]:
    """The default model's GGUF converted as the server converts it; returns (hf fp32 model,
    directory, tokenized passages)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedserve.backend.models.default_model import convert_gguf

    weights = work / "trained"
    weights.mkdir()
    convert_gguf(gguf, weights)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    passages = (Path(__file__).resolve().parent / "parity_passages.txt").read_text().split("\n===\n")
    prompts = [tokenizer(text)["input_ids"] for text in passages]
    hf = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).cuda().eval()
    return hf, weights, prompts


def teacher_forced_logits(runner: Any, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one prefill through our model and paged attention."""
    from pagedserve.backend.runner.attention import AttentionMetadata, forward_context

    n = len(ids)
    metadata = AttentionMetadata.single_prefill(n, runner.block_size, "cuda")
    with forward_context(metadata, runner.kv_caches):
        hidden = runner.model(torch.tensor(ids, device="cuda"), torch.arange(n, device="cuda"))
    return runner.model.compute_logits(hidden)


@dataclass
class RoutingRecord:
    """Per forward of the engine: its tokens and the experts it reads (over every MoE layer,
    the number of distinct experts its tokens route to). A ``RoutingObserver``."""

    steps: list[tuple[int, int]] = field(default_factory=list)
    last_layer: int = -1

    def __call__(self, layer: int, ids: torch.Tensor) -> None:
        if layer <= self.last_layer or not self.steps:
            self.steps.append((ids.shape[0], 0))
        tokens, experts = self.steps[-1]
        self.steps[-1] = (tokens, experts + int(torch.unique(ids).numel()))
        self.last_layer = layer

    def decode_steps(self, num_requests: int) -> list[int]:
        """Experts read by each step of at most one token per request, in order: the
        decode-only steps (the standard workload's prefill steps fill the token budget)."""
        return [experts for tokens, experts in self.steps if tokens <= num_requests]


def record_routing(llm: Any, prompts: list[list[int]], output_len: int) -> RoutingRecord:
    """The workload again, untimed and eager (decode graphs released, so the observer runs on
    every step), recording the experts every step reads."""
    from pagedserve import SamplingParams
    from pagedserve.backend.models.moe import observe_routing

    runner = llm.engine.runner
    runner.release_decode_graphs()
    record = RoutingRecord()
    assert observe_routing(runner.model, record) > 0, "not a mixture-of-experts model"
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    try:
        llm.generate(prompt_token_ids=prompts, sampling_params=params)
    finally:
        observe_routing(runner.model, None)
    return record


@dataclass
class WeightShape:
    """Matmul parameters by how often a step reads them."""

    every_step: int  # attention, routers, dense MLPs, lm head: read by every decode step
    per_expert: int  # one expert of one layer (gate, up, down)
    experts: int  # expert MLPs over all layers (128 x 48 for Qwen3-30B-A3B)
    per_token: int  # what one token multiplies by: every_step's layers plus its top-k experts

    @classmethod
    def of(cls, config: Any) -> WeightShape:
        from pagedserve.backend.models.qwen3_moe import is_sparse_layer, num_experts_of

        h, layers = config.hidden_size, config.num_hidden_layers
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        attention = h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h
        dense_mlp = 3 * h * config.intermediate_size
        moe = config.model_type == "qwen3_moe"
        sparse = sum(is_sparse_layer(config, i) for i in range(layers)) if moe else 0
        experts = num_experts_of(config) if moe else 0
        per_expert = 3 * h * config.moe_intermediate_size if moe else 0
        body = layers * attention + (layers - sparse) * dense_mlp + sparse * experts * h
        # The lm head counts for decode steps; prefill computes it for the last tokens only.
        every_step = body + config.vocab_size * h
        top_k = int(config.num_experts_per_tok) if moe else 0
        return cls(every_step, per_expert, sparse * experts, body + sparse * top_k * per_expert)


def roofline_seconds(
    config: Any, ceilings: dict[str, float], experts_read: list[int] | None = None
) -> float:
    """Lower bound for the workload: each decode step reads its weights and every live K/V
    once at copy bandwidth; prefill runs its matmul FLOPs at the measured bf16 rate.

    A dense model's decode step reads all weights. A mixture of experts' step reads the dense
    part and, per layer, only the experts its tokens route to: ``experts_read[i]`` for decode
    step i as recorded (their mean past the recorded steps); without a record, all experts.
    Prefill FLOPs count each token's top-k experts.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    vocab = config.vocab_size
    weights = WeightShape.of(config)
    read = experts_read or [weights.experts]
    mean_read = sum(read) / len(read)
    bw = ceilings["copy_bandwidth_gbs"] * 1e9  # bytes moved per second, reads and writes alike
    kv_per_token = layers * 2 * kv_heads * head_dim * 2
    decode = 0.0
    for step in range(BENCH_OUTPUT):
        kv = BENCH_REQUESTS * (BENCH_INPUT + step) * kv_per_token
        experts = read[step] if step < len(read) else mean_read
        params = weights.every_step + experts * weights.per_expert
        decode += (2 * params + kv) / bw
    prefill_tokens = BENCH_REQUESTS * BENCH_INPUT
    # Layers for every prompt token, the lm head for each prompt's last token only; causal
    # attention (QK^T and PV) over half the square.
    flops = 2 * weights.per_token * prefill_tokens + 2 * vocab * h * BENCH_REQUESTS
    flops += 4 * layers * heads * head_dim * BENCH_REQUESTS * BENCH_INPUT**2 / 2
    prefill = flops / (ceilings["bf16_matmul_tflops"] * 1e12)
    return decode + prefill


def stage_bench(
    name: str, tokenizer: Path, work: Path, ceilings: dict[str, float], overlap: bool = True,
    with_peer: bool = True, config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Throughput beside the peer; ``overlap=False, with_peer=False`` is the ablation that
    shows what overlapped scheduling buys (same engine, host and device serialized).
    ``config``: a config.json to write in place of ``configs/<name>`` (the smoke's)."""
    from pagedserve import LLM
    from pagedserve.backend.offline_cli import (
        PeerTarget,
        Workload,
        bench_pagedserve,
        bench_transformers,
        print_table,
    )

    cfg_dir = model_dir_with_tokenizer(name, tokenizer, work, config)
    workload = Workload(BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT)
    llm = LLM(str(cfg_dir), load_format="dummy", dtype=BENCH_DTYPE, device=DEVICE,
              max_model_len=BENCH_MAX_MODEL_LEN, max_num_seqs=256,
              max_num_batched_tokens=BENCH_TOKEN_BUDGET, overlap_scheduling=overlap)
    target = PeerTarget.of(llm)
    ours = bench_pagedserve(llm, workload)
    experts_read = None
    if target.hf_config.model_type == "qwen3_moe":
        # Other prompts of the same kind: no prefix-cache hits, so every prefill step fills
        # the token budget and only decode steps have at most one token per request.
        fresh = Workload(BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT, seed=workload.seed + 2)
        record = record_routing(
            llm, fresh.prompts(target.vocab_size, target.special_ids), BENCH_OUTPUT
        )
        experts_read = record.decode_steps(num_requests=BENCH_REQUESTS)
    del llm
    release()
    bound = roofline_seconds(target.hf_config, ceilings, experts_read)
    fraction = bound / ours.seconds
    result: dict[str, Any] = {
        "overlap_scheduling": overlap,
        "pagedserve_tok_s": ours.output_tokens_per_s, "pagedserve_s": ours.seconds,
        "roofline_s": bound, "roofline_fraction": fraction,
    }
    if experts_read is not None:
        weights = WeightShape.of(target.hf_config)
        result.update(decode_steps_recorded=len(experts_read),
                      mean_experts_read_per_decode_step=sum(experts_read) / max(1, len(experts_read)),
                      experts_total=weights.experts)
        print(f"{name}: decode steps read {result['mean_experts_read_per_decode_step']:.0f} of "
              f"{weights.experts} experts on average ({len(experts_read)} steps recorded)")
    systems = [ours]
    if with_peer:
        peer = bench_transformers(target, workload, continuous=True)
        release()
        systems.append(peer)
        result.update(peer=peer.system, peer_tok_s=peer.output_tokens_per_s, peer_s=peer.seconds,
                      ratio_to_peer=ours.output_tokens_per_s / peer.output_tokens_per_s)
    print_table(workload, systems, device=device_name())
    print(f"{name} (overlap {overlap}): roofline {bound:.2f} s -> pagedserve at "
          f"{100 * fraction:.1f}% of roofline")
    return result


def stage_profile(name: str, tokenizer: Path, work: Path) -> dict[str, Any]:
    """Where the device time goes: the bench workload at two token budgets, then a kernel
    profile of a shorter run (all the prefill, 32 decode steps)."""
    from torch.profiler import ProfilerActivity, profile

    from pagedserve import LLM
    from pagedserve.backend.offline_cli import Workload, bench_pagedserve

    cfg_dir = model_dir_with_tokenizer(name, tokenizer, work)
    llm = LLM(str(cfg_dir), load_format="dummy", dtype="bfloat16", max_model_len=4096,
              max_num_seqs=256, max_num_batched_tokens=16384)
    scheduler = llm.engine.scheduler.config
    result: dict[str, Any] = {}
    for budget in (8192, 16384):
        scheduler.max_num_batched_tokens = budget
        run = bench_pagedserve(llm, Workload(BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT, seed=budget))
        result[f"tok_s_budget_{budget}"] = run.output_tokens_per_s
        print(f"{name}: max_num_batched_tokens {budget}: {run.output_tokens_per_s:.0f} tok/s ({run.seconds:.2f} s)")
    scheduler.max_num_batched_tokens = BENCH_TOKEN_BUDGET
    short = Workload(BENCH_REQUESTS, BENCH_INPUT, 32, seed=7)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run = bench_pagedserve(llm, short)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    print(f"profile ({short.output_len} output tokens): wall {run.seconds:.2f} s, kernels {busy:.2f} s")
    print(events.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=70))
    result.update(profile_wall_s=run.seconds, profile_kernel_s=busy)
    del llm
    release()
    return result


def stage_profile_decode(name: str, tokenizer: Path, work: Path) -> dict[str, Any]:
    """Steady decode of the bench workload: 256 requests past their prefill, stepped one
    engine step at a time, (1) plain, (2) under the CUDA profiler, (3) under cProfile."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from pagedserve import LLM, SamplingParams
    from pagedserve.backend.offline_cli import Workload, _special_ids

    cfg_dir = model_dir_with_tokenizer(name, tokenizer, work)
    llm = LLM(str(cfg_dir), load_format="dummy", dtype="bfloat16", max_model_len=4096,
              max_num_seqs=256, max_num_batched_tokens=BENCH_TOKEN_BUDGET)
    engine = llm.engine
    prompts = Workload(BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT).prompts(
        engine.vocab_size, _special_ids(engine.tokenizer))
    params = SamplingParams(max_tokens=BENCH_OUTPUT, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    requests = [engine.builder.build(prompt_token_ids=p, params=params) for p in prompts]
    for request in requests:
        engine.add(request)
    while any(not r.output_token_ids for r in requests):  # every prefill done
        engine.step()

    def steps(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    plain = steps(48)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        profiled = steps(32)
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events) / 1e6 / 32
    print(events.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=70))
    host = cProfile.Profile()
    host.enable()
    python = steps(32)
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(18)
    while engine.has_unfinished():
        engine.step()
    result = {"decode_step_wall_ms": plain * 1e3, "decode_step_kernel_ms": kernels * 1e3,
              "decode_step_wall_profiled_ms": profiled * 1e3,
              "decode_step_wall_cprofile_ms": python * 1e3}
    print(f"{name} steady decode at batch {BENCH_REQUESTS}: wall {plain * 1e3:.2f} ms/step, "
          f"kernels {kernels * 1e3:.2f} ms/step (under the profiler {profiled * 1e3:.2f} ms/step)")
    print(text.getvalue())
    del llm, engine, requests
    release()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="parity-fp32,parity-bf16,bench-1b,bench-8b")
    parser.add_argument("--trained-gguf", type=Path, help="GGUF checkpoint for parity-bf16-trained")
    parser.add_argument("--no-peer", action="store_true",
                        help="bench stages without transformers' run (rooflines only)")
    parser.add_argument("--smoke", action="store_true",
                        help="the MoE bench stage on the CPU with a tiny model (no other stage)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    if args.smoke:
        use_smoke_settings()
        stages = ["bench-moe-smoke"]
    print(f"device: {device_name()}, torch {torch.__version__}")
    results: dict[str, Any] = {"device": device_name(), "date": time.strftime("%Y-%m-%d")}
    work = Path(tempfile.mkdtemp(prefix="pagedserve-device-"))
    results["ceilings"] = ceilings = stage_ceilings()
    try:
        if "parity-fp32" in stages or "parity-bf16" in stages:
            hf, weights, config = random_llama_1b(args.tokenizer, work)
            if "parity-fp32" in stages:
                results["parity_fp32"] = stage_parity_fp32(hf, weights, config)
            if "parity-bf16" in stages:
                torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 truth stays fp32
                results["parity_bf16"] = stage_parity_bf16(hf, weights, parity_prompts()[4:])
            del hf
            release()
        if "parity-bf16-trained" in stages:
            torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 truth stays fp32
            hf, weights, prompts = trained_model(args.trained_gguf, work)
            results["parity_bf16_trained"] = stage_parity_bf16(hf, weights, prompts)
            del hf
            release()
        for stage, name in (("profile-1b", "llama-3.2-1b"), ("profile-8b", "llama-3-8b")):
            if stage in stages:
                results[stage] = stage_profile(name, args.tokenizer, work)
        for stage, name in (("profile-decode-1b", "llama-3.2-1b"), ("profile-decode-8b", "llama-3-8b"),
                            ("profile-decode-qwen3-30b-a3b", "qwen3-30b-a3b")):
            if stage in stages:
                results[stage] = stage_profile_decode(name, args.tokenizer, work)
        for stage, name in (("bench-1b", "llama-3.2-1b"), ("bench-8b", "llama-3-8b")):
            if stage + "-serial" in stages:
                results[stage + "-serial"] = stage_bench(
                    name, args.tokenizer, work, ceilings, overlap=False, with_peer=False
                )
            if stage in stages:
                results[stage] = stage_bench(
                    name, args.tokenizer, work, ceilings, with_peer=not args.no_peer
                )
                (args.out / "results.json").write_text(json.dumps(results, indent=2))
        for stage, name in (("bench-qwen3-8b", "qwen3-8b"), ("bench-qwen3-30b-a3b", "qwen3-30b-a3b")):
            if stage in stages:
                results[stage] = stage_bench(
                    name, args.tokenizer, work, ceilings, with_peer=not args.no_peer
                )
                (args.out / "results.json").write_text(json.dumps(results, indent=2))
        if "bench-moe-smoke" in stages:
            results["bench-moe-smoke"] = stage_bench(
                "qwen3-moe-smoke", args.tokenizer, work, ceilings, config=SMOKE_MOE_CONFIG
            )
        if "bench-8b" in results and "bench-qwen3-8b" in results:
            llama, qwen = (results[s]["roofline_fraction"] for s in ("bench-8b", "bench-qwen3-8b"))
            results["qwen3_8b_over_llama_3_8b_roofline_fraction"] = qwen / llama
            print(f"Qwen3-8B at {100 * qwen:.1f}% of its roofline, Llama-3-8B at {100 * llama:.1f}%: "
                  f"ratio {qwen / llama:.3f} (target within 5%)")
    finally:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
