"""Export a model to the formats other tools run: Hugging Face, Meta, peft, GGUF, and this project's own
(pre-quantized) format. `convert` is what scripts/convert.py runs:

1. build the model from its checkpoints (a base, then deltas) in full precision, with `build_model`;
2. fold LoRA into the weights (hf / meta / gguf) or keep it apart (peft);
3. write the format into a temp directory beside `out` and publish it with one rename.

A source tensor the model lacks, or a model tensor no source holds, is an error: an export never writes freshly
initialized weights.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.peft import merge_lora
from util.checkpoint import model_state, save_model, save_quantized, write_hf_checkpoint
from util.checkpoint.errors import CheckpointError
from util.checkpoint.files import publish_dir, write_json
from util.checkpoint.meta import write_meta_checkpoint
from util.checkpoint.modules import EXTRA_PARAMS_FILE, meta_params
from util.export.tokenizer import TokenizerExport, tokenizer_export

log = logging.getLogger(__name__)

FORMATS = ("hf", "meta", "peft", "gguf", "lazyllama")
QUANTS = {
    "hf": (None, "4bit"),
    "meta": (None,),
    "peft": (None,),
    "gguf": (None, "f32", "f16", "bf16", "q8_0", "q4_0"),
    "lazyllama": (None, "4bit", "4bit_fp4", "8bit"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NO_ADAPTERS = {"lora_rank": 0, "adapter_len": 0, "adapter_layers": 0, "bias_tuning": False, "norm_tuning": False}


def _find_tokenizer(sources: Sequence[str | Path], given: str | Path | None) -> TokenizerExport | None:
    if given is not None:
        return tokenizer_export(given)
    for src in sources:  # the checkpoints' own, as main_finetune.py saves it beside final/
        p = Path(src)
        p = p if p.is_dir() else p.parent
        for name in ("tokenizer.model", "tokenizer.json"):  # tokenizer.model is the source when both are there
            if (p / name).is_file():
                return tokenizer_export(p / name)
    return None


def _check_complete(report: Any, sources: Sequence[str | Path]) -> None:
    adapters = (".lora.", ".bias_tune.", "adapter")
    missing = [k for k in report.missing_keys if not any(a in f".{k}" for a in adapters)]
    if missing or report.unexpected_keys:
        raise CheckpointError(
            f"export of {[str(s) for s in sources]}: the checkpoints do not fit the model: missing "
            f"{missing[:5]}, unexpected {report.unexpected_keys[:5]}; an export never writes freshly initialized "
            "weights (pass the base checkpoint first, then its deltas)"
        )


def hf_4bit_quantizer(dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """(quantize, quantization_config) for write_hf_checkpoint: nf4 with double quantization, stored the way
    transformers saves a load_in_4bit model (packed weight + bitsandbytes' QuantState.as_dict(packed=True))."""
    from util.quant import quant_spec, quantize_4bit_chunked

    spec = quant_spec("4bit")

    def quantize(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, state = quantize_4bit_chunked(weight, spec, device=torch.device("cpu"), dtype=dtype)
        return {"": packed, **{f".{k}": v for k, v in state.as_dict(packed=True).items()}}

    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": spec.quant_type,
        "bnb_4bit_use_double_quant": spec.compress_statistics,
        "bnb_4bit_compute_dtype": dtype_name,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    return quantize, config


def convert(
    sources: Sequence[str | Path],
    *,
    to: str,
    out: str | Path,
    tokenizer_path: str | Path | None = None,
    quant: str | None = None,
    dtype: str = "bfloat16",
    shards: int = 1,
) -> Path:
    """Convert checkpoints (a base, then deltas, as --pretrained_path takes them) to `to` in directory `out`."""
    from util.build import build_model  # util.build sits beside util.export; imported late to keep imports light

    if to not in FORMATS:
        raise ValueError(f"--to {to!r}: choose one of {FORMATS}")
    if quant not in QUANTS[to]:
        raise ValueError(f"--quant {quant!r} is not available for --to {to}; choose one of {QUANTS[to]}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if shards != 1 and to != "meta":
        raise ValueError(f"--shards applies to --to meta (model-parallel files); {to} writes one set of files")
    if not sources:
        raise ValueError("no source checkpoints: pass the base checkpoint, then its deltas")
    out = Path(out)
    model, report = build_model(None, list(sources), dtype=DTYPES[dtype], quant=quant if to == "lazyllama" else None)
    _check_complete(report, sources)
    params = model.args.to_dict()
    tokenizer = _find_tokenizer(sources, tokenizer_path)
    if tokenizer is None and to in ("hf", "gguf"):
        raise ValueError(f"--to {to} writes the tokenizer too: pass --tokenizer_path path/to/tokenizer.model")

    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        if to == "lazyllama":
            if quant:
                save_quantized(model, tmp, config=params)
            else:
                save_model(model, tmp, config=params)
        elif to == "peft":
            from util.export.peft import write_peft_adapter

            tensors, _ = model_state(model)
            write_peft_adapter(tmp, tensors, params=params, base_model=str(sources[0]))
        else:
            n_merged = merge_lora(model)
            log.info("merged %d LoRA updates into their weights", n_merged)
            params.update(_NO_ADAPTERS)
            tensors, _ = model_state(model)
            if "output.weight" in tensors and torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"]):
                params["tie_word_embeddings"] = True  # one matrix in the files that can say so
            if tokenizer is not None:
                for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
                    if params.get(key) is None and value is not None and key in model.args.__dataclass_fields__:
                        params[key] = value
            _write(to, tmp, tensors, params, tokenizer=tokenizer, quant=quant, dtype=DTYPES[dtype], shards=shards)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s)", out, to)
    return out


def _write(
    to: str,
    out: Path,
    tensors: dict[str, torch.Tensor],
    params: dict[str, Any],
    *,
    tokenizer: TokenizerExport | None,
    quant: str | None,
    dtype: torch.dtype,
    shards: int,
) -> None:
    if to == "hf":
        quantize, qconfig = hf_4bit_quantizer(dtype) if quant == "4bit" else (None, None)
        hf_params = dict(params)
        for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
            if hf_params.get(key) is None and value is not None:
                hf_params[key] = value
        write_hf_checkpoint(out, tensors, params=hf_params, quantize=quantize, quantization_config=qconfig)
        tokenizer.write_hf(out, max_seq_len=int(params.get("max_seq_len", 2048)))
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {k: hf_params[k] for k in ids if hf_params.get(k) is not None}
        write_json(out / "generation_config.json", generation)
    elif to == "meta":
        w1 = tensors["layers.0.feed_forward.w1.weight"]
        meta, extra = meta_params(params, hidden_dim=w1.shape[0])
        weights = {k: v for k, v in tensors.items() if k != "rope.freqs"}
        if "output.weight" not in weights:  # a tied head: Meta's format always has its own output matrix
            weights["output.weight"] = weights["tok_embeddings.weight"]
        write_meta_checkpoint(out, weights, params=meta, num_shards=shards)
        if extra:
            write_json(out / EXTRA_PARAMS_FILE, extra)
        if tokenizer is not None:
            shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    elif to == "gguf":
        from util.export.gguf import write_gguf

        quant = quant or {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        vocab = tokenizer.gguf_vocab(int(tensors["tok_embeddings.weight"].shape[0]))
        write_gguf(out / "model.gguf", tensors, params=params, vocab=vocab, quant=quant)
