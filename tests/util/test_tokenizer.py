"""Tokenizer: sentencepiece, Hugging Face tokenizer.json and Llama 3's tiktoken model behind one interface, with
token ids equal to the reference libraries' (sentencepiece, transformers, tiktoken) on files made here."""

import json

import pytest
import sentencepiece as spm

from tests.util import tokenizer_files
from util.generate import TextStream
from util.templates import alpaca_prompt, chat_prompt, chat_segments
from util.tokenizer import Tokenizer, copy_tokenizer, find_tokenizer, train_tokenizer
from util.tokenizer.tiktoken_model import LLAMA3_PATTERN, llama3_special_tokens

STRINGS = [
    "Hello world",
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple     spaces   inside",
    "line one\nline two\n\n\nafter blank lines\n",
    "tabs\tand\r\nCRLF\r\n",
    "ünïcödé façade naïve café",
    "中文字符 and 日本語のテキスト",
    "emoji 😀🎉 and a thumbs-up with skin tone 👍🏽!",
    "digits 1234567 3.14159 2024-01-01 007",
    "it's we'll they'd I'M YOU'RE",
    "def f(x):\n    return x * 2  # code",
    "special in text: <|eot_id|> and <|begin_of_text|>hi<|end_of_text|>",
    "<s>[INST] llama 2 markers [/INST] </s>",
]
SPECIAL_FREE = [s for s in STRINGS if "<|" not in s]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    json_dir = tokenizer_files.llama3_json(root / "llama3_json")
    return {
        "json": json_dir,
        "tiktoken": tokenizer_files.llama3_tiktoken(root / "llama3_tiktoken", json_dir),
        "tiktoken_bare": tokenizer_files.llama3_tiktoken(root / "llama3_tiktoken_bare", json_dir, config=False),
        "sentencepiece": tokenizer_files.llama2_sentencepiece(root / "llama2"),
    }


