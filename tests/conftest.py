"""Shared test fixtures (the challenge's sp8192 tokenizer, a tiny real data set) and the
``gpu`` marker: tests marked ``@pytest.mark.gpu`` are skipped here, in one place, when
CUDA is unavailable. Builders shared by several test modules live in tests/helpers/.

``tiny_data`` runs the three data stages once per session on a few State of
the Union speeches (small vocab, small shards), so tests of later stages can
use real shards and a real tokenizer in about a second.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FIXTURES, run_data_stages, tiny_data_params


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def sp8192_model_path() -> Path:
    """The challenge's own sp8192 tokenizer (ids 0-3 specials, 4-259 bytes)."""
    return FIXTURES / "fineweb_8192_bpe.model"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Root of a finished corpus → tokenizer → shards run on TINY_DATA_PARAMS:
    ``data/corpus/*.jsonl``, ``data/tokenizer/tokenizer.model``, ``data/shards/*.bin``."""
    root = tmp_path_factory.mktemp("tiny_data")
    run_data_stages(tiny_data_params(), root)
    return root


@pytest.fixture
def one_thread():
    """Torch on one thread: the suite shares 2 cores, and one is the fastest at tiny sizes."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
