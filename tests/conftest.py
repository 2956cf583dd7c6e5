"""Session-wide fixtures: the converted default model, tiny random Llama-family models and a
throw-away PKI for the TLS tests.

The default model is converted once into the real cache directory ($PAGEDSERVE_CACHE_DIR, else
~/.cache/pagedserve) so repeated test runs reuse it. Tiny models are written per session into
a temporary directory, seeded, with the default model's tokenizer and generation config so
they decode to real text.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA. The variable must be set
# before any kernel module is imported (the decorator reads it), so it is set here, first.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pagedserve.backend.config import default_cache_dir
from pagedserve.backend.models.default_model import default_model_dir as convert_default

if TYPE_CHECKING:
    from tests.certs import Pki

# Nothing above imports huggingface_hub, which reads this once at import: tests never go online.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_SEED = 1234
# A larger init scale than the usual 0.02 so tiny random models spread their logits and greedy
# decoding does not collapse onto one token.
TINY_INIT_RANGE = 0.15
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "initializer_range": TINY_INIT_RANGE,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
TINY_QWEN2: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "qwen2",
    "num_hidden_layers": 3,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}

TinyModelFactory = Callable[..., Path]


def save_tiny_model(
    out_dir: Path,
    settings: dict[str, Any],
    tokenizer_dir: Path | None,
    seed: int = TINY_SEED,
    max_shard_size: str | None = None,
) -> Path:
    """Random-initialised transformers model saved as safetensors, plus the tokenizer and
    generation config of ``tokenizer_dir`` (none where the default model is unavailable)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(settings)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    if max_shard_size is None:
        model.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    for path in tokenizer_dir.iterdir() if tokenizer_dir is not None else ():
        if path.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation")):
            shutil.copy(path, out_dir / path.name)
    return out_dir


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CAs, certificates and keys for the TLS tests, generated for this session."""
    from tests.certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory (converted on the first run only)."""
    return convert_default(default_cache_dir())


@pytest.fixture(scope="session")
def tiny_model_factory(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
) -> TinyModelFactory:
    """``make(name, settings, max_shard_size=None) -> dir``; one directory per name and session."""
    made: dict[str, Path] = {}

    def make(name: str, settings: dict[str, Any], max_shard_size: str | None = None) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp("models") / name
            made[name] = save_tiny_model(
                out, settings, default_model_dir, TINY_SEED, max_shard_size
            )
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_llama_settings() -> dict[str, Any]:
    """The tiny Llama's transformers config dict, to derive variants from."""
    return dict(TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory: TinyModelFactory) -> Path:
    """2 layers, hidden 64, 4 heads over 2 KV heads (GQA), tied embeddings, 49152 vocab."""
    return tiny_model_factory("tiny-llama", TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_factory: TinyModelFactory) -> Path:
    """3 layers with q/k/v bias and untied embeddings, saved in sharded safetensors."""
    return tiny_model_factory("tiny-qwen2", TINY_QWEN2, max_shard_size="8MB")
