"""Shared-prefix (cascade) attention equals plain attention over [prefix, own keys]."""
import pytest
import torch

from pipeline.engines.attention import shared_prefix_attention


def reference_attention(query, keys, values, allowed):
    """Textbook softmax(q k^T / sqrt(d)) v per head, KV head h // groups; allowed [B, q, T] (True = attend)."""
    B, H, q, d = query.shape
    groups = H // keys.shape[1]
    out = torch.empty(B, q, H, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            k, v = keys[b, h // groups].double(), values[b, h // groups].double()
            scores = query[b, h].double() @ k.T / d ** 0.5
            scores = scores.masked_fill(~allowed[b], float("-inf"))
            out[b, :, h] = torch.softmax(scores, dim=-1) @ v
    return out


@pytest.mark.parametrize("q, boolean", [(1, True), (1, False), (5, True), (5, None)])
def test_matches_plain_attention_over_prefix_and_own_keys(q, boolean):
    g = torch.Generator().manual_seed(0)
    B, H, kvh, d, P, T = 3, 6, 2, 16, 7, 9
    query = torch.randn(B, H, q, d, generator=g)
    pk, pv = torch.randn(1, kvh, P, d, generator=g), torch.randn(1, kvh, P, d, generator=g)
    own_k, own_v = torch.randn(B, kvh, T, d, generator=g), torch.randn(B, kvh, T, d, generator=g)
    allowed = torch.ones(B, q, T, dtype=torch.bool).tril(T - q)  # causal, queries last
    if boolean is not None:
        allowed[1, :, 2:4] = False  # holes in one row's own columns, as the decoder leaves them
    if boolean is None:
        mask = None
    elif boolean:
        mask = allowed[:, None]
    else:
        mask = torch.zeros(B, 1, q, T).masked_fill(~allowed[:, None], float("-inf"))
    got = shared_prefix_attention(query, own_k, own_v, mask, None, pk, pv)
    full_allowed = torch.cat([torch.ones(B, q, P, dtype=torch.bool), allowed], dim=-1)
    expected = reference_attention(query, torch.cat([pk.expand(B, -1, -1, -1), own_k], 2),
                                   torch.cat([pv.expand(B, -1, -1, -1), own_v], 2), full_allowed)
    assert got.shape == (B, q, H, d)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
