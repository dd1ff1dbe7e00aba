"""open_checkpoint's registry (util/checkpoint/__init__.py): detection of each format, unknown layouts.

Adding a format is one module and one entry in FORMATS; the last test shows it with a stand-in format.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.util.checkpoint.helpers import PARAMS, make_state_dict, save_lazyllama
from util.checkpoint import (
    FORMATS,
    CheckpointError,
    CheckpointFormat,
    CheckpointReader,
    open_checkpoint,
    write_hf_checkpoint,
    write_meta_checkpoint,
)


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout") as err:
        open_checkpoint(tmp_path)
    for looked_for in ("lazyllama.json", "consolidated.NN.pth", "safetensors", str(tmp_path)):
        assert looked_for in str(err.value)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="unknown checkpoint file type"):
        open_checkpoint(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="format="):
        open_checkpoint(tmp_path, format="onnx")


def test_unknown_layout_message_is_unchanged(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: unknown checkpoint layout. Looked for lazyllama.json (lazyllama), "
        "consolidated.NN-of-MM.model.pth + config.json (LLaMA2-Accessory), consolidated.NN.pth + params.json (Meta), "
        "adapter_config.json + adapter_model.safetensors (peft LoRA adapter), config.json with a bitsandbytes "
        "quantization_config (Hugging Face 4/8-bit save), *.safetensors + config.json (Hugging Face; "
        "pytorch_model*.bin is not supported: convert to safetensors), *.gguf (llama.cpp GGUF, llama architecture); "
        "found notes.txt, pytorch_model.bin"
    )


def _write(fmt: str, out: Path) -> Path:
    sd = make_state_dict()
    if fmt == "meta":
        write_meta_checkpoint(out, sd, params=PARAMS)
    elif fmt == "hf":
        write_hf_checkpoint(out, sd, params=PARAMS)
    else:
        save_lazyllama(out, sd, 1, config=PARAMS)
    return out


@pytest.mark.parametrize("fmt", ["lazyllama", "meta", "hf"])
def test_the_registry_detects_each_format(tmp_path: Path, fmt: str) -> None:
    out = _write(fmt, tmp_path)
    with open_checkpoint(out) as reader:
        assert reader.format == fmt
        with FORMATS[fmt].open(out) as direct:  # the registry's entry is what auto-detection used
            assert type(reader) is type(direct)
        assert reader.config is not None and reader.config["dim"] == PARAMS["dim"]
        assert torch.equal(reader.read("norm.weight"), make_state_dict()["norm.weight"])
    # the single files of each format, too: a .pth is Meta, a .safetensors is lazyllama by its metadata, else HF
    one_file = {"meta": "consolidated.00.pth", "hf": "model.safetensors", "lazyllama": "consolidated.00.safetensors"}
    with open_checkpoint(out / one_file[fmt]) as reader:
        assert reader.format == fmt


def test_a_forced_format_skips_detection(tmp_path: Path) -> None:
    out = _write("lazyllama", tmp_path)
    with open_checkpoint(out, format="hf") as reader:  # the rank file read as plain safetensors
        assert reader.format == "hf" and "norm.weight" in reader.keys()
    with pytest.raises(CheckpointError, match="no consolidated.NN.pth"):
        open_checkpoint(out, format="meta")


class _NoReader(CheckpointReader):
    def keys(self) -> set[str]:
        return set()


def test_a_format_is_one_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.onnx").write_bytes(b"ONNX")
    assert "onnx" not in FORMATS
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        open_checkpoint(tmp_path)
    fmt = CheckpointFormat(
        "onnx",
        detect=lambda p: (p / "model.onnx").is_file() if p.is_dir() else p.suffix == ".onnx",
        open=lambda p: _NoReader(p, "onnx", None),
        looks_for="model.onnx (ONNX)",
    )
    monkeypatch.setitem(FORMATS, "onnx", fmt)
    assert open_checkpoint(tmp_path).format == "onnx"
    assert open_checkpoint(tmp_path / "model.onnx", format="onnx").format == "onnx"
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"model\.onnx \(ONNX\); found nothing"):
        open_checkpoint(tmp_path)
