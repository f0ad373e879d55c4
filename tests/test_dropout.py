"""Dropout from per-sample streams: a keep fraction of 1 - p with survivors scaled by 1/(1 - p), a sample's mask a
function of its seed and the call alone, torch's dropout outside the streams and nothing in eval mode."""

from __future__ import annotations

import math

import pytest
import torch

from evodiff_pl.networks.dropout import Dropout, dropout, keep_samples, sample_seeds, sample_streams, splitmix64


def _seeds(n: int, base: int = 11) -> torch.Tensor:
    return sample_seeds(base, torch.arange(n))


def test_splitmix64_matches_the_reference_outputs():
    """The generator seeded with 0: its first output 0xE220A8397B1DCDAF (the C reference), as a signed int64; the
    second from the state advanced by one increment."""
    first = splitmix64(torch.tensor([0]))
    assert first.item() == 0xE220A8397B1DCDAF - (1 << 64)
    assert splitmix64(torch.tensor([0x9E3779B97F4A7C15 - (1 << 64)])).item() == 0x6E789E6AA1B965F4


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction_and_scale(p):
    x = torch.ones(64, 3, 32, 32, dtype=torch.float64)
    with sample_streams(_seeds(64)):
        y = dropout(x, p, training=True)
    kept = (y != 0).double().mean().item()
    n = x.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 binomial standard deviations
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))


def test_a_samples_mask_depends_on_its_seed_and_call_alone():
    x = torch.randn(6, 4, 5, 5)
    seeds = _seeds(6)
    with sample_streams(seeds):
        first, second, *more = (dropout(x, 0.3, True) for _ in range(5))
    with sample_streams(seeds[[4, 1]]):  # other neighbours, other local positions
        alone = dropout(x[[4, 1]], 0.3, True)
    assert torch.equal(alone, first[[4, 1]])
    with sample_streams(seeds[4:5]):
        assert torch.equal(dropout(x[4:5].contiguous(memory_format=torch.channels_last), 0.3, True), first[4:5])
    assert not torch.equal(first != 0, second != 0) and not torch.equal(more[0] != 0, more[2] != 0)  # other calls
    assert not torch.equal(first[0] != 0, first[1] != 0)  # another sample
    with sample_streams(_seeds(6, base=12)):
        assert not torch.equal(dropout(x, 0.3, True) != 0, first != 0)  # another batch or run


def test_label_keep_mask_is_per_sample_and_counts_as_a_call():
    seeds = _seeds(4000)
    with sample_streams(seeds):
        labels = keep_samples(4000, 0.25, torch.device("cpu"))
        after = dropout(torch.ones(4000, 1), 0.25, True) != 0
    assert labels.shape == (4000, 1) and abs(labels.double().mean().item() - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 4000)
    assert not torch.equal(labels, after)
    with sample_streams(seeds[:3]):
        assert torch.equal(keep_samples(3, 0.25, torch.device("cpu")), labels[:3])


def test_gradients_flow_through_the_kept_elements():
    x = torch.randn(8, 16, requires_grad=True)
    with sample_streams(_seeds(8)):
        y = dropout(x, 0.5, True)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * 2)


def test_outside_the_streams_it_is_torch_dropout_and_eval_or_p0_is_the_identity():
    x = torch.randn(100, 10)
    torch.manual_seed(3)
    ours = dropout(x, 0.4, True)
    torch.manual_seed(3)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.4, training=True))
    torch.manual_seed(3)
    labels = keep_samples(5, 0.4, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(labels, torch.rand(5, 1) >= 0.4)
    before = torch.get_rng_state()
    with sample_streams(_seeds(100)):
        assert dropout(x, 0.0, True) is x and dropout(x, 0.4, False) is x
        dropout(x, 0.4, True)
    assert torch.equal(torch.get_rng_state(), before)  # the streams never touch torch's generator
    module = Dropout(0.4).eval()
    assert module(x) is x


def test_a_call_on_another_batch_inside_the_streams_is_one_error():
    with sample_streams(_seeds(4)), pytest.raises(ValueError, match="dropout call on 3 samples inside sample_streams"):
        dropout(torch.ones(3, 2), 0.5, True)
