"""The world's one-thread block (no host): the run trains each half after the base on one core,
and the diagnose and the estimate retrain or time those models inside this block."""

import pytest
import torch

from locref_core.world.base import one_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_the_count_before_after(two_threads):
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_one_thread_restores_the_count_when_the_block_raises(two_threads):
    with pytest.raises(RuntimeError, match="stopped"), one_thread():
        raise RuntimeError("stopped")
    assert torch.get_num_threads() == 2


def test_one_thread_nests(two_threads):
    with one_thread():
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
