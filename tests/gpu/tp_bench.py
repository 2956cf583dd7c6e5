"""Tensor parallelism on GPUs, one stage and one split per process (a clean device each time):

    python tests/gpu/tp_bench.py --stage STAGE --tp N --tokenizer DIR --out FILE.json [--overlap on|off]

- bench: random-weight Llama-3-8B (tests/gpu/configs/llama-3-8b) in bf16: output tokens/s for
  256 requests of 512 prompt / 256 output tokens (ignore_eos, greedy), then the decode latency
  at batch 1 (median time between the tokens of one 512-token-prompt request).
- parity: random-weight Llama-3.2-1B in fp32 (no TF32): greedy tokens and the top-two logprob
  gaps of 16 mixed requests, for the caller to compare TP=2 with TP=1 under the near-tie rule.
- kill: Llama-3.2-1B in bf16 at TP >= 2: SIGKILL a worker mid-stream; the stream must end in
  EngineDeadError within seconds (the NCCL communicators are aborted, not left to time out).

``--overlap`` sets overlapped scheduling (default: the engine's own default, which with
tensor parallelism is off). ``tests/gpu/test_tensor_parallel_gpu.py`` runs the stages and
compares them. Every process
started here (and its workers, which inherit the environment) keeps NVLink multicast off.
"""

from __future__ import annotations

import os

for _key, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ[_key] = _value

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT = 256, 512, 256
LATENCY_INPUT, LATENCY_OUTPUT = 512, 129
PARITY_LENGTHS = [1, 3, 7, 16, 17, 31, 64, 100, 128, 200, 255, 256, 300, 400, 511, 600]
PARITY_NEW_TOKENS = 32
# The kill stage's collectives give up after this, should aborting them not work.
KILL_TIMEOUT_S = 60.0


def model_dir(name: str, tokenizer: Path, work: Path) -> Path:
    """A config-only model directory (dummy weights) with the tokenizer files beside it."""
    target = work / name
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIGS / name / "config.json", target / "config.json")
    for f in tokenizer.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(f, target / f.name)
    return target


def stage_bench(tp: int, tokenizer: Path, work: Path, overlap: bool | None) -> dict[str, Any]:
    from pagedserve import LLM, SamplingParams
    from pagedserve.backend.offline_cli import Workload, bench_pagedserve

    directory = model_dir("llama-3-8b", tokenizer, work)
    with LLM(str(directory), load_format="dummy", dtype="bfloat16", max_model_len=4096,
             max_num_seqs=256, max_num_batched_tokens=8192, tensor_parallel_size=tp,
             overlap_scheduling=overlap) as llm:
        result = bench_pagedserve(llm, Workload(BENCH_REQUESTS, BENCH_INPUT, BENCH_OUTPUT))
        prompt = Workload(1, LATENCY_INPUT, 1, seed=7).prompts(llm.engine.vocab_size, set())[0]
        params = SamplingParams(max_tokens=LATENCY_OUTPUT, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        for _ in llm.stream(prompt_token_ids=prompt[:16], sampling_params=params):
            pass  # warm-up
        # One delta per step; the sampler has synchronized when it arrives.
        stream = llm.stream(prompt_token_ids=prompt, sampling_params=params)
        stamps = [time.perf_counter() for _ in stream]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # after the first token: decode steps
    return {
        "tp": tp,
        "overlap": llm.engine.overlap,
        "output_tokens_per_s": result.output_tokens_per_s,
        "seconds": result.seconds,
        "output_tokens": result.output_tokens,
        "decode_ms_median": 1e3 * statistics.median(gaps),
        "decode_ms_mean": 1e3 * statistics.fmean(gaps),
    }


def stage_parity(tp: int, tokenizer: Path, work: Path, overlap: bool | None) -> dict[str, Any]:
    from pagedserve import LLM, SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(n)] for n in PARITY_LENGTHS]
    params = SamplingParams(max_tokens=PARITY_NEW_TOKENS, temperature=0.0, logprobs=2)
    directory = model_dir("llama-3.2-1b", tokenizer, work)
    with LLM(str(directory), load_format="dummy", dtype="float32", max_model_len=2048,
             gpu_memory_utilization=0.5, max_num_batched_tokens=1024,
             tensor_parallel_size=tp, overlap_scheduling=overlap) as llm:
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return {
        "tp": tp,
        "token_ids": [list(o.token_ids) for o in outputs],
        "top2_gaps": [[lp.top[0][1] - lp.top[1][1] for lp in o.logprobs or []] for o in outputs],
    }


def stage_kill(tp: int, tokenizer: Path, work: Path, overlap: bool | None) -> dict[str, Any]:
    from pagedserve import LLM, SamplingParams
    from pagedserve.backend.errors import EngineDeadError

    directory = model_dir("llama-3.2-1b", tokenizer, work)
    with LLM(str(directory), load_format="dummy", dtype="bfloat16", max_model_len=2048,
             tensor_parallel_size=tp, distributed_timeout_s=KILL_TIMEOUT_S,
             overlap_scheduling=overlap) as llm:
        pids = llm.engine.runner.leader.worker_pids
        params = SamplingParams(max_tokens=1000, ignore_eos=True, detokenize=False)
        stream = llm.stream(prompt_token_ids=list(range(1000, 1100)), sampling_params=params)
        next(stream)
        os.kill(pids[-1], signal.SIGKILL)
        start = time.monotonic()
        error = None
        try:
            for _ in stream:
                pass
        except EngineDeadError as exc:
            error = str(exc)
        seconds = time.monotonic() - start
    return {"tp": tp, "seconds_to_fail": seconds, "error": error, "killed_pid": pids[-1]}


STAGES = {"bench": stage_bench, "parity": stage_parity, "kill": stage_kill}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overlap", choices=("on", "off"), help="overlapped scheduling")
    args = parser.parse_args()
    overlap = None if args.overlap is None else args.overlap == "on"
    work = Path(tempfile.mkdtemp(prefix="pagedserve-tp-"))
    try:
        result = STAGES[args.stage](args.tp, args.tokenizer, work, overlap)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["device"] = torch.cuda.get_device_name()
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
