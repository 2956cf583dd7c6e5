"""Two source trees of pagedserve, measured in one device run: offline throughput (greedy and
sampled), batch-1 latency and gRPC serving beside offline, with the tokens compared.

    python tests/gpu/engine_ab_bench.py --tree before=DIR --tree after=. --tokenizer DIR \
        --stages offline-1b,offline-8b,serve-1b --out OUT

Each (stage, tree) runs in a fresh process that imports pagedserve from that tree (through a
tree of links laid out as the installed namespace), trees alternating, so both see the same
machine in the same minutes. Only the public API is used (``LLM``, ``SamplingParams``,
``pagedserve bench serve``), so any two versions compare. Workloads are those of
BENCHMARKS.md: random-weight (dummy) bf16 Llama-3.2-1B / Llama-3-8B from the public configs,
256 requests of 512 random prompt tokens / 256 output tokens, ignore_eos; sampled is
temperature 0.8, top-p 0.95, top-k 50 with a seed per request; batch 1 is one such request
alone. The offline stages also hash every output token, so a changed token is reported, not
just a changed speed. Prints a table per stage and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"1b": "llama-3.2-1b", "8b": "llama-3-8b"}
NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN = 256, 512, 256
ENGINE = dict(
    load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=256,
    max_num_batched_tokens=16384,
)
ROUNDS = 2
CHILD_TIMEOUT_S = 420
# --smoke: the whole flow on the CPU in seconds (a 2-layer model, a handful of tokens), to
# check the script itself before it spends device time.
SMOKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}


def use_smoke_settings() -> None:
    global NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN
    NUM_REQUESTS, INPUT_LEN, OUTPUT_LEN = 4, 24, 6
    ENGINE.update(dtype="float32", device="cpu", max_num_seqs=8, max_num_batched_tokens=128)


def link_tree(root: Path, out: Path) -> Path:
    """``out/pagedserve`` laid out as the installed package (pyproject's package-dir)."""
    pkg = out / "pagedserve"
    pkg.mkdir(parents=True)
    for p in (root / "protos" / "pagedserve").iterdir():
        if p.name != "__pycache__":
            (pkg / p.name).symlink_to(p.resolve())
    for name in ("backend", "kernels", "clients"):
        (pkg / name).symlink_to((root / name).resolve())
    return out


def model_dir(name: str, tokenizer: Path, work: Path) -> Path:
    target = work / name
    if not target.exists():
        target.mkdir(parents=True)
        if ENGINE.get("device") == "cpu":
            (target / "config.json").write_text(json.dumps(SMOKE_CONFIG))
        else:
            shutil.copy(CONFIGS / MODELS[name] / "config.json", target / "config.json")
        for f in tokenizer.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, target / f.name)
    return target


def prompts(seed: int, count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(INPUT_LEN)] for _ in range(count)]


def digest(outputs: list[Any]) -> str:
    h = hashlib.sha256()
    for o in outputs:
        h.update(json.dumps(o.token_ids).encode())
    return h.hexdigest()[:16]


# -- children (run with one tree's pagedserve on the path) -------------------------------------
def child_offline(model: Path) -> dict[str, Any]:
    import torch

    from pagedserve import LLM, SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    started = time.perf_counter()
    llm = LLM(str(model), **ENGINE)
    load_s = time.perf_counter() - started
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]

    def greedy(n: int) -> Any:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)

    def sampled(seed: int, n: int) -> Any:
        return SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, top_k=50, seed=seed,
                              ignore_eos=True, detokenize=False)

    # Warm-up on other prompts: kernels for prefill, decode and both samplers built.
    warm = prompts(99, 4, vocab)
    llm.generate(prompt_token_ids=warm, sampling_params=greedy(4))
    llm.generate(prompt_token_ids=warm, sampling_params=[sampled(i, 4) for i in range(4)])

    def timed(batch: list[list[int]], params: Any) -> tuple[float, list[Any]]:
        sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=batch, sampling_params=params)
        sync()
        return time.perf_counter() - t0, outs

    result: dict[str, Any] = {"load_s": load_s}
    for kind in ("greedy", "sampled", "batch1"):
        rates, digests = [], []
        for r in range(ROUNDS):
            seed = {"greedy": 1, "sampled": 11, "batch1": 21}[kind] + r
            if kind == "batch1":
                batch = prompts(seed, 1, vocab)
                seconds, outs = timed(batch, greedy(OUTPUT_LEN))
                rates.append(seconds / OUTPUT_LEN * 1e3)  # ms per output token
            else:
                batch = prompts(seed, NUM_REQUESTS, vocab)
                params = (greedy(OUTPUT_LEN) if kind == "greedy"
                          else [sampled(1000 * seed + i, OUTPUT_LEN) for i in range(NUM_REQUESTS)])
                seconds, outs = timed(batch, params)
                rates.append(sum(len(o.token_ids) for o in outs) / seconds)
            digests.append(digest(outs))
        result[kind] = rates
        result[f"{kind}_tokens"] = digests
    return result


