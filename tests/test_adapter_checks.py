"""Corrupt or malicious adapter files (docs/reliability.md, scenario 16), checked in milliseconds.

Each file is a real safetensors file written by the ``safetensors`` package and then damaged
the way a bad disk, a bad copy or an attacker would: bit flips anywhere, an oversize header
length, a dtype flipped in the header, offsets that overlap or leave a gap, trailing bytes.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.validate import AdapterInvalidError, check_adapter_folder, safetensors_shapes, sha256_file

TENSORS = {
    "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 64),
    "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(64, 4),
}


def write(path: Path) -> Path:
    save_file(TENSORS, str(path))
    return path


def split(data: bytes) -> tuple[dict[str, object], bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(meta: dict[str, object], body: bytes) -> bytes:
    header = json.dumps(meta).encode()
    return struct.pack("<Q", len(header)) + header + body


def refused(path: Path) -> AdapterInvalidError:
    with pytest.raises(AdapterInvalidError) as info:
        safetensors_shapes(path)
    return info.value


def test_a_good_file_passes(tmp_path: Path) -> None:
    shapes = safetensors_shapes(write(tmp_path / "a.safetensors"))
    assert shapes == {k: tuple(v.shape) for k, v in TENSORS.items()}


def test_any_bit_flip_is_caught_by_the_registered_checksum(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    path = write(folder / "adapter_model.safetensors")
    registered = sha256_file(path)
    clean = path.read_bytes()
    rng = random.Random(0)
    for _ in range(50):
        data = bytearray(clean)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        with pytest.raises(AdapterInvalidError) as info:
            check_adapter_folder(folder, sha256=registered, digest=sha256_file(path))
        assert info.value.kind == "checksum"


@pytest.mark.parametrize("claimed", [2**63, 2**40, 100 * 1024 * 1024 + 1, "file+1"])
def test_an_oversize_header_length_is_refused_before_reading(tmp_path: Path, claimed: int | str) -> None:
    path = write(tmp_path / "a.safetensors")
    data = path.read_bytes()
    size = len(data) - 8 + 1 if claimed == "file+1" else int(claimed)
    path.write_bytes(struct.pack("<Q", size) + data[8:])
    error = refused(path)
    assert error.kind == "header" and "header" in str(error)


@pytest.mark.parametrize(("dtype", "kind"), [("F16", "tensor"), ("F64", "tensor"), ("I8", "tensor"), ("F33", "tensor")])
def test_a_flipped_dtype_is_refused(tmp_path: Path, dtype: str, kind: str) -> None:
    path = write(tmp_path / "a.safetensors")
    meta, body = split(path.read_bytes())
    name = next(k for k in meta if k != "__metadata__")
    meta[name]["dtype"] = dtype  # type: ignore[index]
    path.write_bytes(join(meta, body))
    error = refused(path)
    assert error.kind == kind and name in str(error)


def test_overlapping_offsets_gaps_and_trailing_bytes_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "a.safetensors")
    meta, body = split(path.read_bytes())
    names = sorted((k for k in meta if k != "__metadata__"), key=lambda k: meta[k]["data_offsets"][0])  # type: ignore[index]
    first, second = names
    # the second tensor starts inside the first: two names read the same bytes
    overlapping = json.loads(json.dumps(meta))
    begin, end = overlapping[second]["data_offsets"]
    overlapping[second]["data_offsets"] = [begin - 8, end - 8]
    path.write_bytes(join(overlapping, body))
    assert "overlap" in str(refused(path))
    # trailing bytes after the last tensor
    path.write_bytes(join(meta, body + b"\0" * 16))
    assert refused(path).kind == "truncated"
    # cut short
    path.write_bytes(join(meta, body[:-4]))
    assert refused(path).kind == "truncated"
    # a header that is JSON but not an object, and one that is not JSON
    path.write_bytes(join([1, 2], body))  # type: ignore[arg-type]
    assert refused(path).kind == "header"
    header = b"{not json"
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    assert refused(path).kind == "header"
    # a negative or inverted span
    inverted = json.loads(json.dumps(meta))
    inverted[first]["data_offsets"] = list(reversed(inverted[first]["data_offsets"]))
    path.write_bytes(join(inverted, body))
    assert refused(path).kind == "tensor"
