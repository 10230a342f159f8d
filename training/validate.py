"""Adapter files are checked before any of them is loaded. Pure over file facts and shapes.

An adapter folder must hold ``adapter_model.safetensors`` (pickled weights such as
``adapter_model.bin`` are refused outright: loading a pickle runs code), its sha256 must
match the registry, and every LoRA matrix must fit the base model's layer it targets:
``lora_A`` is ``(r, in_features)`` and ``lora_B`` is ``(out_features, r)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feedback.exceptions import LearnloopError

ADAPTER_FILE = "adapter_model.safetensors"
_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$")


class AdapterInvalidError(LearnloopError):
    """The adapter must not be loaded; the message says why."""


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors header only (no weights loaded)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise AdapterInvalidError(f"{path.name} is truncated (no header)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 1024 * 1024:
            raise AdapterInvalidError(f"{path.name} claims a {size}-byte header: not a safetensors file")
        header = f.read(size)
        if len(header) != size:
            raise AdapterInvalidError(f"{path.name} is truncated (header cut short)")
        try:
            meta = json.loads(header)
        except ValueError as exc:
            raise AdapterInvalidError(f"{path.name} has an unreadable header: {exc}") from None
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
        f.seek(0, 2)
        if f.tell() < 8 + size + end:
            raise AdapterInvalidError(f"{path.name} is truncated ({f.tell()} bytes, needs {8 + size + end})")
    return {k: tuple(v["shape"]) for k, v in meta.items() if k != "__metadata__"}


def shape_problems(
    tensors: dict[str, tuple[int, ...]], base_linear: dict[str, tuple[int, int]], rank: int | None = None
) -> list[str]:
    """Mismatches between LoRA tensors and the base model's linear layers ``(out, in)``."""
    problems: list[str] = []
    seen = 0
    for name, shape in sorted(tensors.items()):
        m = _LORA.match(name)
        if not m:
            continue
        seen += 1
        module = m["module"]
        if module not in base_linear:
            problems.append(f"{name}: the base model has no layer {module}")
            continue
        out_features, in_features = base_linear[module]
        if len(shape) != 2:
            problems.append(f"{name}: expected a matrix, got shape {shape}")
        elif m["kind"] == "A" and (shape[1] != in_features or (rank is not None and shape[0] != rank)):
            problems.append(f"{name}: shape {shape} does not fit ({rank or 'r'}, {in_features})")
        elif m["kind"] == "B" and (shape[0] != out_features or (rank is not None and shape[1] != rank)):
            problems.append(f"{name}: shape {shape} does not fit ({out_features}, {rank or 'r'})")
    if not seen:
        problems.append("no LoRA weights in the file")
    return problems


def check_adapter_folder(folder: Path, *, sha256: str | None, digest: str) -> None:
    """File-level checks (presence, no pickles, checksum). Raises AdapterInvalidError."""
    if not (folder / ADAPTER_FILE).is_file():
        raise AdapterInvalidError(f"{folder}: {ADAPTER_FILE} is missing")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLES)
    if pickles:
        raise AdapterInvalidError(f"{folder}: pickled weights are refused ({', '.join(pickles)}); use safetensors")
    if sha256 is None or digest != sha256:
        raise AdapterInvalidError(f"{folder}: sha256 {digest} does not match the registry ({sha256})")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_adapter_files(folder: Path, *, sha256: str | None) -> None:
    """``check_adapter_folder`` against the weights' actual digest (blocking I/O)."""
    weights = folder / ADAPTER_FILE
    check_adapter_folder(folder, sha256=sha256, digest=sha256_file(weights) if weights.is_file() else "")


def read_adapter_config(folder: Path, *, sha256: str | None) -> dict[str, Any]:
    """The file checks, then ``adapter_config.json`` (which must name an integer rank ``r``)."""
    check_adapter_files(folder, sha256=sha256)
    try:
        config: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
        int(config["r"])
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterInvalidError(f"{folder}: adapter_config.json is missing or unreadable ({exc})") from None
    return config


def check_fits(folder: Path, config: dict[str, Any], base_linear: dict[str, tuple[int, int]]) -> None:
    """Every LoRA matrix of the folder's weights fits the base model's linear layers."""
    problems = shape_problems(safetensors_shapes(folder / ADAPTER_FILE), base_linear, int(config["r"]))
    if problems:
        raise AdapterInvalidError(f"{folder}: does not fit the base model: " + "; ".join(problems[:5]))


def check_adapter(
    folder: Path,
    *,
    sha256: str | None,
    base_linear: dict[str, tuple[int, int]] | None,
    refusal: Callable[[dict[str, Any]], str | None] | None = None,
) -> None:
    """Every check before an engine loads the adapter folder (blocking I/O). Raises AdapterInvalidError.

    ``base_linear``: the serving model's linear layers ``(out, in)``; ``{}`` when the engine
    cannot tell (shapes are not checked); None when it has no model at hand (a remote server:
    only the files are checked). ``refusal``: why the engine cannot serve an adapter with this
    ``adapter_config.json`` (None: it can).
    """
    if base_linear is None:
        check_adapter_files(folder, sha256=sha256)
        return
    config = read_adapter_config(folder, sha256=sha256)
    reason = refusal(config) if refusal is not None else None
    if reason:
        raise AdapterInvalidError(f"{folder}: {reason}")
    if base_linear:
        check_fits(folder, config, base_linear)
