"""The ``pagedserve`` command.

Engine flags are mapped onto the config dataclasses in ``config.py`` (one source of defaults);
each subcommand lives in the module that owns its job and registers its parser here. A user's
mistake (a bad path, a missing GPU, a busy port) ends the command with one line naming the
cause and the fix, and a non-zero exit; ``--log-level DEBUG`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any, cast, get_args

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.errors import ModelLoadError, PagedServeError

DESCRIPTION = (
    "pagedserve: an LLM inference server (gRPC, KServe v2 and an OpenAI-compatible HTTP API) "
    "with continuous batching and paged attention, and the tools around it. Without --model "
    "every command uses the embedded SmolLM2-135M-Instruct. `pagedserve COMMAND --help` "
    "describes a command's flags and their defaults."
)
# Exit codes: a failure, and Ctrl-C (128 + SIGINT, as shells report it).
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MODEL_HINT = (
    "--model takes a local Hugging Face model directory with config.json, tokenizer files and "
    "*.safetensors, or a .gguf file; leave it out for the embedded default model"
)
# What a model-loading error says when --model points at the wrong place.
_PATH_WORDS = ("directory", "config.json", "tokenizer", "safetensors")
logger = logging.getLogger("pagedserve.cli")

# Engine flags: dataclass field -> CLI flag, generated from the config dataclasses.
_ENGINE_SECTIONS = [type(s) for s in EngineConfig().sections()[1:]]
_SKIP_FIELDS = {"hf_overrides"}
# Each engine flag's help; its default is the dataclass's, shown beside it.
ENGINE_FLAG_HELP: Mapping[str, str] = {
    "model": "local Hugging Face model directory, or a .gguf file of a Llama, Qwen2 or Qwen3 "
    "model (dequantized once under --cache-dir) (default: the embedded SmolLM2-135M-Instruct, "
    "a Q4_1 GGUF dequantized once to float32 safetensors under --cache-dir)",
    "served_model_name": "the name clients address the model by (default: the directory's name)",
    "load_format": "auto: safetensors, else PyTorch .bin files; dummy: random weights (tests)",
    "dtype": "weights and activations; auto: float32 on CPU, bfloat16 on a GPU",
    "device": "auto: cuda when torch sees a GPU, else cpu",
    "seed": "seed of the engine's random state (dummy weights, unseeded sampling)",
    "max_model_len": "longest prompt + output in tokens (default: the model config's)",
    "cache_dir": "where the default model is converted to (default: $PAGEDSERVE_CACHE_DIR, "
    "else ~/.cache/pagedserve)",
    "block_size": "tokens per KV cache block",
    "num_blocks": "KV cache blocks (default: sized from --gpu-memory-utilization on CUDA, "
    "--cpu-kv-cache-gib on CPU)",
    "gpu_memory_utilization": "share of the GPU's memory the engine may fill, KV cache included",
    "cpu_kv_cache_gib": "KV cache size on CPU",
    "enable_prefix_caching": "reuse the KV blocks of prompt prefixes seen before",
    "max_num_batched_tokens": "tokens one engine step computes at most (prefill chunks and "
    "decodes together)",
    "max_num_seqs": "requests running at once",
    "max_queued_requests": "requests waiting for a running slot; one more is refused at once "
    "(RESOURCE_EXHAUSTED, HTTP 429) rather than queued without bound",
    "admission_group": "at saturation, waiting requests join in groups of this many (fewer "
    "prefill steps between graph replays); 1 admits each at once",
    "max_admission_wait_s": "longest a waiting request is held back to fill its group",
    "tensor_parallel_size": "GPUs the model is split over, one process each",
    "distributed_timeout_s": "bound on joining the tensor-parallel group and each collective",
    "worker_heartbeat_interval_s": "how often tensor-parallel workers report to rank 0",
    "worker_heartbeat_timeout_s": "a worker silent this long is taken for dead",
    "max_prompt_tokens": "refuse longer prompts (default: only the context bounds them)",
    "max_output_tokens": "refuse a larger max_tokens (default: only the context bounds it)",
    "max_prompt_bytes": "refuse prompt text (or chat message contents) of more UTF-8 bytes, "
    "before tokenizing it",
    "default_max_tokens": "max_tokens of a request that sets none, cut to the room its prompt "
    "leaves, so it never fails for a value the client did not send",
    "max_stop_strings": "stop strings one request may give",
    "max_stop_string_chars": "longest stop string",
    "speculative_method": "speculative decoding: ngram (prompt lookup) proposes draft tokens "
    "that one target forward verifies (greedy requests; default: off)",
    "num_speculative_tokens": "draft tokens proposed per request and step",
    "prompt_lookup_min": "ngram: the shortest suffix looked up in the sequence",
    "prompt_lookup_max": "ngram: the longest suffix looked up in the sequence",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per engine config field, defaults taken from the dataclasses."""
    group = parser.add_argument_group("engine")
    for section in _ENGINE_SECTIONS:
        for f in fields(section):
            if f.name in _SKIP_FIELDS:
                continue
            flag = "--" + f.name.replace("_", "-")
            default: Any = f.default if f.default is not MISSING else None
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
            helped: dict[str, Any] = {"default": default, "help": ENGINE_FLAG_HELP[f.name]}
            if kind == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **helped)
            elif kind == "int":
                group.add_argument(flag, type=int, **helped)
            elif kind == "float":
                group.add_argument(flag, type=float, **helped)
            elif kind in ("int | None",):
                group.add_argument(flag, type=int, **helped)
            elif kind == "LoadFormat":
                from pagedserve.backend.config import LoadFormat

                group.add_argument(flag, choices=get_args(LoadFormat), **helped)
            elif kind == "DType":
                from pagedserve.backend.config import DType

                group.add_argument(flag, choices=get_args(DType), **helped)
            elif kind == "SpeculativeMethod | None":
                from pagedserve.backend.config import SpeculativeMethod

                group.add_argument(flag, choices=get_args(SpeculativeMethod), **helped)
            else:
                group.add_argument(flag, **helped)
    parser.add_argument(
        "--no-cuda-graphs", dest="enable_cuda_graphs", action="store_false", default=True,
        help="run decode batches eagerly instead of replaying captured CUDA graphs",
    )
    parser.add_argument(
        "--speculative-config", type=_speculative_config, metavar="JSON",
        help='speculative decoding as one JSON object, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}\' '
        "(the same as the --speculative-* and --prompt-lookup-* flags; it wins over them)",
    )
    parser.add_argument(
        "--overlap-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="queue each step before the previous one's tokens reach the host "
        "(default: on with CUDA; with tensor parallelism only when asked)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Collect the engine flags back into an EngineConfig."""
    kwargs: dict[str, Any] = {}
    for section in _ENGINE_SECTIONS:
        for f in fields(section):
            if f.name in _SKIP_FIELDS or not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            if value is None and f.default is MISSING:
                continue  # default_factory fields (cache_dir): keep the dataclass default
            kwargs[f.name] = value
    kwargs["enable_cuda_graphs"] = args.enable_cuda_graphs
    kwargs["overlap_scheduling"] = args.overlap_scheduling
    kwargs.update(getattr(args, "speculative_config", None) or {})
    check_device_available(kwargs.get("device", "auto"))
    return EngineConfig.from_kwargs(**kwargs)


# --speculative-config's keys (vLLM's names) -> the engine options they set.
SPECULATIVE_CONFIG_KEYS: Mapping[str, str] = {
    "method": "speculative_method",
    "num_speculative_tokens": "num_speculative_tokens",
    "prompt_lookup_min": "prompt_lookup_min",
    "prompt_lookup_max": "prompt_lookup_max",
}


def _speculative_config(text: str) -> dict[str, Any]:
    """--speculative-config's JSON object as engine options, every key and value checked."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    unknown = sorted(set(value) - set(SPECULATIVE_CONFIG_KEYS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown keys {', '.join(unknown)} (known: {', '.join(SPECULATIVE_CONFIG_KEYS)})"
        )
    options: dict[str, Any] = {}
    for key, item in value.items():
        if key == "method":
            from pagedserve.backend.config import SpeculativeMethod

            if item not in get_args(SpeculativeMethod):
                raise argparse.ArgumentTypeError(
                    f"method must be one of {', '.join(get_args(SpeculativeMethod))}, got {item!r}"
                )
        elif not isinstance(item, int) or isinstance(item, bool) or item < 1:
            raise argparse.ArgumentTypeError(f"{key} must be a positive integer, got {item!r}")
        options[SPECULATIVE_CONFIG_KEYS[key]] = item
    return options


class DeviceUnavailableError(PagedServeError, ValueError):
    """``--device`` names a device this machine or torch build does not have."""


def check_device_available(device: str) -> None:
    """Fail before loading anything when ``--device cuda`` cannot work here."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise DeviceUnavailableError(
            f"--device {device}: torch {torch.__version__} ({build}) sees no CUDA GPU; "
            "use --device cpu, or --device auto to take a GPU when there is one"
        )


