"""The entry scripts' shared parts: one `error: ...` line for a configuration mistake, and the one config rule."""

from __future__ import annotations

import pytest

from tests.helpers import params_of, random_state_dict, tiny_args
from util.build import model_config, open_checkpoints
from util.checkpoint import CheckpointError, write_meta_checkpoint
from util.cli import TRACEBACK_ENV, run


def _raise(e: BaseException):
    def main():
        raise e

    return main


@pytest.mark.parametrize(
    "error, line",
    [
        (KeyError("3 key(s) in [x] are not in the model: a, b"), "error: 3 key(s) in [x] are not in the model: a, b"),
        (TypeError("c.json: dim='64' is not a valid value"), "error: c.json: dim='64' is not a valid value"),
        (CheckpointError("ckpt: missing\nsecond line"), "error: ckpt: missing second line"),
        (FileNotFoundError("config not found: p.json"), "error: config not found: p.json"),
    ],
)
def test_a_configuration_mistake_is_one_error_line_and_exit_2(error, line, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert run(_raise(error)) == 2
    assert capsys.readouterr().err == line + "\n"


def test_the_traceback_env_raises_and_other_errors_pass_through(monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(KeyError):
        run(_raise(KeyError("k")))
    monkeypatch.delenv(TRACEBACK_ENV)
    with pytest.raises(RuntimeError):  # a bug, not a configuration mistake: the traceback
        run(_raise(RuntimeError("bug")))
    assert run(lambda: 3) == 3 and run(lambda: object()) == 0


class _Tok:
    def __init__(self, vocab_size):
        self.vocab_size, self.path = vocab_size, f"tok{vocab_size}.model"


def test_the_config_rule_checkpoints_in_order_then_user_files_and_the_vocabulary(tmp_path):
    args = tiny_args(vocab_size=96)
    base_params = {**params_of(args), "vocab_size": -1, "max_seq_len": 64}
    write_meta_checkpoint(tmp_path / "base", random_state_dict(args), params=base_params)
    delta = tmp_path / "delta"
    write_meta_checkpoint(delta, {}, params={**base_params, "lora_rank": 4, "max_seq_len": 32})
    user = tmp_path / "user.json"
    user.write_text('{"lora_alpha": 2.0, "max_seq_len": 48}')
    with open_checkpoints([tmp_path / "base", delta]) as readers:
        got = model_config(readers, [user], tokenizer=_Tok(90))
        assert (got.lora_rank, got.lora_alpha, got.max_seq_len) == (4, 2.0, 48)  # later wins
        assert got.vocab_size == 96  # the embedding's, not the (smaller) tokenizer's
        with pytest.raises(ValueError, match="tok100.model has 100 tokens but the model's vocab_size is 96"):
            model_config(readers, tokenizer=_Tok(100))
    with open_checkpoints([delta]) as readers:  # no embedding: the tokenizer says it
        assert model_config(readers, tokenizer=_Tok(90)).vocab_size == 90
        with pytest.raises(ValueError, match="vocab_size is -1"):
            model_config(readers)
