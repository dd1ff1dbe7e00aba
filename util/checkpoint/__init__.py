"""Checkpoints: Meta `.pth` shards, Hugging Face safetensors, and this project's own format, "lazyllama".

Every format is read through one interface, `CheckpointReader`, under Meta LLaMA's tensor names
(`tok_embeddings.weight`, `layers.{i}.attention.wq.weight`, ...). Keys outside LLaMA's layout (LoRA,
adapters, `rope.freqs`) pass through unchanged. A reader hands out one model-parallel rank's slice of any
tensor, whatever the model-parallel size the checkpoint was saved with, as a view into the memory-mapped file
where it can.

The package, bottom up (each module imports only those above it in this list):
- errors.py: CheckpointError.
- names.py: Meta <-> HF names, Meta's split dims, HF's q/k permutation.
- release.py: giving mapped pages back (madvise).
- safetensors.py: safetensors parsing, mapping and streaming writes.
- files.py: atomic file writes, fsync, atomic directory publish, JSON.
- reader.py: the shared reader (pieces, slicing, resharding, read_into, release) and the format record.
- lazyllama.py, meta.py, hf.py: one module per format: its reader, its writer, its detection.
- accessory.py (LLaMA2-Accessory), peft.py (peft LoRA adapters), hf_bnb.py (Hugging Face bitsandbytes 4/8-bit saves,
  read as pre-quantized checkpoints), gguf.py (llama.cpp GGUF files, dequantized): readers only.
- modules.py: walking nn.Modules to save them (save_model, save_quantized, export_meta).
- here: `open_checkpoint` and the registry of formats. Adding a format is one module and one line in
  `FORMATS`.
"""

from __future__ import annotations

from pathlib import Path

from util.checkpoint import accessory, gguf, hf, hf_bnb, lazyllama, meta, peft
from util.checkpoint.errors import CheckpointError
from util.checkpoint.hf import hf_config_to_params, write_hf_checkpoint
from util.checkpoint.lazyllama import join_sharded_save, save_checkpoint
from util.checkpoint.meta import write_meta_checkpoint
from util.checkpoint.modules import export_meta, model_state, packed_key, save_model, save_quantized
from util.checkpoint.names import hf_permute_qk, hf_to_meta_name, hf_unpermute_qk, meta_split_dim, meta_to_hf_name
from util.checkpoint.reader import CheckpointFormat, CheckpointReader, unknown_file_type

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "open_checkpoint",
    "save_checkpoint",
    "join_sharded_save",
    "write_meta_checkpoint",
    "write_hf_checkpoint",
    "meta_split_dim",
    "hf_to_meta_name",
    "meta_to_hf_name",
    "hf_permute_qk",
    "hf_unpermute_qk",
    "hf_config_to_params",
    "model_state",
    "save_model",
    "save_quantized",
    "packed_key",
    "export_meta",
]

# The formats, in auto-detection order: the first whose `detect` accepts a path opens it, so a catch-all
# (HF reads any safetensors) comes after the formats it would otherwise swallow.
FORMATS: dict[str, CheckpointFormat] = {
    f.name: f
    for f in (
        lazyllama.FORMAT,
        accessory.FORMAT,
        meta.FORMAT,
        peft.FORMAT,
        hf_bnb.FORMAT,
        hf.FORMAT,
        gguf.FORMAT,
    )
}


def open_checkpoint(path: str | Path, *, format: str = "auto") -> CheckpointReader:
    """Open a checkpoint directory or file for reading.

    Auto-detection, in this order:
    - a directory with lazyllama.json: this project's format (params.json + consolidated.NN.safetensors);
    - a directory with consolidated.NN.pth: Meta (params.json beside it becomes `config`);
    - a directory with *.safetensors: Hugging Face (config.json mapped to ModelArgs names, optional
      model.safetensors.index.json); Meta-named safetensors files are read as-is;
    - a .pth/.pt file: Meta with one shard;
    - a .safetensors file: lazyllama if its metadata says so (one rank only), else as a HF directory of one
      file.
    - a .gguf file, or a directory holding one: llama.cpp's GGUF (llama architecture, dequantized on reading).
    `format` (a name in `FORMATS`: "lazyllama" | "meta" | "hf") skips detection.
    """
    names = ("auto", *FORMATS)
    if format not in names:
        raise CheckpointError(f"format={format!r} is not one of {names}")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory (expected a checkpoint directory or file)")
    if format != "auto":
        return FORMATS[format].open(p)
    for f in FORMATS.values():
        if f.detect(p):
            return f.open(p)
    if p.is_file():
        raise unknown_file_type(p, format)
    listing = ", ".join(sorted(c.name for c in p.iterdir())[:10]) or "nothing"
    looked_for = ", ".join(f.looks_for for f in FORMATS.values())
    raise CheckpointError(f"{p}: unknown checkpoint layout. Looked for {looked_for}; found {listing}")
