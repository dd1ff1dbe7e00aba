"""safetensors parsing (util/checkpoint/safetensors.py): alignment and broken headers.

Tiny random tensors; runs in seconds on CPU.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from tests.util.checkpoint.helpers import PARAMS, assert_names_file, make_state_dict
from util.checkpoint import CheckpointError, open_checkpoint, write_hf_checkpoint


def test_misaligned_safetensors_offsets_are_copied(tmp_path: Path) -> None:
    a = torch.tensor([1, 2, 3], dtype=torch.uint8)
    b = torch.randn(5).to(torch.bfloat16)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "BF16", "shape": [5], "data_offsets": [3, 13]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = a.numpy().tobytes() + b.view(torch.uint8).numpy().tobytes()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    reader = open_checkpoint(tmp_path / "x.safetensors")
    assert torch.equal(reader.read("b"), b) and torch.equal(reader.read("a"), a)
    reader.release("b")  # releases file pages only, never the copy's heap memory
    assert torch.equal(reader.read("b"), b)


def test_truncated_safetensors(tmp_path: Path) -> None:
    write_hf_checkpoint(tmp_path, make_state_dict(), params=PARAMS)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "model.safetensors")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "beyond the file size"),
        (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    ],
)
def test_broken_safetensors_headers(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        open_checkpoint(tmp_path)
    assert_names_file(err, "model.safetensors")


def test_unknown_safetensors_dtype(tmp_path: Path) -> None:
    raw = json.dumps({"norm.weight": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="unknown dtype") as err:
        open_checkpoint(tmp_path / "w.safetensors")
    assert_names_file(err, "w.safetensors")
    assert_names_file(err, "norm.weight")
