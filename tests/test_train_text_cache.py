"""The trainers' caption cache (`TextCache`, `encode_text(..., cache)`, `--text-cache`): each
caption encoded once across steps, the same contexts as without it, the least recently used
caption dropped first."""

import argparse

import pytest
import torch

from locref_core.train.host import TextCache, encode_text, text_cache


class CountingClip:
    """A text encoder with the host CLIP's two calls: a caption's context is a function of its
    text alone; every encode is counted."""

    def __init__(self):
        self.encoded: list[str] = []

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, text):
        self.encoded.append(text)
        g = torch.Generator().manual_seed(sum(map(ord, text)) + len(text))
        return torch.randn(1, 77, 768, generator=g)


def test_each_caption_is_encoded_once_across_calls_with_the_same_contexts():
    clip, cache = CountingClip(), TextCache(8)
    batches = [["a red disc", "", "a blue square"], ["", "a red disc", "a red disc"],
               ["a blue square", "a green triangle"]]
    cached = [encode_text(clip, b, cache) for b in batches]
    assert sorted(clip.encoded) == ["", "a blue square", "a green triangle", "a red disc"]
    plain = [encode_text(CountingClip(), b) for b in batches]
    for c, p in zip(cached, plain):
        assert torch.equal(c, p)
    # a repeat inside one batch is encoded once without asking the cache
    assert len(cache) == 4 and cache.misses == 4 and cache.hits == 3


def test_without_a_cache_every_call_encodes_again():
    clip = CountingClip()
    for _ in range(3):
        encode_text(clip, ["a red disc", "a red disc"])  # repeats inside one call: once
    assert clip.encoded == ["a red disc"] * 3


def test_the_least_recently_used_caption_is_dropped_first():
    clip, cache = CountingClip(), TextCache(2)
    encode_text(clip, ["a"], cache)
    encode_text(clip, ["b"], cache)
    encode_text(clip, ["a"], cache)  # a is now the most recent
    encode_text(clip, ["c"], cache)  # drops b
    assert len(cache) == 2
    clip.encoded.clear()
    encode_text(clip, ["a", "c", "b"], cache)
    assert clip.encoded == ["b"]


def test_a_changed_context_downstream_does_not_reach_the_cache():
    clip, cache = CountingClip(), TextCache(4)
    first = encode_text(clip, ["a red disc"], cache)
    expected = first.clone()
    first.add_(1.0)  # a trainer moving or scaling its batch in place
    assert torch.equal(encode_text(clip, ["a red disc"], cache), expected)


@pytest.mark.parametrize("n", [0, -3])
def test_the_flag_is_off_at_zero_and_refuses_a_negative_count(n):
    args = argparse.Namespace(text_cache=n)
    if n == 0:
        assert text_cache(args) is None
    else:
        with pytest.raises(ValueError, match=r"--text-cache -3.*0 for no cache"):
            text_cache(args)
    assert isinstance(text_cache(argparse.Namespace(text_cache=5)), TextCache)
    with pytest.raises(ValueError, match="max_entries=0"):
        TextCache(0)
