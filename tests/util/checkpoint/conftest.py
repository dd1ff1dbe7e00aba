"""Fixtures shared by the checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.util.checkpoint.helpers import PARAMS, make_state_dict
from util.checkpoint import write_meta_checkpoint


@pytest.fixture(scope="module")
def meta_ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[int, Path]]:
    sd = make_state_dict()
    dirs = {}
    for n in (1, 2):
        dirs[n] = write_meta_checkpoint(tmp_path_factory.mktemp(f"meta{n}"), sd, params=PARAMS, num_shards=n)
    return sd, dirs
