"""Write a Hugging Face directory shaped like a Llama 3.x release, with random weights, small enough for a CPU.

    python scripts/make_llama3_like.py --out out/llama3-like

What a downloaded Llama 3.2 holds, in small: config.json in transformers 4's layout (top-level rope_theta 500000,
rope_scaling of rope_type llama3), grouped-query attention (8 query heads, 2 KV heads), an explicit head_dim, tied
embeddings (no lm_head in the weights), bos/eos ids; model.safetensors (bf16, HF's q/k layout); generation_config.json;
and the tokenizer (tokenizer.model + tokenizer_config.json, which transformers reads).

The tokenizer is a sentencepiece model trained here on the bundled data (no normalization, byte fallback, like
Meta's Llama 2 tokenizer). Llama 3's own tiktoken tokenizer.model and tokenizer.json directories are read and
exported as well (util/tokenizer/, util/export/tokenizer.py; tests/formats/test_export_tokenizers.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.checkpoint import write_hf_checkpoint  # noqa: E402
from util.checkpoint.files import publish_dir, write_json  # noqa: E402
from util.export.tokenizer import tokenizer_export  # noqa: E402
from util.tokenizer import train_tokenizer  # noqa: E402

# Llama 3.2's RoPE scaling as its config.json states it, except the original context: theirs is 8192 of 131072
# positions; here it is a quarter of --max_seq_len (transformers wants it below max_position_embeddings).
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def bundled_texts() -> list[str]:
    """Every string of the bundled quickstart data: what the tokenizer learns its pieces from."""
    texts = []
    for name in ("alpaca_tiny.json", "conversations_tiny.json"):
        for record in json.loads((REPO / "data" / name).read_text()):
            texts += [v for v in record.values() if isinstance(v, str) and v]
            texts += [turn["value"] for turn in record.get("conversations", [])]
    return texts


def random_weights(params: dict, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Meta-named random weights (normal, std 0.02 as HF initializes Llama; norms ones), bf16, no output head."""
    g = torch.Generator().manual_seed(seed)
    dim, hd, hidden = params["dim"], params["head_size"], params["ffn_hidden_dim"]

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()

    sd = {"tok_embeddings.weight": w(vocab, dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(params["n_heads"] * hd, dim)
        sd[p + "attention.wk.weight"] = w(params["n_kv_heads"] * hd, dim)
        sd[p + "attention.wv.weight"] = w(params["n_kv_heads"] * hd, dim)
        sd[p + "attention.wo.weight"] = w(dim, params["n_heads"] * hd)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
        sd[p + "ffn_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    sd["norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    return sd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory to write (replaced in one rename when complete)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--intermediate_size", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=512, help="tokenizer pieces (the embedding has this many rows)")
    p.add_argument("--max_seq_len", type=int, default=4096, help="max_position_embeddings")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # like Meta's: no normalization, spaces kept, digits split, byte fallback
        train_tokenizer(bundled_texts(), tmp / "tokenizer.model", vocab_size=a.vocab_size, llama_normalization=True)
        tok = tokenizer_export(tmp / "tokenizer.model")
        vocab = tok.sp.GetPieceSize()
        params = {
            "dim": a.dim,
            "n_layers": a.n_layers,
            "n_heads": a.n_heads,
            "n_kv_heads": a.n_kv_heads,
            "head_size": a.head_dim,
            "ffn_hidden_dim": a.intermediate_size,
            "vocab_size": vocab,
            "norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_seq_len": a.max_seq_len,
        }
        sd = random_weights(params, vocab, a.seed)
        core = {k: v for k, v in params.items() if k != "head_size"}  # the config.json is written below
        write_hf_checkpoint(tmp, sd, params=core)
        config = json.loads((tmp / "config.json").read_text())
        config.update(
            head_dim=a.head_dim,
            rope_theta=500000.0,
            rope_scaling={**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": a.max_seq_len // 4},
            max_position_embeddings=a.max_seq_len,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            torch_dtype="bfloat16",
        )
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
        tok.write_hf(tmp, max_seq_len=a.max_seq_len)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(t.numel() for t in sd.values())
    print(f"{out}: Llama 3.x-shaped, {n_params / 1e6:.1f}M random parameters, {vocab}-piece tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
