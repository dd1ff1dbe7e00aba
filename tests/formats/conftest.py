"""Shared by the format tests: a Llama-style sentencepiece tokenizer, a tiny GQA base with a non-default RoPE theta
(Meta format), a trained-looking LoRA delta over it, and the exports `convert` writes from them (cached per session)."""

from __future__ import annotations

import pytest
import torch

from model.args import ModelArgs
from tests.helpers import params_of, random_state_dict, tiny_args
from util.build import build_model
from util.checkpoint import save_model, write_meta_checkpoint
from util.export import convert
from util.tokenizer import train_tokenizer

TEXTS = [
    "Hello world, this is a test of the tokenizer.",
    "Ünïcödé — text\nwith newlines  and  double spaces\tand tabs",
    "numbers 12345 and symbols #$% (brackets) [more] {braces}",
    "The quick brown fox jumps over the lazy dog.",
] * 40
VOCAB = 384  # the model's embedding rows: more than the tokenizer's <= 360 pieces (padded, as released models are)


@pytest.fixture(scope="session")
def fmt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("formats")


@pytest.fixture(scope="session")
def tokenizer_path(fmt_dir):
    """Trained like Meta's: no normalization, spaces kept, byte fallback, unk/bos/eos = 0/1/2."""
    d = fmt_dir / "tok"
    d.mkdir()
    return train_tokenizer(TEXTS, d / "tokenizer.model", vocab_size=360, llama_normalization=True).path


def _args(**kw) -> ModelArgs:
    return tiny_args(rope_theta=500000.0, vocab_size=VOCAB, **kw)  # GQA: 4 query heads, 2 KV heads


@pytest.fixture(scope="session")
def base(fmt_dir, tokenizer_path):
    """(args, state dict, dir): Meta format, fp32, with tokenizer.model beside it."""
    args = _args()
    sd = random_state_dict(args, seed=3)
    d = fmt_dir / "base"
    write_meta_checkpoint(d, sd, params=params_of(args))
    (d / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return args, sd, d


@pytest.fixture(scope="session")
def tied_base(fmt_dir, tokenizer_path):
    args = _args()
    sd = random_state_dict(args, seed=4)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    d = fmt_dir / "tied"
    write_meta_checkpoint(d, sd, params=params_of(args))
    (d / "tokenizer.model").write_bytes(tokenizer_path.read_bytes())
    return args, sd, d


@pytest.fixture(scope="session")
def delta(fmt_dir, base):
    """A LoRA r4 delta (alpha 8) on all seven projections with non-zero B, as training leaves it."""
    args, _, base_dir = base
    cfg = args.replace(lora_rank=4, lora_alpha=8.0)
    model, _ = build_model(cfg, [base_dir], dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    d = fmt_dir / "delta"
    save_model(model, d, config=cfg.to_dict(), trainable_only=True)
    return cfg, d


def tokens(n: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def our_logits(sources, quant=None, dtype=torch.float32) -> torch.Tensor:
    model, _ = build_model(None, sources, dtype=dtype, quant=quant)
    model.eval()
    with torch.no_grad():
        return model(tokens()).float()


_CACHE: dict = {}


@pytest.fixture(scope="session")
def export(fmt_dir):
    """export(name, sources, to=..., ...) -> the output dir, converted once per session."""

    def run(name: str, sources, **kw):
        if name not in _CACHE:
            _CACHE[name] = convert([str(s) for s in sources], out=fmt_dir / name, **kw)
        return _CACHE[name]

    return run
