"""Shared test material: random LLaMA weights in Meta's names, and an independent dense reference forward."""

from __future__ import annotations

import math

import torch

from model.args import ModelArgs, preset


def tiny_args(**overrides) -> ModelArgs:
    return preset("tiny", **overrides)


def random_state_dict(args: ModelArgs, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hd, hidden = args.head_dim, args.hidden_dim

    def w(*shape, std=0.08):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n):  # not all ones, so a model that ignored them would fail the comparison
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    sd = {"tok_embeddings.weight": w(args.vocab_size, args.dim, std=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(args.n_heads * hd, args.dim)
        sd[p + "attention.wk.weight"] = w(args.n_kv_heads * hd, args.dim)
        sd[p + "attention.wv.weight"] = w(args.n_kv_heads * hd, args.dim)
        sd[p + "attention.wo.weight"] = w(args.dim, args.n_heads * hd)
        sd[p + "feed_forward.w1.weight"] = w(hidden, args.dim)
        sd[p + "feed_forward.w2.weight"] = w(args.dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, args.dim)
        sd[p + "attention_norm.weight"] = norm(args.dim)
        sd[p + "ffn_norm.weight"] = norm(args.dim)
    sd["norm.weight"] = norm(args.dim)
    sd["output.weight"] = w(args.vocab_size, args.dim)
    return sd


def params_of(args: ModelArgs) -> dict:
    """The params.json a Meta checkpoint of these weights would carry."""
    return {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "multiple_of": args.multiple_of,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_seq_len,
    }


def reference_forward(sd: dict[str, torch.Tensor], args: ModelArgs, tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA written out densely in float64 from the paper's description (complex RoPE, explicit softmax)."""
    p = {k: v.double() for k, v in sd.items()}
    bsz, seq = tokens.shape
    hd, nh, nkv = args.head_dim, args.n_heads, args.n_kv_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cis = torch.polar(torch.ones(seq, hd // 2, dtype=torch.float64), torch.outer(torch.arange(seq).double(), freqs))

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(-2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.norm_eps) * w

    causal = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    x = p["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        L = lambda name, i=i: p[f"layers.{i}.{name}.weight"]
        h = rms(x, L("attention_norm"))
        q = rope((h @ L("attention.wq").T).view(bsz, seq, nh, hd))
        k = rope((h @ L("attention.wk").T).view(bsz, seq, nkv, hd)).repeat_interleave(nh // nkv, dim=2)
        v = (h @ L("attention.wv").T).view(bsz, seq, nkv, hd).repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + causal
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(bsz, seq, nh * hd)
        x = x + attn @ L("attention.wo").T
        h = rms(x, L("ffn_norm"))
        x = (
            x
            + (torch.nn.functional.silu(h @ L("feed_forward.w1").T) * (h @ L("feed_forward.w3").T))
            @ L("feed_forward.w2").T
        )
    return rms(x, p["norm.weight"]) @ p["output.weight"].T


def write_tiny_checkpoint(path, *, seed: int, args: ModelArgs | None = None):
    """A random tiny model in Meta's format at `path`; returns (args, state dict)."""
    from util.checkpoint import write_meta_checkpoint

    args = args or tiny_args()
    sd = random_state_dict(args, seed=seed)
    write_meta_checkpoint(path, sd, params=params_of(args))
    return args, sd


def greedy_generate(model, prompt: list[int], max_new_tokens: int, *, eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt alone (util.generate.generate with a batch of one)."""
    from util.generate import SamplingParams, generate

    return generate(model, [prompt], SamplingParams(max_new_tokens=max_new_tokens), eos_id=eos_id)[0]
