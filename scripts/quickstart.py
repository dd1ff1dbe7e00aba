"""The quickstart: build the bundled tiny model 4-bit from a checkpoint, print the memory report, generate.

Writes a random tiny checkpoint in Meta's format on first use (out/quickstart/base), then runs the same
build sequence the entry scripts use: meta build -> quantize_model -> materialize_and_load.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.args import preset  # noqa: E402
from model.build import build_model  # noqa: E402
from util.checkpoint import write_meta_checkpoint  # noqa: E402
from util.generate import greedy_generate  # noqa: E402
from util.lazy_init import materialize_and_load, meta_init  # noqa: E402
from util.memory import fmt_bytes, rss_bytes  # noqa: E402


def write_tiny_checkpoint(path: Path) -> None:
    """A seeded tiny model in Meta's layout (bf16), as a stand-in for downloaded weights."""
    from model.llama import Transformer

    args = preset("tiny")
    with meta_init(torch.bfloat16):
        model = Transformer(args)
    materialize_and_load(model, None, seed=1234)
    params = {k: v for k, v in args.to_dict().items() if not k.startswith(("lora", "adapter", "bias_", "norm_t"))}
    write_meta_checkpoint(path, model.state_dict(), params=params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt", type=Path, default=Path("out/quickstart/base"))
    parser.add_argument("--quant", default="4bit", choices=["none", "4bit", "4bit_fp4", "8bit"])
    parser.add_argument("--new_tokens", type=int, default=8)
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    if not (opts.ckpt / "params.json").exists():
        print(f"writing a tiny checkpoint to {opts.ckpt}")
        write_tiny_checkpoint(opts.ckpt)
    rss_before = rss_bytes()
    model, _ = build_model(None, [opts.ckpt], quant=opts.quant)  # logs the memory report
    print(f"  RSS before the build {fmt_bytes(rss_before)}, after {fmt_bytes(rss_bytes())}")

    prompt = [1, 17, 42, 7]
    t0 = time.perf_counter()
    tokens = greedy_generate(model.eval(), prompt, opts.new_tokens)
    dt = time.perf_counter() - t0
    print(f"greedy continuation of {prompt}: {tokens} ({len(tokens) / dt:.1f} tokens/s)")


if __name__ == "__main__":
    main()
