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
    """The adapter must not be loaded; the message says why and ``kind`` names the check that failed.

    Kinds: ``missing`` (no weights file), ``pickle`` (pickled weights beside it), ``checksum``
    (not the registered bytes), ``header`` (the safetensors header is unreadable or claims more
    than the file holds), ``tensor`` (a tensor's dtype, offsets or size do not add up),
    ``truncated``, ``config`` (adapter_config.json), ``engine`` (the engine cannot serve it),
    ``shape`` (it does not fit the base model).
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


# bytes per element of each safetensors dtype (the format's own list)
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024


def tensor_problems(meta: dict[str, Any], data_bytes: int) -> list[str]:
    """What does not add up in a safetensors header whose data section holds ``data_bytes`` bytes.

    Each tensor needs a known dtype, a shape of non-negative integers and offsets whose span is
    exactly its element count times its dtype's size; the spans must tile the data section with
    no gap, overlap or trailing byte (as the format requires).
    """
    problems: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            problems.append(f"{name}: not a tensor entry")
            continue
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            problems.append(f"{name}: unknown dtype {dtype!r}")
            continue
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            problems.append(f"{name}: bad shape {shape!r}")
            continue
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            problems.append(f"{name}: bad data_offsets {offsets!r}")
            continue
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * DTYPE_BYTES[dtype]:
            problems.append(
                f"{name}: {dtype} {tuple(shape)} needs {count * DTYPE_BYTES[dtype]} bytes, its offsets span "
                f"{offsets[1] - offsets[0]}"
            )
            continue
        spans.append((offsets[0], offsets[1], name))
    if problems:
        return problems
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            problems.append(f"{name}: starts at byte {begin}, expected {at} (a gap or an overlap)")
        at = max(at, end)
    if at != data_bytes:
        problems.append(f"the tensors span {at} bytes of a {data_bytes}-byte data section")
    return problems


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors header only (no weights loaded); the header
    is checked against the file first (``tensor_problems``)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        file_bytes = f.tell()
        f.seek(0)
        head = f.read(8)
        if len(head) != 8:
            raise AdapterInvalidError(f"{path.name} is truncated (no header)", kind="truncated")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES or size > file_bytes - 8:
            raise AdapterInvalidError(
                f"{path.name} claims a {size}-byte header in a {file_bytes}-byte file: not a safetensors file",
                kind="header",
            )
        header = f.read(size)
    try:
        meta = json.loads(header)
    except ValueError as exc:
        raise AdapterInvalidError(f"{path.name} has an unreadable header: {exc}", kind="header") from None
    if not isinstance(meta, dict):
        raise AdapterInvalidError(f"{path.name} has a header that is not a JSON object", kind="header")
    problems = tensor_problems(meta, file_bytes - 8 - size)
    if problems:
        kind = "truncated" if all("data section" in p for p in problems) else "tensor"
        raise AdapterInvalidError(f"{path.name}: " + "; ".join(problems[:5]), kind=kind)
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
        raise AdapterInvalidError(f"{folder}: {ADAPTER_FILE} is missing", kind="missing")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLES)
    if pickles:
        raise AdapterInvalidError(
            f"{folder}: pickled weights are refused ({', '.join(pickles)}); use safetensors", kind="pickle"
        )
    if sha256 is None or digest != sha256:
        raise AdapterInvalidError(f"{folder}: sha256 {digest} does not match the registry ({sha256})", kind="checksum")


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
        raise AdapterInvalidError(
            f"{folder}: adapter_config.json is missing or unreadable ({exc})", kind="config"
        ) from None
    return config


def check_fits(folder: Path, config: dict[str, Any], base_linear: dict[str, tuple[int, int]]) -> None:
    """Every LoRA matrix of the folder's weights fits the base model's linear layers."""
    problems = shape_problems(safetensors_shapes(folder / ADAPTER_FILE), base_linear, int(config["r"]))
    if problems:
        raise AdapterInvalidError(f"{folder}: does not fit the base model: " + "; ".join(problems[:5]), kind="shape")


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
        raise AdapterInvalidError(f"{folder}: {reason}", kind="engine")
    if base_linear:
        check_fits(folder, config, base_linear)
