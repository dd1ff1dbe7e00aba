"""File safety (util/checkpoint/files.py): atomic writes and publishes leave the old or the new, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from util.checkpoint import CheckpointError
from util.checkpoint.files import atomic_write, publish_dir, read_config, write_json


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "params.json"
    write_json(target, {"dim": 1})
    with pytest.raises(OSError, match="simulated"), atomic_write(target) as f:
        f.write(b'{"dim": 2')
        raise OSError("disk full (simulated)")
    assert read_config(target) == {"dim": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["params.json"]  # no temp file left behind


def test_publish_dir_replaces_the_old_directory_in_one_rename(tmp_path: Path) -> None:
    old, new = tmp_path / "final", tmp_path / ".tmp-final"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    publish_dir(new, old)
    assert (old / "a").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # the temp name and the previous copy are gone


def test_read_config_names_the_file(tmp_path: Path) -> None:
    assert read_config(tmp_path / "absent.json") is None
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="params.json: expected a JSON object"):
        read_config(tmp_path / "params.json")