def add_log_level_arg(parser: argparse.ArgumentParser, default: str = "WARNING") -> None:
    parser.add_argument(
        "--log-level", default=default, choices=LOG_LEVELS,
        help="DEBUG also logs the traceback of a failure",
    )


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default after its help, unless there is none to show (None, a
    plain switch: its help says what giving it does) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        shown = action.option_strings and not switch and action.default is not None
        if shown and action.default is not argparse.SUPPRESS and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """Every command's parser: the defaults shown in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrations() -> list[Register]:
    # Imported here so `pagedserve --help` stays fast and each command pulls only its own deps.
    from pagedserve.backend import commands

    return commands.REGISTRATIONS


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pagedserve", description=DESCRIPTION)
    # The commands' parsers are Parsers too (argparse makes them of the parent's class), so
    # every command shows its defaults; the registrations need only the ArgumentParser API.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands"),
    )
    for register in _registrations():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_level = getattr(args, "log_level", None)
    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: how a user stops a command, not a failure to report
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except (PagedServeError, OSError, ValueError) as error:
        logger.debug("pagedserve %s failed", args.command, exc_info=error)
        print(f"pagedserve {args.command}: error: {describe(error)}", file=sys.stderr)
        return EXIT_FAILURE


def describe(error: BaseException) -> str:
    """One line for the user: the cause, and where the error alone does not say it, the fix."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ModelLoadError) and any(word in text for word in _PATH_WORDS):
        return f"{text}; {MODEL_HINT}"
    return text


if __name__ == "__main__":
    sys.exit(main())
