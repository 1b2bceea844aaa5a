"""Shard format: writer, reader validation, the challenge's own layout, splitting, import."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from pgolf.errors import DataError, ParamError
from pgolf.config import from_params
from pgolf.data.shards import (HEADER_BYTES, ShardsConfig, ShardWriter, challenge_sources, import_shards,
                          list_shards, load_split, read_header, read_shard, write_shard)


def challenge_layout_bytes(tokens: list[int], magic: int = 20240520, version: int = 1,
                           count: int | None = None) -> bytes:
    """A shard built by hand from the documented layout (docs/RECIPE.md §1.1)."""
    header = [magic, version, len(tokens) if count is None else count] + [0] * 253
    return struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens)


def test_written_shard_reads_back_identically_as_readonly_memmap(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000, dtype=np.uint16)
    path = tmp_path / "val_000000.bin"
    write_shard(path, tokens)
    back = read_shard(path)
    assert isinstance(back, np.memmap) and not back.flags.writeable
    np.testing.assert_array_equal(back, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_writer_output_is_the_documented_layout_byte_for_byte(tmp_path):
    tokens = [1, 300, 65535, 0, 7]
    write_shard(tmp_path / "a.bin", np.array(tokens, dtype=np.uint16))
    assert (tmp_path / "a.bin").read_bytes() == challenge_layout_bytes(tokens)


def test_hand_built_challenge_shard_is_accepted(tmp_path):
    tokens = [1, 5, 1023, 1, 2, 3]
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(challenge_layout_bytes(tokens))
    assert read_header(path) == len(tokens)
    np.testing.assert_array_equal(read_shard(path, vocab_size=1024), tokens)


def test_empty_shard_reads_as_empty_array(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.zeros(0, dtype=np.uint16))
    assert read_shard(tmp_path / "train_000000.bin").size == 0


@pytest.mark.parametrize("data, message", [
    (challenge_layout_bytes([1, 2, 3], magic=20240521), "bad magic 20240521"),
    (challenge_layout_bytes([1, 2, 3], version=2), "unsupported shard version 2"),
    (challenge_layout_bytes([1, 2, 3], count=4), "header says 4 tokens"),
    (challenge_layout_bytes([1, 2, 3], count=2), "header says 2 tokens"),
    (challenge_layout_bytes([1, 2, 3])[:-1], "header says 3 tokens"),
    (challenge_layout_bytes([1, 2, 3], count=-1), "negative token count"),
    (b"\x00" * 100, "shorter than the 1024-byte shard header"),
])
def test_bad_shards_are_rejected_naming_the_file(tmp_path, data, message):
    path = tmp_path / "train_000003.bin"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)


def test_ids_at_or_above_vocab_are_rejected_with_position(tmp_path):
    path = tmp_path / "val_000000.bin"
    write_shard(path, np.array([1, 5, 1023, 1024, 9], dtype=np.uint16))
    np.testing.assert_array_equal(read_shard(path, vocab_size=1025), [1, 5, 1023, 1024, 9])
    with pytest.raises(DataError, match=r"token id 1024 at position 3 is >= vocab size 1024") as err:
        read_shard(path, vocab_size=1024)
    assert str(path) in str(err.value)


def test_missing_shard_and_missing_directory(tmp_path):
    with pytest.raises(DataError, match="shard file not found"):
        read_shard(tmp_path / "train_000000.bin")
    with pytest.raises(DataError, match="shard directory not found"):
        list_shards(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no val_NNNNNN.bin shards"):
        list_shards(tmp_path, "val")


def test_list_shards_sorts_and_ignores_other_files(tmp_path):
    for name in ["train_000002.bin", "train_000000.bin", "train_000010.bin", "val_000000.bin",
                 "train_extra.bin", "fineweb_train_000000.bin", "train_000001.bin.tmp"]:
        write_shard(tmp_path / name, np.array([1], dtype=np.uint16))
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "train_000000.bin", "train_000002.bin", "train_000010.bin"]


def test_load_split_concatenates_in_sorted_order(tmp_path):
    write_shard(tmp_path / "val_000001.bin", np.array([1, 8, 9], dtype=np.uint16))
    write_shard(tmp_path / "val_000000.bin", np.array([1, 5], dtype=np.uint16))
    np.testing.assert_array_equal(load_split(tmp_path, "val", vocab_size=10), [1, 5, 1, 8, 9])


def test_writer_cuts_exact_sizes_and_preserves_the_stream(tmp_path):
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 500, size=n, dtype=np.uint16) for n in (7, 0, 30, 3, 19, 1)]
    writer = ShardWriter(tmp_path, "train", tokens_per_shard=16)
    for c in chunks:
        writer.add(c)
    infos = writer.close()
    stream = np.concatenate(chunks)
    assert [i.tokens for i in infos] == [16, 16, 16, 12]
    assert [i.name for i in infos] == [f"train_{k:06d}.bin" for k in range(4)]
    np.testing.assert_array_equal(load_split(tmp_path, "train"), stream)
    starts = np.arange(0, stream.size, 16)
    assert [i.documents for i in infos] == [int((stream[s:s + 16] == 1).sum()) for s in starts]


def test_writer_refuses_an_empty_split(tmp_path):
    with pytest.raises(DataError, match="val split has no tokens"):
        ShardWriter(tmp_path, "val", 10).close()


def test_import_validates_and_renames_challenge_shards(tmp_path):
    src = tmp_path / "challenge"
    src.mkdir()
    (src / "fineweb_val_000001.bin").write_bytes(challenge_layout_bytes([1, 4, 5]))
    (src / "fineweb_val_000000.bin").write_bytes(challenge_layout_bytes([1, 2]))
    out = tmp_path / "out"
    out.mkdir()
    infos = import_shards(challenge_sources(src, "val"), out, "val", vocab_size=6, link=True)
    assert [(i.name, i.tokens, i.documents) for i in infos] == [
        ("val_000000.bin", 2, 1), ("val_000001.bin", 3, 1)]
    assert (out / "val_000000.bin").stat().st_ino == (src / "fineweb_val_000000.bin").stat().st_ino
    with pytest.raises(DataError, match=r"fineweb_val_000001.bin: token id 5 at position 2"):
        import_shards(challenge_sources(src, "val"), tmp_path / "out2", "val", vocab_size=5, link=False)
    with pytest.raises(DataError, match="no fineweb_train_NNNNNN.bin shards"):
        challenge_sources(src, "train")


def test_shards_config_checks_ranges_and_source_paths():
    base = {"source": "tokenize", "challenge_dir": "", "link": False, "tokens_per_shard": 10, "workers": 0,
            "max_shared_val_docs": 0}
    assert from_params(ShardsConfig, {"shards": base}, "shards").tokens_per_shard == 10
    for bad, key in [({"tokens_per_shard": 0}, "shards.tokens_per_shard"),
                     ({"workers": -1}, "shards.workers"),
                     ({"challenge_dir": "x"}, "shards.challenge_dir"),
                     ({"source": "challenge"}, "shards.challenge_dir")]:
        with pytest.raises(ParamError) as err:
            from_params(ShardsConfig, {"shards": {**base, **bad}}, "shards")
        assert err.value.key == key
