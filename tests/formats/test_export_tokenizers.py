"""Exporting the byte-level BPE tokenizers (a Hugging Face tokenizer.json, Llama 3's tiktoken model): the Hugging
Face export loads with transformers' AutoTokenizer and gives our ids; the GGUF export's vocabulary, merges and token
types, read back with gguf's own reader, are the source's."""

from __future__ import annotations

import json

import gguf as gguf
import pytest

from tests.helpers import params_of, random_state_dict, tiny_args
from tests.util.tokenizer_files import TEXTS, llama3_json, llama3_tiktoken
from util.checkpoint import write_meta_checkpoint
from util.export import convert
from util.export.tokenizer import HFJsonExport, TiktokenExport, tokenizer_export
from util.tokenizer import Tokenizer

VOCAB = 704  # rows: more than the fixtures' 420 + 256 special tokens
MORE_TEXTS = [*TEXTS, " leading space", "trailing  \n", "x", "😀😀 中文 \r\n\r\n end", "'s 've 'LL 1234567"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe_tok")
    js = llama3_json(d / "json")
    return {"tokenizer.json": js, "tiktoken": llama3_tiktoken(d / "tiktoken", js)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    args = tiny_args(vocab_size=VOCAB)
    d = tmp_path_factory.mktemp("bpe_model")
    write_meta_checkpoint(d, random_state_dict(args, seed=5), params=params_of(args))
    return d


def test_kinds_are_picked_from_the_file(toks):
    assert isinstance(tokenizer_export(toks["tokenizer.json"]), HFJsonExport)
    assert isinstance(tokenizer_export(toks["tiktoken"] / "tokenizer.model"), TiktokenExport)


@pytest.mark.parametrize("kind", ["tokenizer.json", "tiktoken"])
def test_hf_export_loads_with_autotokenizer_and_gives_our_ids(toks, model_dir, tmp_path, kind):
    from transformers import AutoTokenizer

    out = convert([str(model_dir)], out=tmp_path / "hf", to="hf", tokenizer_path=toks[kind], dtype="float32")
    ours = Tokenizer(toks[kind])
    theirs = AutoTokenizer.from_pretrained(str(out))
    assert theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id
    for text in MORE_TEXTS:
        want = ours.encode(text, bos=True)
        assert theirs(text)["input_ids"] == want, text
        assert theirs.decode(want, skip_special_tokens=True) == text
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == ours.bos_id and config["eos_token_id"] == ours.eos_id


def _gguf_fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.")}


@pytest.mark.parametrize("kind", ["tokenizer.json", "tiktoken"])
def test_gguf_vocabulary_merges_and_types_are_the_sources(toks, model_dir, tmp_path, kind):
    out = convert([str(model_dir)], out=tmp_path / "g", to="gguf", tokenizer_path=toks[kind], quant="f16")
    fields = _gguf_fields(out / "model.gguf")
    # the source: the tokenizer.json the tiktoken file was made from (same bytes per id, same merges)
    spec = json.loads((toks["tokenizer.json"] / "tokenizer.json").read_text())
    vocab = {i: t for t, i in spec["model"]["vocab"].items()}
    added = {t["id"]: t["content"] for t in spec["added_tokens"]}
    n = len(vocab) + len(added)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB
    assert tokens[:n] == [vocab.get(i) or added[i] for i in range(n)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:n] == [1] * len(vocab) + [3] * len(added)  # normal, then control for the special tokens
    assert set(types[n:]) == {5}  # padding rows: unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges
    ours = Tokenizer(toks[kind])
    assert fields["tokenizer.ggml.bos_token_id"] == ours.bos_id == min(added)  # <|begin_of_text|>, first special
    assert fields["tokenizer.ggml.eos_token_id"] == ours.eos_id
    assert fields["tokenizer.ggml.add_bos_token"] is True


def test_gguf_refuses_a_split_pattern_llama_cpp_does_not_know(toks, tmp_path):
    spec = json.loads((toks["tokenizer.json"] / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer\.json.*not Llama 3's"):
        tokenizer_export(tmp_path / "tokenizer.json").gguf_vocab(VOCAB)
