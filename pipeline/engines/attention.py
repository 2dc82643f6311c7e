"""``sdpa_gqa``: transformers' SDPA attention, with native grouped-KV heads on CPU and shared-prefix
(cascade) attention for the verbalizer's decoder.

    from pipeline.engines.attention import resolve_attention
    AutoModel.from_pretrained(path, attn_implementation=resolve_attention("auto", device))
    model(..., shared_prefix=[(keys, values), ...])   # per layer [1, kv_heads, P, head_dim]: see below

Why, 1: with an attention mask (padding in extract, masked cache holes in verbalize) transformers'
``sdpa`` copies K and V once per query-head group (``repeat_kv``) in every layer, because CUDA's fast
kernels do not take a mask together with ``enable_gqa``. torch's CPU kernel does: measured 10x faster
for 96 rows x 240 keys, with bit-identical output. On CUDA, plain calls fall through to transformers'
own ``sdpa`` unchanged.

Why, 2: every verbalizer row attends to the same 106-token prompt prefix. Kept in each row's cache,
those keys are read once per row per step, which made attention 28% of a decode step at 256 rows
(memory-bound). With ``shared_prefix`` passed through the model's forward kwargs (transformers hands
unknown kwargs down to the attention function), each row's cache holds only its own columns and the
prefix is held once: its scores are one GEMM per KV head over all rows' queries, and one softmax
spans prefix and own columns, so the result is ordinary attention over [prefix, own keys].

What the model's attention modules pass is honoured, so one function serves every architecture:
``scaling`` (Gemma's ``query_pre_attn_scalar**-0.5``, not ``head_dim**-0.5``) goes to every kernel;
``softcap`` (a tanh cap on the scores, Gemma 2's) has no SDPA kernel, so those calls take the explicit
path below, as transformers' eager attention does; ``sliding_window`` needs nothing on the plain path,
because the mask transformers (or the decoder) builds for that layer already holds the window, and on
the shared-prefix path the mask must then cover the prefix's columns too (the window may leave part of
the prefix behind): a call without one is refused, never silently given the whole prefix.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_gqa"


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     shared_prefix=None, sliding_window=None, softcap=None, **kwargs):
    """query [batch, heads, q, head_dim]; key/value [batch, kv_heads, k, head_dim] -> [batch, q, heads, head_dim]."""
    if shared_prefix is not None:
        prefix_keys, prefix_values = shared_prefix[module.layer_idx]
        return shared_prefix_attention(query, key, value, attention_mask, scaling, prefix_keys, prefix_values,
                                       softcap=softcap, sliding_window=sliding_window), None
    if softcap is not None:  # no SDPA kernel caps the scores: the explicit path, with an empty prefix
        empty = key[:1, :, :0]
        return shared_prefix_attention(query, key, value, attention_mask, scaling, empty, empty,
                                       softcap=softcap), None
    # sliding_window is not passed on: the mask already holds the window (transformers' sdpa ignores it too).
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and causal
    if causal and key.shape[2] > q_len:  # as transformers does: is_causal is top-left aligned in torch
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def shared_prefix_attention(query, key, value, mask, scaling, prefix_keys, prefix_values, softcap=None,
                            sliding_window=None) -> torch.Tensor:
    """Attention over [shared prefix, own keys] -> [batch, q, heads, head_dim].

    query [B, H, q, d]; key/value [B, kvh, T, d] (each row's own columns); prefix_keys/values
    [1, kvh, P, d]. ``mask``: boolean (True = attend) or additive, [B or 1, 1, q, T] (the prefix is
    visible to every query), [B or 1, 1, q, P + T] (the prefix's columns are masked like any other:
    what a sliding-window layer needs), or None for causal. ``scaling`` multiplies the scores
    (default d**-0.5); ``softcap`` then caps them, ``softcap * tanh(scores / softcap)``, before the
    mask, as transformers' eager attention does. ``sliding_window``: only checked, since the mask holds
    the window; with a prefix it requires a mask over P + T columns. Query head h uses KV head
    h // (H / kvh), as transformers' repeat_kv has it.
    """
    B, H, q, d = query.shape
    kvh, T, P = key.shape[1], key.shape[2], prefix_keys.shape[2]
    if sliding_window is not None and P and (mask is None or mask.shape[-1] != P + T):
        raise ValueError("shared-prefix attention on a sliding-window layer needs a mask over the prefix's columns "
                         f"too (the window of {sliding_window} may not reach all {P} prefix tokens)")
    groups = H // kvh
    gq = groups * q
    scale = d ** -0.5 if scaling is None else scaling
    qg = query.reshape(B, kvh, gq, d)
    scores = torch.matmul(qg, key.transpose(2, 3))  # [B, kvh, gq, T]
    if P:
        q_by_head = qg.transpose(0, 1).reshape(kvh, B * gq, d)  # every row's queries against one prefix: a GEMM
        prefix_scores = torch.matmul(q_by_head, prefix_keys[0].transpose(1, 2)).view(kvh, B, gq, P).transpose(0, 1)
        scores = torch.cat([prefix_scores, scores], dim=-1)
    scores.mul_(scale)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    if mask is None:  # causal, aligned bottom-right as the cache puts the queries last
        mask = torch.ones(q, T, dtype=torch.bool, device=query.device).tril(T - q)
    width = mask.shape[-1]
    if width not in (T, P + T):
        raise ValueError(f"attention mask has {width} columns; expected {T} (own keys) "
                         f"or {P + T} (prefix and own keys)")
    masked = (scores if width == P + T else scores[..., P:]).view(B, kvh, groups, q, width)
    mask = mask.view(mask.shape[0], 1, 1, q, width) if mask.dim() == 4 else mask
    if mask.dtype == torch.bool:
        masked.masked_fill_(~mask, float("-inf"))
    else:
        masked.add_(mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs[..., P:], value)  # [B, kvh, gq, d]
    if P:
        prefix_probs = probs[..., :P].transpose(0, 1).reshape(kvh, B * gq, P)
        out += torch.matmul(prefix_probs, prefix_values[0]).view(kvh, B, gq, d).transpose(0, 1)
    return out.view(B, H, q, d).transpose(1, 2).contiguous()


AttentionInterface.register(NAME, sdpa_gqa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def resolve_attention(name: str, device: torch.device) -> str:
    """``auto``: our CPU-friendly SDPA on CPU, transformers' ``sdpa`` elsewhere; other names pass through."""
    if name == "auto":
        return NAME if device.type == "cpu" else "sdpa"
    return name
