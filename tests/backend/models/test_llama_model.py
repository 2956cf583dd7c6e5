"""Our Llama-family forward over the paged cache against transformers' full-sequence forward.

Each model runs one schedule (see ``paged_schedule``) through the torch attention backend:
ragged prompts prefilled together with the first chunk of a chunked prefill, the second chunk
beside decode tokens, then decode steps. Every logit row is compared with the row transformers
computes for the same position from the whole sequence at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.backend.config import ModelConfig
from pagedserve.backend.models.loader import LoadedModel, load_model
from pagedserve.backend.runner.attention import TorchAttentionBackend
from tests.backend.models.paged_schedule import (
    build_schedule,
    hf_logits,
    make_sequences,
    random_prompts,
    run_schedule,
)

CPU = torch.device("cpu")
# fp32 on both sides; they differ only in GEMM fusion (fused qkv/gate-up) and reduction order.
# Measured worst row: ~1e-6 of max |logit| on the tiny models, ~4e-6 on the default model.
REL_TOL = 2e-5


def check_against_transformers(
    loaded: LoadedModel,
    prompts: list[list[int]],
    chunked_len: int,
    first_chunk: int,
    decode_steps: int,
    block_size: int,
    seed: int,
) -> list[int]:
    """Runs the schedule, checks every logit row against transformers; returns our argmaxes."""
    totals, steps = build_schedule(
        [len(p) for p in prompts], chunked_len, first_chunk, decode_steps
    )
    sequences = make_sequences(prompts, totals, loaded.model.vocab_size, seed)
    ours = run_schedule(loaded.model, sequences, steps, block_size, torch.float32, CPU)
    assert loaded.model_dir is not None
    reference = hf_logits(loaded.model_dir, sequences, torch.float32, CPU)
    picks: list[int] = []
    for s, pos, row in ours:
        ref = reference[s][pos]
        scale = ref.abs().max().item()
        diff = (row - ref).abs().max().item()
        assert diff <= REL_TOL * scale, (
            f"seq {s} position {pos}: max |diff| {diff:.2e} > {REL_TOL} * max |ref| {scale:.2f}"
        )
        # Greedy picks agree, up to ties closer than the difference itself.
        pick = int(row.argmax())
        assert ref[pick] >= ref.max() - 2 * diff, f"seq {s} position {pos}: argmax differs"
        picks.append(pick)
    return picks


def _load(model_dir: Path | None) -> LoadedModel:
    model = None if model_dir is None else str(model_dir)
    return load_model(ModelConfig(model=model), CPU, torch.float32, TorchAttentionBackend())


@pytest.mark.parametrize(
    "fixture", ["tiny_llama_dir", "tiny_llama3_dir", "tiny_qwen2_dir", "tiny_mistral_dir"]
)
def test_tiny_models_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    loaded = _load(request.getfixturevalue(fixture))
    # Prompt lengths straddle block boundaries (block_size 4); one long prompt reaches
    # positions where every RoPE frequency has turned many times.
    picks = check_against_transformers(
        loaded,
        prompts=random_prompts([1, 4, 7, 250], loaded.model.vocab_size, seed=5),
        chunked_len=45,
        first_chunk=18,
        decode_steps=4,
        block_size=4,
        seed=11,
    )
    # The tiny models are meant for generation tests: their greedy picks must vary.
    assert len(set(picks)) > len(picks) // 2, "tiny model logits collapse onto few tokens"


# The tiny models' norm weights are all ones (transformers' init); the default model's are not.
@pytest.mark.parametrize(
    "fixture",
    ["tiny_llama_dir", "tiny_llama3_dir", "tiny_qwen2_dir", "tiny_mistral_dir", "default_model_dir"],
)
def test_bf16_prompt_logits_are_bit_identical_to_transformers(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """In bf16 every op rounds where transformers' bf16 model rounds (the norm's cast before its
    weight, each rotary product, SiLU before its product, logits in bf16), so whole-prompt
    logits on the CPU path equal transformers' (sdpa attention, as ours) bit for bit. Teacher-
    forced argmax agreement with transformers then depends on the GPU kernels alone.

    Both sides run with oneDNN off: on CPUs with AMX its bf16 GEMMs round differently by
    matrix shape (our fused QKV against transformers' three projections, our packed tokens
    against its padded batch), which is the BLAS library, not the model code this test
    checks; torch's own bf16 GEMM gives every element the same bits whatever the shape."""
    model_dir = request.getfixturevalue(fixture)
    loaded = load_model(
        ModelConfig(model=str(model_dir)), CPU, torch.bfloat16, TorchAttentionBackend()
    )
    prompts = random_prompts([5, 64, 300], loaded.model.vocab_size, seed=9)
    sequences = dict(enumerate(prompts))
    one_step = [{s: (0, len(ids)) for s, ids in sequences.items()}]
    with torch.backends.mkldnn.flags(enabled=False):
        ours = run_schedule(loaded.model, sequences, one_step, 16, torch.bfloat16, CPU)
        reference = hf_logits(model_dir, sequences, torch.bfloat16, CPU, attn_implementation="sdpa")
    for s, pos, row in ours:
        assert torch.equal(row, reference[s][pos]), f"seq {s} position {pos} differs"


@pytest.mark.slow
def test_default_model_matches_transformers(default_model_dir: Path) -> None:
    loaded = _load(None)
    assert loaded.model_dir == default_model_dir
    # A real chat prompt, so the default model also runs on the text it was tuned on.
    chat = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three primary colors."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompts = [loaded.tokenizer(chat).input_ids, *random_prompts([9], loaded.model.vocab_size, 3)]
    check_against_transformers(
        loaded,
        prompts=prompts,
        chunked_len=40,
        first_chunk=16,
        decode_steps=3,
        block_size=16,
        seed=3,
    )