def child_serve(model: Path, out: Path) -> dict[str, Any]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    report = out / "serve.json"
    cmd = [
        sys.executable, "-m", "pagedserve.backend.cli", "bench", "serve", "--compare-offline",
        f"--repeat={ROUNDS}", f"--model={model}", *flags, f"--num-requests={NUM_REQUESTS}",
        f"--input-len={INPUT_LEN}", f"--output-len={OUTPUT_LEN}", "--prompt-seed=5",
        "--no-progress", f"--json={report}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    tail = (done.stdout + done.stderr)[-3000:]
    if done.returncode != 0:
        raise RuntimeError(f"bench serve failed ({done.returncode}):\n{tail}")
    return {"report": json.loads(report.read_text()), "tail": tail}


# -- the orchestrator ---------------------------------------------------------------------------
def run_child(tree: Path, stage: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", stage, "--tokenizer", str(args.tokenizer),
           "--out", str(out), "--work", str(args.work)] + (["--smoke"] if args.smoke else [])
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-4000:], "wall_s": wall}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def print_offline(stage: str, results: dict[str, dict[str, Any]]) -> None:
    print(f"\n{stage}: {NUM_REQUESTS} x {INPUT_LEN}/{OUTPUT_LEN}, {ENGINE['dtype']}, dummy weights")
    print(f"{'tree':<10}{'greedy tok/s':>24}{'sampled tok/s':>24}{'batch-1 ms/tok':>20}{'load s':>9}")
    for tree, r in results.items():
        if "error" in r:
            print(f"{tree:<10} FAILED: {r['error'][-800:]}")
            continue
        fmt = lambda xs, f: " / ".join(format(x, f) for x in xs)  # noqa: E731
        print(f"{tree:<10}{fmt(r['greedy'], ',.0f'):>24}{fmt(r['sampled'], ',.0f'):>24}"
              f"{fmt(r['batch1'], '.3f'):>20}{r['load_s']:>9.1f}")
    ok = [r for r in results.values() if "error" not in r]
    if len(ok) == 2:
        for kind in ("greedy", "sampled", "batch1"):
            same = ok[0][f"{kind}_tokens"] == ok[1][f"{kind}_tokens"]
            print(f"  {kind} tokens identical across trees: {same}")


def print_serve(results: dict[str, dict[str, Any]]) -> None:
    print(f"\nserve-1b: bench serve --compare-offline --repeat {ROUNDS} (fresh prompts per round)")
    for tree, r in results.items():
        if "error" in r:
            print(f"{tree:<10} FAILED: {r['error'][-1500:]}")
            continue
        print(f"{tree:<10}\n{r['tail'][-1400:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="append", default=[], help="NAME=DIR, in run order")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--stages", default="offline-1b,offline-8b,serve-1b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    args = parser.parse_args()
    if args.smoke:
        use_smoke_settings()
    if args.child:
        stage, size = args.child.rsplit("-", 1)
        model = model_dir(size, args.tokenizer, args.work)
        out = child_offline(model) if stage == "offline" else child_serve(model, args.out)
        print(json.dumps(out))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab-"))
    args.work = work
    trees = {}
    for spec in args.tree:
        name, root = spec.split("=", 1)
        trees[name] = link_tree(Path(root), work / "trees" / name)
    everything: dict[str, dict[str, Any]] = {}
    for stage in args.stages.split(","):
        results = {name: run_child(tree, stage, args, args.out) for name, tree in trees.items()}
        everything[stage] = results
        (args.out / "results.json").write_text(json.dumps(everything, indent=1))
        if stage.startswith("offline"):
            print_offline(stage, results)
        else:
            print_serve(results)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
