"""``k_smallest_mid`` on both of its routes (insertion network, ``torch.topk``) against a plain sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swsa_engine.core.knn.certify import NETWORK_MAX_BANK, NETWORK_MIN_TASKS, k_smallest_mid


@pytest.mark.parametrize("shape", [
    (7, 5, 3),                                     # short bank: network
    (6, NETWORK_MAX_BANK + 40, 2),                 # long bank, few tasks: topk
    (5, NETWORK_MAX_BANK + 40, NETWORK_MIN_TASKS),  # long bank, many tasks: network
    (4, 2, 3),                                     # fewer rows than k
])
@pytest.mark.parametrize("k", [1, 3])
def test_k_smallest_mid_equals_sort(shape, k):
    rng = np.random.default_rng(sum(shape) + k)
    g = torch.from_numpy(rng.integers(0, 6, size=shape).astype(np.float32))  # many ties
    g[0, 0, 0] = float("inf")  # padding rows carry +inf
    expected = np.sort(g.numpy(), axis=1)[:, : min(k, shape[1]), :].transpose(0, 2, 1)
    got = k_smallest_mid(g, k)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.numpy(), expected)


def test_long_single_bank_takes_topk_route(monkeypatch):
    calls = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: calls.append(1) or real_topk(*a, **kw))
    k_smallest_mid(torch.zeros(3, NETWORK_MAX_BANK + 1, 1), 3)
    assert calls, "a long bank of one task should use torch.topk, not S x 2k elementwise passes"