def test_tokenizer_json_ids_equal_transformers(files):
    from transformers import AutoTokenizer

    ours, ref = Tokenizer(files["json"]), AutoTokenizer.from_pretrained(files["json"])
    assert ours.kind == "tokenizer.json" and ours.vocab_size == len(ref) and ours.add_bos
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    for s in STRINGS:
        # transformers reads special tokens out of text; ours does when asked (chat formats place them by id)
        assert ours.encode(s, bos=ours.add_bos, allow_special=True) == ref(s)["input_ids"], s
        plain = ref(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours.encode(s) == plain, s
        assert ours.decode(plain) == ref.decode(plain, skip_special_tokens=True) == s  # byte-level: exact
    with_special = ours.encode(STRINGS[-2], allow_special=True)
    assert ours.token_id("<|eot_id|>") in with_special and ours.token_id("<|eot_id|>") not in ours.encode(STRINGS[-2])


def test_tiktoken_ids_equal_tiktoken_and_transformers(files):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoTokenizer

    path = files["tiktoken"] / "tokenizer.model"
    ranks = load_tiktoken_bpe(str(path))  # tiktoken's own reader of the file
    ref = tiktoken.Encoding(
        "ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=llama3_special_tokens(len(ranks))
    )
    ours = Tokenizer(path)
    assert ours.kind == "tiktoken" and ours.vocab_size == ref.n_vocab == len(ranks) + 256
    hf = AutoTokenizer.from_pretrained(files["tiktoken"])  # transformers converts tiktoken ranks itself
    for s in STRINGS:
        assert ours.encode(s) == ref.encode(s, disallowed_special=()), s
        assert ours.encode(s, allow_special=True) == ref.encode(s, allowed_special="all"), s
        assert ours.encode(s, allow_special=True) == hf(s, add_special_tokens=False)["input_ids"], s
        assert ours.decode(ours.encode(s)) == ref.decode(ref.encode(s, disallowed_special=())) == s
    # the same vocabulary as the tokenizer.json it was written from: both backends agree
    json_tok = Tokenizer(files["json"])
    assert all(ours.encode(s) == json_tok.encode(s) for s in STRINGS)


def test_tiktoken_without_config_has_llama3_special_tokens(files):
    tok = Tokenizer(files["tiktoken_bare"])
    base = tok.vocab_size - 256
    assert (tok.bos_id, tok.eos_id) == (base, base + 1)  # <|begin_of_text|>, <|end_of_text|>
    ids = [tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")]
    assert ids == [base + 6, base + 7, base + 9] and tok.token_id("<|reserved_special_token_246|>") == base + 255
    assert tok.decode([tok.bos_id, *tok.encode("hi there"), base + 9]) == "hi there"  # special tokens drop out


def test_sentencepiece_ids_equal_sentencepiece(files):
    tok = Tokenizer(files["sentencepiece"])
    ref = spm.SentencePieceProcessor(model_file=str(files["sentencepiece"] / "tokenizer.model"))
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    for s in STRINGS:
        assert tok.encode(s, bos=True, eos=True) == [1, *ref.EncodeAsIds(s), 2], s
        assert tok.decode(tok.encode(s)) == ref.DecodeIds(ref.EncodeAsIds(s)) == s  # identity normalization


def test_train_encode_decode_round_trip(tmp_path):
    texts = ["Give three tips for staying healthy.", "Eat well, sleep enough, and exercise."] * 30
    tok = train_tokenizer(texts, tmp_path / "tokenizer.model", vocab_size=300)
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.vocab_size == 300
    ids = tok.encode("Tips: sleep well! ünïcode", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "Tips: sleep well! ünïcode"  # byte fallback covers unseen characters
    assert Tokenizer(tmp_path).vocab_size == 300  # a directory holding tokenizer.model works too


def test_encode_pieces_splits_the_ids_of_the_joined_text(files):
    for kind in ("json", "tiktoken", "sentencepiece"):
        tok = Tokenizer(files[kind])
        pieces = ["[INST] Where? [/INST]", " Paris, ünï 😀 ", "", "end"]
        split = tok.encode_pieces(pieces)
        assert sum(split, []) == tok.encode("".join(pieces)), kind
        assert tok.decode(split[0]).strip() == "[INST] Where? [/INST]" and split[2] == [], kind


def test_a_directory_prefers_tokenizer_json_and_copies_keep_the_tokenizer(files, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    copy_tokenizer(files["json"], both)
    copy_tokenizer(files["sentencepiece"] / "tokenizer.model", both)
    assert find_tokenizer(both) == (both / "tokenizer.json", "tokenizer.json")
    assert find_tokenizer(both / "tokenizer.model")[1] == "sentencepiece"
    for kind in ("json", "tiktoken", "sentencepiece"):
        out = tmp_path / f"copy_{kind}"
        out.mkdir()
        Tokenizer(files[kind]).save(out)
        assert (out / "tokenizer_config.json").is_file()
        a, b = Tokenizer(files[kind]), Tokenizer(out)
        assert a.kind == b.kind and all(a.encode(s) == b.encode(s) for s in STRINGS)
        assert (a.chat_template, a.bos_id, a.eos_id) == (b.chat_template, b.bos_id, b.eos_id)


def test_streaming_holds_back_partial_utf8_of_byte_level_tokens(files):
    text = "naïve 😀🎉 café 中文 👍🏽 done"
    for kind in ("json", "tiktoken"):
        tok = Tokenizer(files[kind])
        ids = tok.encode(text)
        assert any("\ufffd" in tok.decode(ids[:n]) for n in range(len(ids)))  # some characters span tokens
        stream = TextStream(tok)
        deltas = [stream.push(i) for i in ids]
        assert not any("\ufffd" in d for d in deltas), kind
        assert "".join(deltas) + stream.flush() == text


def test_bad_tokenizer_files(tmp_path, files):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x07not a model at all")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "tokenizer.model")
    tik = tmp_path / "tik"
    tik.mkdir()
    (tik / "tokenizer.model").write_text("IQ== 0\nIg== 1\nnot base64! 2\n")
    with pytest.raises(ValueError, match=r"tik/tokenizer.model: line 3 .*tiktoken"):
        Tokenizer(tik)
    js = tmp_path / "js"
    js.mkdir()
    (js / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"js/tokenizer.json: not a Hugging Face tokenizer.json"):
        Tokenizer(js)
    (js / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match=r"js/tokenizer.json: not a Hugging Face tokenizer.json"):
        Tokenizer(js)
    cfg = tmp_path / "cfg"
    copy_tokenizer(files["json"], cfg.mkdir() or cfg)
    (cfg / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<no such token>"}))
    with pytest.raises(ValueError, match=r"cfg/tokenizer_config.json: bos_token '<no such token>' is not in"):
        Tokenizer(cfg)
    (cfg / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"cfg/tokenizer_config.json: not valid JSON"):
        Tokenizer(cfg)


def test_templates():
    assert alpaca_prompt("Add 2+2").endswith("### Instruction:\nAdd 2+2\n\n### Response:\n")
    assert "### Input:\nx\n" in alpaca_prompt("Do", "x")
    segments = chat_segments([("hi", "hello"), ("how are you?", None)])
    assert [r for _, r in segments] == [False, False, True, False]
    assert chat_prompt([("hi", "hello"), ("how are you?", None)]).endswith("### Human: how are you?\n### Assistant: ")
    with pytest.raises(ValueError):
        chat_segments([("hi", None), ("again", "x")])
