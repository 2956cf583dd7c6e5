"""Comparing our greedy tokens with transformers' generate, with the near-tie rule.

Floating-point order differs between the two implementations, so a sequence may diverge where
the reference's top two logits are within ``TIE_TOLERANCE``; the comparison of that sequence
stops there and the tie is counted. Any other divergence is a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TIE_TOLERANCE = 1e-4


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    top2_gaps: list[float]  # reference logit gap between its top two tokens, per position


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id) -> ReferenceOutput:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=eos_token_id, pad_token_id=eos_token_id[0],
            output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    gaps = []
    for step_logits in out.logits:
        top2 = step_logits[0].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return ReferenceOutput(tokens[: len(gaps)], gaps)


def compare_greedy(ours: list[list[int]], refs: list[ReferenceOutput]) -> int:
    """Assert token-for-token equality up to near-ties; returns how many ties were met."""
    ties = 0
    for i, (got, ref) in enumerate(zip(ours, refs)):
        for j, want in enumerate(ref.token_ids):
            if j >= len(got):
                raise AssertionError(f"sequence {i}: ours stopped at {j}, reference goes on: {ref.token_ids}")
            if got[j] != want:
                if ref.top2_gaps[j] < TIE_TOLERANCE:
                    ties += 1
                    break
                raise AssertionError(
                    f"sequence {i} diverges at {j}: ours {got[j]} vs reference {want} "
                    f"(reference top-2 gap {ref.top2_gaps[j]:.3g})\nours {got}\nref  {ref.token_ids}"
                )
        else:
            assert len(got) == len(ref.token_ids), f"sequence {i}: ours is longer: {got} vs {ref.token_ids}"
    return ties
