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
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_gqa"


def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                     shared_prefix=None, **kwargs):
    """query [batch, heads, q, head_dim]; key/value [batch, kv_heads, k, head_dim] -> [batch, q, heads, head_dim]."""
    if shared_prefix is not None:
        prefix_keys, prefix_values = shared_prefix[module.layer_idx]
        return shared_prefix_attention(query, key, value, attention_mask, scaling, prefix_keys, prefix_values), None
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
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


def shared_prefix_attention(query, key, value, mask, scaling, prefix_keys, prefix_values) -> torch.Tensor:
    """Attention over [shared prefix, own keys] -> [batch, q, heads, head_dim].

    query [B, H, q, d]; key/value [B, kvh, T, d] (each row's own columns); mask [B, 1, q, T], boolean
    (True = attend) or additive, or None for causal; prefix_keys/values [1, kvh, P, d], visible to
    every query. Query head h uses KV head h // (H / kvh), as transformers' repeat_kv has it.
    """
    B, H, q, d = query.shape
    kvh, T, P = key.shape[1], key.shape[2], prefix_keys.shape[2]
    gq = H // kvh * q
    scale = d ** -0.5 if scaling is None else scaling
    qg = query.reshape(B, kvh, gq, d)
    q_by_head = qg.transpose(0, 1).reshape(kvh, B * gq, d)  # every row's queries against one prefix: a GEMM
    prefix_scores = torch.matmul(q_by_head, prefix_keys[0].transpose(1, 2)).view(kvh, B, gq, P).transpose(0, 1)
    scores = torch.cat([prefix_scores, torch.matmul(qg, key.transpose(2, 3))], dim=-1).mul_(scale)
    own = scores[..., P:].view(B, kvh, gq // q, q, T)
    if mask is None:  # causal, aligned bottom-right as the cache puts the queries last
        mask = torch.ones(q, T, dtype=torch.bool, device=query.device).tril(T - q)
    mask = mask.view(mask.shape[0], 1, 1, q, T) if mask.dim() == 4 else mask
    if mask.dtype == torch.bool:
        own.masked_fill_(~mask, float("-inf"))
    else:
        own.add_(mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs[..., P:], value)  # [B, kvh, gq, d]
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
