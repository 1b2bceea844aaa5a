"""pgolf.data.shards.load_tokens: the one loader of a whole split, whatever the files are named."""
from __future__ import annotations

import shutil

import numpy as np

from pgolf.data.shards import challenge_sources, list_shards, load_split, load_tokens, write_shard


def test_challenge_names_load_like_pgolf_names(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    for i, ids in enumerate(([1, 5, 7], [1, 2], [1, 9, 9, 3])):
        write_shard(ours / f"val_{i:06d}.bin", np.array(ids, dtype=np.uint16))
    for path in list_shards(ours, "val"):
        shutil.copyfile(path, theirs / f"fineweb_{path.name}")
    expected = [1, 5, 7, 1, 2, 1, 9, 9, 3]
    np.testing.assert_array_equal(load_split(ours, "val", vocab_size=10), expected)
    np.testing.assert_array_equal(load_tokens(challenge_sources(theirs, "val"), vocab_size=10), expected)
    assert load_tokens([]).dtype == np.uint16 and load_tokens([]).size == 0
