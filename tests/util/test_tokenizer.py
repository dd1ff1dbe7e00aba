import pytest

from util.templates import alpaca_prompt, chat_prompt, chat_segments
from util.tokenizer import Tokenizer, train_tokenizer


def test_train_encode_decode_round_trip(tmp_path):
    texts = ["Give three tips for staying healthy.", "Eat well, sleep enough, and exercise."] * 30
    tok = train_tokenizer(texts, tmp_path / "tokenizer.model", vocab_size=300)
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.vocab_size == 300
    ids = tok.encode("Tips: sleep well! ünïcode", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "Tips: sleep well! ünïcode"  # byte fallback covers unseen characters
    assert Tokenizer(tmp_path).vocab_size == 300  # a directory holding tokenizer.model works too


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_templates():
    assert alpaca_prompt("Add 2+2").endswith("### Instruction:\nAdd 2+2\n\n### Response:\n")
    assert "### Input:\nx\n" in alpaca_prompt("Do", "x")
    segments = chat_segments([("hi", "hello"), ("how are you?", None)])
    assert [r for _, r in segments] == [False, False, True, False]
    assert chat_prompt([("hi", "hello"), ("how are you?", None)]).endswith("### Human: how are you?\n### Assistant: ")
    with pytest.raises(ValueError):
        chat_segments([("hi", None), ("again", "x")])
