"""Convert a model (a base checkpoint, then deltas, in any format --pretrained_path reads) to another format.

    python scripts/convert.py out/llama3-like out/llama3-qlora/final --to hf --out out/export-hf --dtype bfloat16
    python scripts/convert.py out/llama3-like out/llama3-qlora/final --to gguf --quant q8_0 --out out/export-gguf

--to hf: config.json (RoPE theta and scaling, head_dim, tying, token ids), generation_config.json, the tokenizer and
  safetensors; LoRA merged. --quant 4bit writes a bitsandbytes nf4 save transformers loads.
--to meta: consolidated.NN.pth (--shards N: model-parallel files) + params.json with Meta's keys only; LoRA merged.
--to peft: the LoRA delta alone as adapter_model.safetensors + adapter_config.json, for the hf export of the base.
--to gguf: model.gguf for llama.cpp (--quant f32|f16|bf16|q8_0|q4_0; default: --dtype); LoRA merged.
--to lazyllama: this project's format; --quant 4bit|4bit_fp4|8bit writes it pre-quantized (save_quantized).
The tokenizer comes from --tokenizer_path, else a tokenizer.model beside a source checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.export import DTYPES, FORMATS, convert  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SRC", help="checkpoints: the base, then its deltas, in order")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory (replaced in one rename when complete)")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--quant", default=None, help="hf: 4bit; gguf: f16 bf16 q8_0 q4_0; lazyllama: 4bit 8bit")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="precision of the written weights")
    p.add_argument("--shards", type=int, default=1, help="--to meta: number of model-parallel files")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        kw = {"tokenizer_path": a.tokenizer_path, "quant": a.quant, "dtype": a.dtype, "shards": a.shards}
        out = convert(a.sources, to=a.to, out=a.out, **kw)
    except (ValueError, KeyError, OSError) as e:  # CheckpointError is a ValueError; a missing tensor a KeyError
        print(f"convert: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
