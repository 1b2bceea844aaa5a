import pytest

from pgolf.distributed import shard_range


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 3), (10, 8), (64, 8), (5, 1)])
def test_shard_range_partitions(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
