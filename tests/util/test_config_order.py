"""The config rule's order among checkpoints (util.build.model_config): a later checkpoint's config wins."""

from __future__ import annotations

from tests.helpers import params_of, random_state_dict, tiny_args
from util.build import model_config, open_checkpoints
from util.checkpoint import write_meta_checkpoint


def test_a_later_checkpoints_config_wins_over_an_earlier_one(tmp_path):
    args = tiny_args()
    base_params = {**params_of(args), "max_seq_len": 64}
    write_meta_checkpoint(tmp_path / "base", random_state_dict(args), params=base_params)
    write_meta_checkpoint(tmp_path / "delta", {}, params={**base_params, "lora_rank": 4, "max_seq_len": 32})
    with open_checkpoints([tmp_path / "base", tmp_path / "delta"]) as readers:
        got = model_config(readers)
    assert (got.lora_rank, got.max_seq_len) == (4, 32)  # the delta's, given after the base
    with open_checkpoints([tmp_path / "delta", tmp_path / "base"]) as readers:
        got = model_config(readers)
    assert (got.lora_rank, got.max_seq_len) == (4, 64)  # the base's, now given last (lora_rank: only the delta has it)
