"""--to hf: transformers loads the export (model and tokenizer) with our logits and token ids; 4-bit saves load
packed in transformers with the same quantized weights."""

from __future__ import annotations

import json

import torch
import transformers as transformers
from safetensors import safe_open

from tests.formats.conftest import our_logits, tokens
from util.build import build_model
from util.checkpoint import hf_permute_qk
from util.tokenizer import Tokenizer

STRINGS = [
    "Hello world",
    "a\nb\n\nc",
    "Ünïcödé — 日本語",
    "end with space ",
    "tab\there",
    "emoji 🙂!",
    "<s> text that looks like </s> special tokens",
    "x <unk> y",
    "\n\nstarts with newlines",
    "",
]


def _hf_logits(path, **kw) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    model.eval()
    with torch.no_grad():
        return model(tokens()).logits.float()


def test_hf_export_of_base_and_lora_matches_transformers(base, delta, export):
    args, _, base_dir = base
    out = export("hf-merged", [base_dir, delta[1]], to="hf", dtype="float32")
    ours = our_logits([base_dir, delta[1]])
    theirs = _hf_logits(out)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)
    assert not torch.allclose(ours, our_logits([base_dir]), atol=1e-3)  # the LoRA update is in the export

    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2 and config["tie_word_embeddings"] is False
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    # and our own reader takes the export back exactly
    torch.testing.assert_close(our_logits([out]), ours, rtol=0, atol=1e-5)


def test_hf_tokenizer_gives_our_token_ids(base, export):
    out = export("hf-base", [base[2]], to="hf", dtype="float32")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(out / "tokenizer.model")
    for s in STRINGS:
        assert theirs(s)["input_ids"] == ours.encode(s, bos=True), s
        assert theirs.decode(ours.encode(s), skip_special_tokens=True) == s


def test_hf_tokenizer_matches_on_random_text_and_leading_spaces(base, export):
    """transformers' LlamaTokenizer class would add no "▁" before text that starts with a space; the exported
    tokenizer.json keeps sentencepiece's pipeline, so these match too."""
    import random

    out = export("hf-base", [base[2]], to="hf", dtype="float32")
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(out / "tokenizer.model")
    rng = random.Random(0)
    alphabet = list("abcdefghij klmnopqrstuvwxyz  \n\tÜñ日🙂<>/s.,!0123456789")
    strings = [" leading", "  two spaces", " \n"]
    strings += ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(300)]
    for s in strings:
        assert theirs(s)["input_ids"] == ours.encode(s, bos=True), repr(s)
        assert theirs.decode(ours.encode(s), skip_special_tokens=True) == s, repr(s)


def test_tied_embeddings_are_written_once(tied_base, export):
    out = export("hf-tied", [tied_base[2]], to="hf", dtype="float32")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    torch.testing.assert_close(_hf_logits(out), our_logits([tied_base[2]]), rtol=0, atol=2e-5)


def test_bf16_export_is_the_rounded_weights(base, export):
    _, sd, base_dir = base
    out = export("hf-bf16", [base_dir], to="hf")
    with safe_open(out / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
    assert q.dtype == torch.bfloat16
    assert torch.equal(q, hf_permute_qk(sd["layers.1.attention.wq.weight"].bfloat16(), 4))
    assert torch.equal(k, hf_permute_qk(sd["layers.1.attention.wk.weight"].bfloat16(), 2))


def test_hf_4bit_export_loads_packed_in_transformers(base, export):
    _, _, base_dir = base
    out = export("hf-4bit", [base_dir], to="hf", quant="4bit", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] and config["quantization_config"]["bnb_4bit_use_double_quant"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    ours, _ = build_model(None, [base_dir], quant="4bit", dtype=torch.bfloat16)
    import bitsandbytes.functional as bnbF

    checked = 0
    for i in range(2):
        for hf, meta, heads in (
            ("self_attn.q_proj", "attention.wq", 4),
            ("self_attn.k_proj", "attention.wk", 2),
            ("self_attn.v_proj", "attention.wv", None),
            ("mlp.down_proj", "feed_forward.w2", None),
        ):
            lin = theirs.get_submodule(f"model.layers.{i}.{hf}")
            assert type(lin.weight).__name__ == "Params4bit"  # adopted packed, not re-quantized from floats
            got = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
            want = ours.get_submodule(f"layers.{i}.{meta}").dequantized_weight()
            want = hf_permute_qk(want, heads) if heads else want
            assert torch.equal(got, want), f"layer {i} {hf}"
            checked += 1
    assert checked == 8
    with torch.no_grad():
        hf_logits = theirs(tokens()).logits.float()
        ours.eval()
        our = ours(tokens()).float()
    assert (hf_logits - our).abs().max() < 0.05 * our.abs().max()


def test_unigram_sentencepiece_exports_with_equal_ids(tmp_path):
    import random

    import sentencepiece as spm

    from tests.formats.conftest import TEXTS
    from util.export.tokenizer import tokenizer_export

    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(TEXTS),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=360,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    out = tmp_path / "hf"
    out.mkdir()
    tokenizer_export(tmp_path / "tokenizer.model").write_hf(out, max_seq_len=64)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(tmp_path / "tokenizer.model")
    rng = random.Random(1)
    alphabet = list("abcdefghij klmnopqrstuvwxyz  \nÜñ🙂<>/.,!0123456789")
    # Known difference: in a unigram model "<s>" is a piece, and text spelling it out ("<s>") is matched to it by
    # tokenizers' lattice (sentencepiece never matches control pieces in text). Llama's tokenizers are BPE.
    strings = [s for s in STRINGS if "<s>" not in s and "</s>" not in s and "<unk>" not in s]
    for s in strings + ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(200)]:
        if "<s>" in s or "</s>" in s:
            continue
        assert theirs(s)["input_ids"] == ours.encode(s, bos=True), repr(s)
