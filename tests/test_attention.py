"""Shared-prefix (cascade) attention equals plain attention over [prefix, own keys], and our attention
function honours what architectures pass it (a score scale, a softcap, sliding-window masks)."""
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


def reference_scaled_attention(query, keys, values, allowed, scale, softcap=None):
    """Textbook attention with transformers' eager conventions: scores * scale, then the softcap
    ``c * tanh(scores / c)``, then the mask; allowed [B, q, T] (True = attend)."""
    B, H, q, d = query.shape
    groups = H // keys.shape[1]
    out = torch.empty(B, q, H, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            scores = query[b, h].double() @ keys[b, h // groups].double().T * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~allowed[b], float("-inf"))
            out[b, :, h] = torch.softmax(scores, dim=-1) @ values[b, h // groups].double()
    return out


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_a_mask_over_the_prefix_scaling_and_softcap(softcap):
    """What Gemma-style layers pass: a score scale that is not d**-0.5, a softcap, and a mask over
    [prefix, own keys] in which a sliding window leaves the prefix's first tokens behind."""
    g = torch.Generator().manual_seed(1)
    B, H, kvh, d, P, T, q, window = 3, 4, 2, 16, 7, 5, 2, 6
    query = torch.randn(B, H, q, d, generator=g) * 3
    pk, pv = torch.randn(1, kvh, P, d, generator=g), torch.randn(1, kvh, P, d, generator=g)
    own_k, own_v = torch.randn(B, kvh, T, d, generator=g), torch.randn(B, kvh, T, d, generator=g)
    positions = torch.arange(P + T)  # the prefix, then each row's own keys; the queries are the last q
    q_pos = positions[-q:]
    allowed = (positions[None, :] <= q_pos[:, None]) & (positions[None, :] > q_pos[:, None] - window)
    allowed = allowed.expand(B, q, P + T).clone()
    allowed[1, :, P + 1] = False  # a hole in one row's own columns
    assert not allowed[:, :, :P].all() and allowed[:, :, :P].any()  # the window cuts the prefix
    got = shared_prefix_attention(query, own_k, own_v, allowed[:, None], 24 ** -0.5, pk, pv, softcap=softcap,
                                  sliding_window=window)
    expected = reference_scaled_attention(query, torch.cat([pk.expand(B, -1, -1, -1), own_k], 2),
                                          torch.cat([pv.expand(B, -1, -1, -1), own_v], 2), allowed, 24 ** -0.5,
                                          softcap)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # A sliding-window layer without a mask over the prefix is refused, not given the whole prefix.
    with pytest.raises(ValueError, match="sliding-window"):
        shared_prefix_attention(query, own_k, own_v, allowed[:, None, :, P:], 24 ** -0.5, pk, pv, sliding_window=window)


def test_the_registered_function_honours_scaling_and_softcap():
    """sdpa_gqa's plain path (no prefix): the scale goes to SDPA, a softcap takes the explicit path."""
    from types import SimpleNamespace

    from pipeline.engines.attention import sdpa_gqa_forward

    g = torch.Generator().manual_seed(2)
    B, H, kvh, d, T = 2, 4, 2, 8, 6
    query, keys, values = (torch.randn(B, n, T, d, generator=g) * 2 for n in (H, kvh, kvh))
    module = SimpleNamespace(num_key_value_groups=H // kvh, is_causal=True, layer_idx=0)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone()
    allowed[0, :, 1] = False
    allowed[0, 1, 1] = True  # no query may see nothing
    for softcap in (None, 1.5):
        got, _ = sdpa_gqa_forward(module, query, keys, values, allowed[:, None], scaling=0.2, softcap=softcap)
        expected = reference_scaled_attention(query, keys, values, allowed, 0.2, softcap)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
